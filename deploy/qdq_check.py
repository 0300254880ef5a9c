"""TensorRT's explicit-quantization rules, checked on the CPU against a QDQ ONNX graph.

TensorRT accepts int8 Q/DQ only in one form (https://docs.nvidia.com/deeplearning/tensorrt/latest/
inference-library/work-quantized-types.html): symmetric int8 (zero-point 0), positive scales,
per-tensor activations, per-channel weights on the output-channel axis 0, opset >= 13 and no
QOperator nodes. Two more rules keep its fusions: both inputs of a residual Add quantized (so the
Add fuses into the preceding int8 Conv), and no Q/DQ pair between a Conv (or BatchNormalization)
and the BatchNormalization/ReLU that follows (Conv+BN+ReLU must fuse before quantization).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import DeployError
from .stages.qdq_placement import Graph, attr

# Rules whose violation TensorRT still builds, only slower (lost fusions); the others it rejects or
# computes differently from the ONNX model.
PERFORMANCE_RULES = {"residual-add", "fusion"}
QOPERATOR_OPS = {"ConvInteger", "MatMulInteger", "QGemm", "DynamicQuantizeLinear"}
WEIGHT_CONSUMERS = {"Conv": 1, "Gemm": 1}  # op -> input index of its weight
FUSED_AFTER_CONV = {"BatchNormalization", "Relu", "Clip", "LeakyRelu"}


@dataclass(frozen=True)
class Violation:
    rule: str
    node: str
    message: str

    @property
    def severity(self) -> str:
        return "warning" if self.rule in PERFORMANCE_RULES else "error"

    def __str__(self) -> str:
        return f"{self.node}: [{self.rule}] {self.message}"


def load(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise DeployError(f"ONNX file not found: {path}")
    try:
        return onnx.load(str(path))
    except Exception as err:  # noqa: BLE001 - protobuf raises several types
        raise DeployError(f"{path}: not a readable ONNX model ({str(err).splitlines()[0][:200]})") from None


def check(model: onnx.ModelProto) -> list[Violation]:
    """Every violation of TensorRT's Q/DQ rules in `model`, in graph order."""
    g = Graph(model)
    out: list[Violation] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        out.append(Violation("opset", "(model)", f"opset {opset} < 13: TensorRT needs per-axis Q/DQ from opset 13"))
    qdq = [n for n in g.g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not qdq:
        out.append(Violation("no-qdq", "(model)", "no QuantizeLinear/DequantizeLinear nodes: not an int8 QDQ model"))
    for n in g.g.node:
        if n.op_type.startswith("QLinear") or n.op_type in QOPERATOR_OPS:
            out.append(Violation("qoperator", n.name, f"{n.op_type} is a QOperator node; TensorRT needs the QDQ "
                                 "form (quantize with quant_format=QDQ)"))  # fmt: skip
        elif n in qdq:
            out += _check_qdq_node(g, n)
        elif n.op_type == "Add":
            out += _check_residual_add(g, n)
    out += _check_fusion_breaks(g, qdq)
    return out


def _check_qdq_node(g: Graph, n: onnx.NodeProto) -> list[Violation]:
    out = []
    scale = g.const(n.input[1])
    zp = g.const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
    x = g.const(n.input[0]) if n.op_type == "DequantizeLinear" else None
    if x is not None and x.dtype == np.int32:
        # A quantized bias (scale = input scale x weight scale): only its zero-point matters.
        if zp is not None and np.any(zp != 0):
            out.append(Violation("zero-point", n.name, "int32 bias dequantized with a non-zero zero-point"))
        return out
    if scale is None:
        out.append(Violation("scale", n.name, f"scale {n.input[1]!r} is not a constant; TensorRT needs constant scales"))
    elif not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        out.append(Violation("scale", n.name, f"scale has non-positive or non-finite values (min {float(scale.min()):g})"))
    if zp is None:
        if len(n.input) <= 2 or not n.input[2]:
            out.append(Violation("int8", n.name, "no zero-point input, so the type defaults to uint8; TensorRT needs int8"))
        else:
            out.append(Violation("zero-point", n.name, f"zero-point {n.input[2]!r} is not a constant"))
    else:
        if zp.dtype != np.int8:
            out.append(Violation("int8", n.name, f"{zp.dtype} quantization; TensorRT needs int8 (symmetric, zero-point 0)"))
        if np.any(zp != 0):
            out.append(Violation("zero-point", n.name, f"zero-point {int(zp.flat[np.flatnonzero(zp)[0]])} != 0: "
                                 "TensorRT supports only symmetric quantization"))  # fmt: skip
    if scale is not None and scale.size > 1:
        axis = attr(n, "axis", 1)
        weight_of = [c for c in g.consumers.get(n.output[0], []) if WEIGHT_CONSUMERS.get(c.op_type) is not None
                     and len(c.input) > WEIGHT_CONSUMERS[c.op_type] and c.input[WEIGHT_CONSUMERS[c.op_type]] == n.output[0]]  # fmt: skip
        if x is None and not weight_of:
            out.append(Violation("per-tensor-activations", n.name, f"activation quantized per channel ({scale.size} "
                                 "scales); TensorRT needs one scale per activation tensor"))  # fmt: skip
        elif axis != 0:
            out.append(Violation("weight-axis", n.name, f"per-channel weight scales on axis {axis}; TensorRT needs "
                                 "axis 0 (output channels)"))  # fmt: skip
    return out


def _from_dq(g: Graph, tensor: str) -> bool:
    p = g.producer.get(tensor)
    return p is not None and p.op_type == "DequantizeLinear"


def _is_constant(g: Graph, tensor: str) -> bool:
    p = g.producer.get(tensor)
    return g.is_const(tensor) or (p is not None and p.op_type == "DequantizeLinear" and g.is_const(p.input[0]))


def _check_residual_add(g: Graph, n: onnx.NodeProto) -> list[Violation]:
    """An Add of two activations (not a bias) is a residual connection."""
    computed = [i for i in n.input if i and not _is_constant(g, i)]
    if len(computed) < 2:
        return []
    missing = [i for i in computed if not _from_dq(g, i)]
    if not missing:
        return []
    return [Violation("residual-add", n.name, f"input {m!r} of the residual Add is not quantized (no DequantizeLinear "
                      "before it); quantize both inputs so TensorRT fuses the Add into the int8 Conv") for m in missing]  # fmt: skip


def _check_fusion_breaks(g: Graph, qdq: list[onnx.NodeProto]) -> list[Violation]:
    """Conv/BN -> Q -> DQ -> BN/ReLU: the pair splits a Conv+BN+ReLU fusion."""
    out = []
    for q in (n for n in qdq if n.op_type == "QuantizeLinear"):
        src = g.producer.get(q.input[0])
        if src is None or src.op_type not in ("Conv", "BatchNormalization"):
            continue
        for dq in g.consumers.get(q.output[0], []):
            if dq.op_type != "DequantizeLinear":
                continue
            for c in g.consumers.get(dq.output[0], []):
                if c.op_type in FUSED_AFTER_CONV and not (src.op_type == "BatchNormalization" and c.op_type == "BatchNormalization"):
                    out.append(Violation("fusion", q.name, f"Q/DQ between {src.op_type} {src.name!r} and {c.op_type} "
                                         f"{c.name!r} breaks the Conv+BN+ReLU fusion; quantize after {c.op_type}"))  # fmt: skip
    return out


def summary(model: onnx.ModelProto, violations: list[Violation]) -> dict:
    """What the build report records."""
    ops = [n.op_type for n in model.graph.node]
    return {
        "passed": not any(v.severity == "error" for v in violations),
        "quantize_linear": ops.count("QuantizeLinear"),
        "dequantize_linear": ops.count("DequantizeLinear"),
        "errors": [str(v) for v in violations if v.severity == "error"],
        "warnings": [str(v) for v in violations if v.severity == "warning"],
    }
