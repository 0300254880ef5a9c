"""Rewrites of a QDQ model around h-swish, h-sigmoid and squeeze-excite, so ONNX Runtime's CPU kernels stay in int8.

ORT's QDQ fusions (qdq_selector_action_transformer.cc) turn DQ -> op -> Q into an int8 kernel for Conv,
Gemm, MatMul, Add, Mul, GlobalAveragePool, AveragePool, Sigmoid, LeakyRelu, Softmax and Concat, but not
for HardSwish or HardSigmoid: those run in float between a DequantizeLinear and a QuantizeLinear (four
float passes over the tensor; on mobilenet_v3_small they cost about as much as all its int8 convolutions).
onnxruntime.quantization has no option for this, so these rewrites express both activations in ops ORT
does fuse, with the same ONNX semantics up to one rounding step:

- h-swish  x * clip(x + 3, 0, 6) / 6  ->  Add(x, 3) -> Q(scale t/255, zero-point 0) -> DQ(scale t/(6*255)) -> Mul(x, .)
  with t = 6, or x's largest value + 3 when smaller (a finer grid). The uint8 Q saturates at 0 and t, so it
  *is* the clip; reading it back with a 6x smaller scale is the /6. ORT runs QLinearAdd + QLinearMul on uint8.
- h-sigmoid after a Conv (the squeeze-excite gate)  clip(alpha*z + beta, 0, 1)  ->  the Conv's int32 bias gets
  beta/alpha added and the gate's own Q (calibrated on [0, <=1], zero-point 0) reads the Conv output with
  its scale divided by alpha: it saturates like the clip and its DQ returns alpha*z + beta on the gate's
  calibrated grid. The gate costs nothing beyond the QLinearConv; the excite Mul fuses to QLinearMul.

Both need uint8 activations with a free zero-point (the ort-cpu form). The tensorrt form keeps the activations
in float after their Conv instead (TensorRT fuses Conv + activation), see quantize.py.

The stem (stem_nodes, float_stem_pays) is the other placement choice for ORT's CPU kernels: its int8 convs are
slower than its fp32 NCHWc ones for the 3-channel stem conv and depthwise convs, and fp32 fuses h-swish into
the conv, so a stem kept in float is faster where it leaves through a single tensor.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...onnx_graph import Graph, attr, drop_unused

Q, DQ = "QuantizeLinear", "DequantizeLinear"


def _insert_before(g: onnx.GraphProto, anchor: onnx.NodeProto, nodes: list[onnx.NodeProto]) -> None:
    """Insert `nodes` where `anchor` is, keeping the node list topologically sorted."""
    at = list(g.node).index(anchor)
    for k, n in enumerate(nodes):
        g.node.insert(at + k, n)


def hardswish_to_add_mul(model: onnx.ModelProto) -> int:
    """Rewrite every DQ -> HardSwish -> Q on uint8 activations as QDQ Add + Mul (see the module docstring).
    Returns the number rewritten."""
    gr = Graph(model)
    count = 0
    for hs in [n for n in gr.g.node if n.op_type == "HardSwish"]:
        src = gr.producer.get(hs.input[0])
        if src is None or src.op_type != DQ or not gr.uint8_dq(src) or not gr.only_consumer(hs.output[0], Q):
            continue
        # x + 3 is quantized over [0, top]: top = 6 (the clip) or less when x never gets that high
        top = min(6.0, float(gr.const(src.input[1])) * (255 - int(gr.const(src.input[2]))) + 3)
        if top <= 0:
            continue
        x, base = hs.input[0], hs.name or hs.output[0]
        zero = gr.add_const(f"{base}/zero_u8", np.array(0, np.uint8))
        three = gr.fresh(f"{base}/three")
        shifted, shifted_q, gate = (gr.fresh(f"{base}/{s}") for s in ("x_plus_3", "x_plus_3_q", "gate"))
        nodes = [
            helper.make_node(DQ, [gr.add_const(f"{base}/three_q", np.array(3, np.uint8)),
                                  gr.add_const(f"{base}/one", np.array(1.0, np.float32)),
                                  zero], [three],
                             name=gr.fresh(f"{base}/three_dq")),  # fmt: skip
            helper.make_node("Add", [x, three], [shifted], name=gr.fresh(f"{base}/add")),
            # saturating uint8 quantization over [0, top]: the clip of h-sigmoid
            helper.make_node(Q, [shifted, gr.add_const(f"{base}/top_over_255", np.array(top / 255, np.float32)),
                                 zero], [shifted_q], name=gr.fresh(f"{base}/clip_q")),  # fmt: skip
            # read back with a 6x smaller scale: the /6 of h-sigmoid
            helper.make_node(DQ, [shifted_q, gr.add_const(f"{base}/gate_scale", np.array(top / 255 / 6, np.float32)),
                                  zero], [gate], name=gr.fresh(f"{base}/gate_dq")),  # fmt: skip
            helper.make_node("Mul", [x, gate], [hs.output[0]], name=gr.fresh(f"{base}/mul")),
        ]
        _insert_before(gr.g, hs, nodes)
        gr.g.node.remove(hs)
        count += 1
    gr.index()
    return count


def fold_hardsigmoid_into_conv(model: onnx.ModelProto) -> int:
    """Rewrite every Conv -> Q -> DQ -> HardSigmoid -> Q -> DQ... on uint8 activations (the squeeze-excite
    gate) so the h-sigmoid is the Conv's bias and its output quantization (see the module docstring).
    Returns the number rewritten."""
    gr = Graph(model)
    count = 0
    for hsig in [n for n in gr.g.node if n.op_type == "HardSigmoid"]:
        chain = _conv_chain(gr, hsig)
        if chain is None:
            continue
        conv, bias_dq, q_in, dq_in, q_out = chain
        alpha, beta = attr(hsig, "alpha", 0.2), attr(hsig, "beta", 0.5)
        if alpha <= 0:
            continue
        bias_q, bias_scale = gr.const(bias_dq.input[0]), gr.const(bias_dq.input[1])
        new_bias = bias_q.astype(np.float64) + np.rint((beta / alpha) / bias_scale.astype(np.float64))
        if np.abs(new_bias).max() >= 2**31:  # bias scale too fine for int32 to hold beta/alpha
            continue
        new_bias = new_bias.astype(np.int32)
        base = hsig.name or hsig.output[0]
        bias_out = gr.fresh(f"{base}/conv_bias")
        new_bias_dq = helper.make_node(DQ, [gr.add_const(f"{base}/conv_bias_q", new_bias), *bias_dq.input[1:]],
                                       [bias_out], name=gr.fresh(f"{base}/conv_bias_dq"))
        new_bias_dq.attribute.extend(bias_dq.attribute)  # the per-channel axis
        _insert_before(gr.g, conv, [new_bias_dq])
        conv.input[2] = bias_out
        # The gate's Q keeps its calibrated grid (scale s, zero-point 0: [0, 255 s], 255 s <= 1) and now reads the
        # Conv output z + beta/alpha with scale s/alpha: it saturates like the clip, its DQ returns alpha*z + beta.
        q_out.input[0] = conv.output[0]
        q_out.input[1] = gr.add_const(f"{base}/scale_over_alpha", (gr.const(q_out.input[1]) / alpha).astype(np.float32))
        for n in (q_in, dq_in, hsig):
            gr.g.node.remove(n)
        gr.index()
        count += 1
    drop_unused(gr)
    return count


def _conv_chain(gr: Graph, hsig: onnx.NodeProto):
    """(Conv, its bias DQ, Q, DQ, the Q after `hsig`) when `hsig` gates a uint8 QDQ Conv with an int32 bias."""
    dq_in = gr.producer.get(hsig.input[0])
    if dq_in is None or dq_in.op_type != DQ or not gr.uint8_dq(dq_in):
        return None
    q_in = gr.producer.get(dq_in.input[0])
    if q_in is None or q_in.op_type != Q or gr.only_consumer(q_in.output[0], DQ) is not dq_in \
            or gr.only_consumer(dq_in.output[0], "HardSigmoid") is not hsig:  # fmt: skip
        return None
    conv = gr.producer.get(q_in.input[0])
    if conv is None or conv.op_type != "Conv" or len(conv.input) < 3 or gr.only_consumer(conv.output[0], Q) is not q_in:
        return None
    bias_dq = gr.producer.get(conv.input[2])
    if bias_dq is None or bias_dq.op_type != DQ or gr.const(bias_dq.input[0]) is None \
            or gr.const(bias_dq.input[0]).dtype != np.int32 or gr.const(bias_dq.input[1]) is None:  # fmt: skip
        return None
    q_out = gr.only_consumer(hsig.output[0], Q)
    if q_out is None or gr.const(q_out.input[1]) is None or gr.const(q_out.input[1]).size != 1 \
            or len(q_out.input) < 3 or gr.const(q_out.input[2]) is None or gr.const(q_out.input[2]).dtype != np.uint8 \
            or np.any(gr.const(q_out.input[2]) != 0):  # fmt: skip
        return None
    return conv, bias_dq, q_in, dq_in, q_out


def rewrite_hard_activations(model: onnx.ModelProto) -> dict[str, int]:
    """Both rewrites above, in place; returns how many of each were made."""
    return {"hardswish": hardswish_to_add_mul(model), "hardsigmoid": fold_hardsigmoid_into_conv(model)}


def stem_nodes(model: onnx.ModelProto) -> list[str]:
    """The fp32 graph's nodes from the input up to (without) the first pointwise conv (1x1, group 1, output
    larger than 1x1: squeeze-excite convs do not count) or Gemm/MatMul: the stem and the first depthwise block.
    Empty when one of them has no name (onnxruntime's quantizer excludes nodes by name)."""
    shapes = _spatial_sizes(model)
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    ready = {i.name for i in model.graph.input} | set(weights) | {""}
    out = []
    for n in model.graph.node:
        if not all(i in ready for i in n.input) or n.op_type in ("Gemm", "MatMul"):
            continue
        if n.op_type == "Conv" and weights.get(n.input[1], [])[2:] == [1, 1] and attr(n, "group", 1) == 1 \
                and shapes.get(n.output[0], 0) > 1:  # fmt: skip
            continue
        out.append(n.name)
        ready.update(n.output)
    return out if all(out) else []


def float_stem_pays(model: onnx.ModelProto, nodes: list[str]) -> bool:
    """Whether keeping `nodes` (stem_nodes) in float is faster on ORT's CPU kernels, by the rule measured in
    benchmarks/int8_speed_mobilenet_v3.py: the float part leaves through exactly one tensor, so it costs one
    QuantizeLinear and ORT fuses it as a whole (ORT's fp32 NCHWc convs beat its int8 ones for 3-channel and
    depthwise convs and fuse h-swish for free). True for MobileNet v2/v3-small, EfficientNet-Lite0, MNASNet.
    False where the stem feeds a residual Add (mobilenet_v3_large, about even) or a channel split
    (ShuffleNetV2: ORT then moves the Q before the max-pool, which runs 10x slower on uint8 NCHW)."""
    inside = set(nodes)
    made = {o for n in model.graph.node if n.name in inside for o in n.output}
    leaving = {i for n in model.graph.node if n.name not in inside for i in n.input if i in made}
    leaving |= made & {o.name for o in model.graph.output}
    return len(leaving) == 1


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = onnx.shape_inference.infer_shapes(model)
    return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim][1:]  # without the (dynamic) batch
            for v in [*inferred.graph.value_info, *inferred.graph.output]}  # fmt: skip


