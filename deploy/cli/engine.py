"""`deploy check-qdq` (TensorRT's Q/DQ rules, on the CPU) and `deploy engine` (an engine from an ONNX file)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    c = sub.add_parser("check-qdq", help="check an ONNX model against TensorRT's operator table and, when it holds "
                       "Q/DQ nodes, its explicit-quantization rules")  # fmt: skip
    c.add_argument("model", type=Path, help="a QDQ ONNX file (model.int8.onnx), or an fp32 one (operators only)")
    c.set_defaults(func=check_qdq)

    e = sub.add_parser("engine", help="build a TensorRT engine from an ONNX file (needs TensorRT and a GPU)")
    e.add_argument("model", type=Path, help="model.int8.onnx (int8) or model.fp32.onnx (fp16, fp32)")
    e.add_argument("--precision", choices=["int8", "fp16", "fp32"], help="default: int8 for a QDQ model, else fp16")
    e.add_argument("--recipe", help="recipe (model name or YAML) whose `tensorrt` settings to use")
    e.add_argument("--out", type=Path, help="output folder (default: next to the ONNX file)")
    e.set_defaults(func=engine)


def check_qdq(args: argparse.Namespace) -> int:
    from ..runtimes.tensorrt import qdq_check
    from ..runtimes.tensorrt.builder import onnx_facts

    model = qdq_check.load(args.model)
    violations = qdq_check.check(model) if onnx_facts(model)[2] else qdq_check.operators(model)
    s = qdq_check.summary(model, violations)
    for v in violations:
        print(f"{v.severity}: {v}")
    print(f"{args.model}: {s['quantize_linear']} QuantizeLinear, {s['dequantize_linear']} DequantizeLinear; "
          f"{len(s['errors'])} errors, {len(s['warnings'])} warnings")  # fmt: skip
    return 0 if s["passed"] else 1


def engine(args: argparse.Namespace) -> int:
    from .. import recipe as recipes
    from ..errors import DeployError
    from ..runtimes.tensorrt.qdq_check import load, refuse_errors
    from ..runtimes.tensorrt import unavailable
    from ..runtimes.tensorrt import builder as build_trt
    from ..runtimes.tensorrt.sidecar import engine_path

    model = load(args.model)
    quantized = build_trt.onnx_facts(model)[2]
    cfg = recipes.load(args.recipe).tensorrt if args.recipe else recipes.TensorRTConfig()
    precision = args.precision or ("int8" if quantized else "fp16")
    why = unavailable()
    if why:
        raise DeployError(why)
    refuse_errors(model, args.model, quantized)
    out = args.out or args.model.parent
    out.mkdir(parents=True, exist_ok=True)
    side = build_trt.build_engine(args.model, out, cfg, precision)
    print(f"wrote {engine_path(out, precision)} (TensorRT {side['tensorrt']}, {side['gpu']}, "
          f"sm {side['compute_capability']}, {side['build_seconds']:.0f}s)")  # fmt: skip
    return 0
