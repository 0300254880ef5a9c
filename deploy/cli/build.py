"""`deploy build`: its options as recipe overrides, and one call of deploy.build (the Python API's runner)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ThresholdMissed

# recipe.Target: deploy.recipe needs pydantic and yaml, which the serving install (`deploy run`) does not have
TARGETS = ["ort-cpu", "tensorrt", "openvino"]


def add_parser(sub) -> None:
    b = sub.add_parser("build", help="fold BN, export ONNX, quantize, verify and report")
    b.set_defaults(func=run)
    b.add_argument("model", help="a model name from `deploy list`, or a recipe YAML file")
    b.add_argument("--int8", action="store_true", help="post-training int8 quantization (QDQ)")
    b.add_argument("--target", choices=TARGETS, help="runtime the int8 model is made for")
    b.add_argument("--calib", type=Path, help="calibration images (a folder, flat or nested)")
    b.add_argument("--val", type=Path, help="labeled validation images (one subfolder per class)")
    b.add_argument("--weights", help="checkpoint: a state_dict or a training checkpoint holding one")
    b.add_argument("--num-classes", type=int, help="classes of a fine-tuned head")
    b.add_argument("--calibration", choices=["minmax", "percentile", "entropy", "mse"], help="calibration method")
    b.add_argument("--samples", type=int, help="number of calibration images to sample")
    b.add_argument("--seed", type=int, help="calibration sampling seed")
    b.add_argument("--max-top1-drop", type=float, help="fail the build if int8 loses more top-1 points")
    b.add_argument("--threads", type=int, help="runtime threads for evaluation and latency (default: all cores)")
    b.add_argument("--workers", type=int, help="processes decoding the evaluation images (default: the cores)")
    b.add_argument("--val-limit", type=int, metavar="N", help="evaluate on N validation images drawn with a seed")
    b.add_argument("--runtime", choices=["ort", "tensorrt", "ort-trt", "openvino"],
                   help="also verify on TensorRT (engine), ORT's TensorRT EP or OpenVINO's CPU plugin")
    b.add_argument("--prune", type=float, metavar="RATIO", help="structured pruning: remove this fraction of MACs")
    b.add_argument("--latency-budget", type=float, metavar="FRACTION",
                   help="latency-aware pruning (prune.mode latency) to this fraction of the unpruned ORT latency")  # fmt: skip
    b.add_argument("--latency-on", metavar="ssh://[USER@]HOST[:PORT]",
                   help="latency-aware pruning times its candidates on this device (prune.latency_on)")  # fmt: skip
    b.add_argument("--equalize", action="store_true", help="cross-layer equalization before calibration")
    b.add_argument("--no-bias-correction", action="store_true", help="skip bias correction of the int8 layers")
    b.add_argument("--adaround", choices=["on", "off"], help="learned rounding of the int8 weights (off by default; "
                   "docs/int8.md)")  # fmt: skip
    b.add_argument("--qat", choices=["auto", "on", "off"], help="quantization-aware training (auto: when int8 "
                   "misses a threshold and --train is given)")  # fmt: skip
    b.add_argument("--mixed-precision", action="store_true",
                   help="keep the most sensitive layers in float until the thresholds are met")  # fmt: skip
    b.add_argument("--distill", action="store_true", help="knowledge-distillation fine-tuning (needs --train)")
    b.add_argument("--train", type=Path, help="training images for --distill and QAT (class folders; --distill also unlabeled)")
    b.add_argument("--out", type=Path, help="output folder (default: build/<model>)")
    b.add_argument("--force", action="store_true", help="replace an existing output folder")


def run(args: argparse.Namespace) -> int:
    from ..api import build

    overrides = {
        "quantize.enabled": True if args.int8 else None,
        "quantize.target": args.target,
        "quantize.calibration.method": args.calibration,
        "quantize.calibration.samples": args.samples,
        "quantize.calibration.seed": args.seed,
        "model.weights": args.weights,
        "model.num_classes": args.num_classes,
        "verify.max_top1_drop": args.max_top1_drop,
        "verify.latency.threads": args.threads,
        "verify.workers": args.workers,
        "verify.val_limit": args.val_limit,
        "prune.enabled": True if args.prune is not None or args.latency_budget is not None else None,
        "prune.ratio": args.prune,
        "prune.mode": "latency" if args.latency_budget is not None else None,
        "prune.latency_budget": args.latency_budget,
        "prune.latency_on": {"url": args.latency_on} if args.latency_on else None,
        "quantize.equalize.enabled": True if args.equalize else None,
        "quantize.bias_correction": False if args.no_bias_correction else None,
        "quantize.adaround.enabled": None if args.adaround is None else args.adaround == "on",
        "quantize.qat.mode": args.qat,
        "quantize.mixed_precision.enabled": True if args.mixed_precision else None,
        "distill.enabled": True if args.distill else None,
        "verify.runtime": args.runtime,
    }  # fmt: skip
    result = build(args.model, calib=args.calib, val=args.val, train=args.train, out=args.out, force=args.force,
                   **{k: v for k, v in overrides.items() if v is not None})  # fmt: skip
    if not result.passed:
        raise ThresholdMissed("; ".join(result.failures))
    acc = result.accuracy
    if "top1_drop" in acc:
        print(f"{result.report['model']}: fp32 {acc['fp32']['top1']:.2f}% -> int8 {acc['int8']['top1']:.2f}% top-1")
    return 0