def _spatial_sizes(model: onnx.ModelProto) -> dict[str, int]:
    return {k: int(np.prod(s[1:])) for k, s in _shapes(model).items() if len(s) == 3}


def own_constants(model: onnx.ModelProto, names: list[str]) -> int:
    """Give the nodes `names` (kept in float) their own copy of every initializer they share with other nodes,
    in place; returns the number of copies. Otherwise the quantizer feeds them the dequantized int8 tensor it
    makes for the others (exporters deduplicate equal tensors, e.g. the zero biases of a random-init model),
    which is no longer a constant and stops ORT from fusing and re-laying out those float convs."""
    keep = set(names)
    inits = {i.name: i for i in model.graph.initializer}
    users: dict[str, set[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            if i in inits:
                users.setdefault(i, set()).add(n.name)
    gr = Graph(model)
    copies = 0
    for n in model.graph.node:
        if n.name not in keep:
            continue
        for k, i in enumerate(n.input):
            if i in users and users[i] - keep:
                n.input[k] = gr.add_const(f"{i}_float", numpy_helper.to_array(inits[i]))
                copies += 1
    return copies



def float_inputs(model: onnx.ModelProto, names: list[str]) -> int:
    """Give each float Conv/ConvTranspose/Gemm of `names` that reads a dequantized activation its own
    DequantizeLinear with the same scale repeated per channel (axis 1); returns how many.

    ORT's WeightBiasQuantization optimizer (onnxruntime/core/optimizer/qdq_transformer) re-quantizes, per
    tensor, the float weights of any such node whose input comes from a per-tensor DequantizeLinear, when the
    session loads: a layer kept in float for accuracy (quantize.exclude, mixed precision) would run with worse
    int8 weights than the per-channel ones it was excluded from. A per-channel DequantizeLinear computes the
    same values and takes the node out of that pattern."""
    gr = Graph(model)
    count = 0
    for node in [n for n in model.graph.node if n.name in set(names)]:
        dq = gr.producer.get(node.input[0])
        w = gr.const(node.input[1]) if len(node.input) > 1 else None
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or dq is None or dq.op_type != DQ or w is None \
                or gr.const(dq.input[1]) is None or gr.const(dq.input[1]).size != 1 or attr(node, "transA", 0):  # fmt: skip
            continue
        if node.op_type == "Gemm":
            channels = w.shape[1] if attr(node, "transB", 0) else w.shape[0]
        else:
            channels = w.shape[0] if node.op_type == "ConvTranspose" else w.shape[1] * attr(node, "group", 1)
        scale = gr.add_const(f"{node.name}_input_scale", np.full(channels, gr.const(dq.input[1]).item(), np.float32))
        inputs = [dq.input[0], scale]
        if len(dq.input) > 2 and dq.input[2]:
            zp = gr.const(dq.input[2])
            inputs.append(gr.add_const(f"{node.name}_input_zero_point", np.full(channels, zp.item(), zp.dtype)))
        out = gr.fresh(f"{node.name}_input_dequantized")
        _insert_before(gr.g, node, [helper.make_node(DQ, inputs, [out], name=gr.fresh(f"{node.name}_input_DequantizeLinear"), axis=1)])
        node.input[0] = out
        count += 1
    drop_unused(gr)
    return count
