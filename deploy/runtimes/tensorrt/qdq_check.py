"""TensorRT's ONNX operator support and explicit-quantization rules, checked on the CPU against an ONNX graph.

Operators (`operators()`, fp32 and int8 graphs alike): every node against onnx-tensorrt's support table
(OPERATOR_TABLE): its op, the types of its data inputs, and the attributes and inputs TensorRT cannot take.
An op outside the table is an error: the parser may still take it, but nothing here has checked that.

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

from ...errors import DeployError
from ...onnx_graph import Graph, attr

# Rules whose violation TensorRT still builds, only slower (lost fusions); the others it rejects or
# computes differently from the ONNX model.
PERFORMANCE_RULES = {"residual-add", "fusion"}
QOPERATOR_OPS = {"ConvInteger", "MatMulInteger", "QGemm", "DynamicQuantizeLinear"}

# onnx-tensorrt docs/operators.md on its 10.1-GA branch (commit 96e7811, 2024-06-17; the table is headed "TensorRT
# 10.0", opsets 9 to 20), for the ops compact CNN graphs use: op -> the types TensorRT takes on its data inputs.
OPERATOR_TABLE = "onnx-tensorrt docs/operators.md, 10.1-GA (96e7811)"
_F = ("FP32", "FP16", "BF16")
_FI = (*_F, "INT32", "INT64")
_FIB = (*_FI, "BOOL")
SUPPORTED_TYPES = {
    "Add": _FI, "AveragePool": _F, "BatchNormalization": _F, "Cast": (*_FI, "UINT8", "BOOL"), "Clip": _F,
    "Concat": _FIB, "Constant": _FIB, "Conv": _F, "DequantizeLinear": ("INT8", "FP8", "INT4"), "Div": _FI,
    "Dropout": _F, "Erf": _F, "Flatten": _FIB, "Gather": _FIB, "Gemm": _F, "GlobalAveragePool": _F,
    "HardSigmoid": _F, "HardSwish": _F, "Identity": _FIB, "MatMul": _F, "Max": _FI, "MaxPool": _F, "Min": _FI,
    "Mul": _FI, "Pad": _FI, "QuantizeLinear": _F, "ReduceMean": _FI, "Relu": _FI, "Reshape": _FIB, "Resize": _F,
    "Shape": _FIB, "Sigmoid": _F, "Slice": _FIB, "Softmax": _F, "Split": _FIB, "Squeeze": _FIB, "Sub": _FI,
    "Sum": _FI, "Tanh": _F, "Transpose": _FIB, "Unsqueeze": _FIB,
}  # fmt: skip
# ops whose every input is data (the others: input 0; shapes, axes, indices and scales are not)
_ALL_INPUTS = {"Add", "Concat", "Div", "Max", "Min", "Mul", "Sub", "Sum"}
# The table's restrictions, as (input index that must be a constant) per op.
_CONSTANT_INPUTS = {"Pad": (3, "axes"), "ReduceMean": (1, "axes"), "Slice": (3, "axes"), "Squeeze": (1, "axes"),
                    "Unsqueeze": (1, "axes"), "Dropout": (2, "training_mode")}  # fmt: skip
_RESIZE = {"coordinate_transformation_mode": ("half_pixel", {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn",
                                                             "asymmetric", "align_corners"}),
           "mode": ("nearest", {"nearest", "linear"}),
           "nearest_mode": ("round_prefer_floor", {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}),
           "keep_aspect_ratio_policy": ("stretch", {"stretch"})}  # fmt: skip
_TYPE_NAMES = {onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16",
               onnx.TensorProto.FLOAT8E4M3FN: "FP8", onnx.TensorProto.DOUBLE: "DOUBLE"}  # fmt: skip
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


def _type_name(t: int) -> str:
    return _TYPE_NAMES.get(t, onnx.TensorProto.DataType.Name(t))


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor whose type is known (QuantizeLinear outputs take their zero-point's type)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # noqa: BLE001 - inference fails on some hand-edited graphs; types then stay partial
        inferred = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.input, *inferred.value_info, *inferred.output]}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            types[n.output[0]] = n.attribute[0].t.data_type
        elif n.op_type == "QuantizeLinear":
            types[n.output[0]] = types.get(n.input[2], onnx.TensorProto.UINT8) if len(n.input) > 2 and n.input[2] \
                else onnx.TensorProto.UINT8  # fmt: skip
    return {k: v for k, v in types.items() if v}


def operators(model: onnx.ModelProto) -> list[Violation]:
    """Every node TensorRT's ONNX parser would refuse per OPERATOR_TABLE: unknown ops, input types it does not
    take, restricted attributes and inputs; for fp32 and QDQ graphs alike."""
    g, types, out = Graph(model), _tensor_types(model), []
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx") or n.op_type not in SUPPORTED_TYPES:
            if not (n.op_type.startswith("QLinear") or n.op_type in QOPERATOR_OPS):  # rule "qoperator" says why
                op = f"{n.domain}.{n.op_type}" if n.domain else n.op_type
                out.append(Violation("unknown-op", n.name, f"{op} is not in the operator table checked here "
                                     f"({OPERATOR_TABLE}); check that TensorRT takes it"))  # fmt: skip
            continue
        allowed = SUPPORTED_TYPES[n.op_type]
        for k, name in enumerate(n.input if n.op_type in _ALL_INPUTS else n.input[:1]):
            p = g.producer.get(name)
            if not name or name not in types or (p is not None and p.op_type == "QuantizeLinear"):
                continue  # an activation Q -> DQ pair: rule "int8" judges its type on both nodes
            if _type_name(types[name]) not in allowed:
                out.append(Violation("op-type", n.name, f"{n.op_type} input {k} ({name!r}) is {_type_name(types[name])}; "
                                     f"TensorRT takes {', '.join(allowed)} ({OPERATOR_TABLE})"))  # fmt: skip
        out += [Violation("op-restriction", n.name, m) for m in _restrictions(g, n)]
    return out


def _restrictions(g: Graph, n: onnx.NodeProto) -> list[str]:
    """The table's restrictions on `n` that it breaks."""
    out = []
    if n.op_type in _CONSTANT_INPUTS:
        k, what = _CONSTANT_INPUTS[n.op_type]
        if len(n.input) > k and n.input[k] and g.const(n.input[k]) is None:
            out.append(f"{n.op_type} `{what}` must be an initializer")
        elif n.op_type == "Dropout" and len(n.input) > k and n.input[k] and bool(np.any(g.const(n.input[k]))):
            out.append("Dropout `training_mode` must be False")
    if n.op_type in ("AveragePool", "MaxPool"):
        if len(attr(n, "kernel_shape", [])) not in (2, 3):
            out.append(f"{n.op_type}: 2D or 3D pooling only")
        if any(d != 1 for d in attr(n, "dilations", [])):
            out.append(f"{n.op_type} `dilations` must be empty or all ones")
        if n.op_type == "MaxPool" and len(n.output) > 1 and n.output[1]:
            out.append("MaxPool `Indices` output is unsupported")
    if n.op_type == "Constant" and n.attribute[0].name in ("sparse_value", "value_string", "value_strings"):
        out.append(f"Constant `{n.attribute[0].name}` is unsupported")
    if n.op_type == "Resize":
        for a, (default, ok) in _RESIZE.items():
            value = attr(n, a, default)
            value = value.decode() if isinstance(value, bytes) else value
            if value not in ok:
                out.append(f"Resize {a} {value!r} is unsupported (TensorRT takes {', '.join(sorted(ok))})")
        if attr(n, "antialias", 0):
            out.append("Resize antialiasing is unsupported")
    return out


def check(model: onnx.ModelProto) -> list[Violation]:
    """Every violation of TensorRT's operator table and Q/DQ rules in the QDQ `model`, in graph order (for an fp32
    model, `operators`)."""
    g = Graph(model)
    out: list[Violation] = operators(model)
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


def refuse_errors(model: onnx.ModelProto, path: Path, quantized: bool) -> None:
    """A one-line DeployError when TensorRT would refuse `model`: its Q/DQ rules (quantized) or operator table."""
    errors = [v for v in (check(model) if quantized else operators(model)) if v.severity == "error"]
    if errors:
        raise DeployError(f"{path} breaks TensorRT's {'Q/DQ rules' if quantized else 'operator table'} "
                          f"({len(errors)} errors; first: {errors[0]}); run `deploy check-qdq {path}`")  # fmt: skip


def _check_qdq_node(g: Graph, n: onnx.NodeProto) -> list[Violation]:
    out = []
    scale = g.const(n.input[1])
    zp = g.const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
    x = g.const(n.input[0]) if n.op_type == "DequantizeLinear" else None
    if x is not None and x.dtype not in (np.int8, np.uint8):
        return out  # an int32 bias (quantize_static's QuantizeBias): rule "op-type" refuses its DequantizeLinear
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
        "operator_table": OPERATOR_TABLE,
    }
