"""Pad the channels of depthwise convolutions to a multiple of 16 with zero channels, on the fp32 ONNX graph.

ONNX Runtime's int8 depthwise kernel (QLinearConv, MLAS) runs much slower when the channel count is not a
multiple of 16: on mobilenet_v3_small at 224 px its 72-, 88- and 120-channel depthwise convs take 3x the time
of the fp32 ones, while its 96-, 144-, 240- and 576-channel ones take about the same (ORT's profiler,
benchmarks/int8_speed_mobilenet_v3.py). fp32 NCHWc convs pad to the vector width internally; the int8 path
does not, and onnxruntime.quantization has no option for it, hence this rewrite.

A region is every tensor connected to a depthwise conv through channel-wise ops (depthwise convs, unary
activations, GlobalAveragePool, Mul/Add of two region tensors: the squeeze-excite pattern). It is entered
through group-1 convs (their weights and bias get zero output channels) and left through group-1 convs (their
weights get zero input channels), so the added channels never reach a value outside the region: the model
computes the same outputs. A region with any other producer or consumer (a graph input or output, Concat,
Reshape, a constant operand) or a conv of another channel count is left alone.
"""

from __future__ import annotations

import numpy as np
import onnx

from ...core.context import PREPARED, Build
from ...onnx_graph import Graph, attr, drop_unused
from . import check_prepared

MULTIPLE = 16
_UNARY = {"Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "LeakyRelu", "Identity", "GlobalAveragePool"}


def _kind(gr: Graph, node: onnx.NodeProto) -> str | None:
    """"dw" (depthwise conv), "conv" (group-1 conv), "unary", "binary" or None (not channel-wise)."""
    if node.op_type == "Conv" and gr.const(node.input[1]) is not None:
        w, group = gr.const(node.input[1]), attr(node, "group", 1)
        if group == 1:
            return "conv"
        return "dw" if w.shape[1] == 1 and group == w.shape[0] else None
    if node.op_type in _UNARY:
        return "unary" if all(i == node.input[0] or i in gr.inits or not i for i in node.input) else None
    if node.op_type in ("Mul", "Add") and not any(i in gr.inits for i in node.input):
        return "binary"
    return None


def _region(gr: Graph, start: str) -> tuple[set[str], set[tuple[str, str]]] | None:
    """(nodes inside, boundary convs as ("out" | "in", name)) of the region of tensor `start`, or None."""
    tensors, inside, boundary, todo = {start}, set(), set(), [start]
    while todo:
        t = todo.pop()
        if t in gr.outputs or t not in gr.producer:
            return None
        for node, role in [(gr.producer[t], "out"), *((c, "in") for c in gr.consumers.get(t, []))]:
            kind = _kind(gr, node)
            if kind is None or (kind == "conv" and role == "in" and node.input[0] != t):
                return None
            if kind == "conv":
                boundary.add((role, node.name))
                continue
            inside.add(node.name)
            for x in [*node.input[: 2 if kind == "binary" else 1], node.output[0]]:
                if x not in tensors:
                    tensors.add(x)
                    todo.append(x)
    return inside, boundary


def _pad(gr: Graph, node: onnx.NodeProto, k: int, axis: int, extra: int) -> None:
    """Replace input k of `node` by a copy with `extra` zero slices appended on `axis`."""
    value = gr.const(node.input[k])
    width = [(0, 0)] * value.ndim
    width[axis] = (0, extra)
    node.input[k] = gr.add_const(f"{node.input[k]}_padded", np.pad(value, width))


def pad_depthwise(model: onnx.ModelProto, multiple: int = MULTIPLE) -> dict[str, int]:
    """Pad every depthwise conv whose channels are not a multiple of `multiple`, in place (see the module
    docstring); returns {depthwise conv name: channels after padding}."""
    gr = Graph(model)
    done: dict[str, int] = {}
    nodes = {n.name: n for n in model.graph.node}  # padding edits nodes in place: names and objects stay valid
    for node in list(model.graph.node):
        if _kind(gr, node) != "dw" or gr.const(node.input[1]).shape[0] % multiple == 0:
            continue
        found = _region(gr, node.input[0])
        channels = gr.const(node.input[1]).shape[0]
        # every conv of the region has `channels` on the side that touches it (else it is not one we understand)
        # sorted: set order changes between processes, and the padded graph must be byte-reproducible
        convs = [*(("dw", n) for n in sorted(found[0]) if _kind(gr, nodes[n]) == "dw"), *sorted(found[1])] if found else []
        if not convs or any(gr.const(nodes[n].input[1]).shape[side == "in"] != channels for side, n in convs):
            continue
        extra = -channels % multiple
        for side, name in convs:
            n = nodes[name]
            if side == "in":
                _pad(gr, n, 1, 1, extra)  # zero input channels of the weights
                continue
            for k in range(1, len(n.input)):  # zero output channels of the weights and bias
                _pad(gr, n, k, 0, extra)
            if side == "dw":
                next(a for a in n.attribute if a.name == "group").i = channels + extra
                done[name] = channels + extra
        gr.index()
    drop_unused(gr)
    del model.graph.value_info[:]  # shapes changed inside the regions; ORT and onnx re-infer them
    return done


def unpadded_depthwise(model: onnx.ModelProto, multiple: int = MULTIPLE) -> int:
    """How many depthwise convs have a channel count that is not a multiple of `multiple`."""
    gr = Graph(model)
    return sum(_kind(gr, n) == "dw" and gr.const(n.input[1]).shape[0] % multiple != 0 for n in model.graph.node)


class PadDepthwise:
    name = "pad_depthwise"

    def applies(self, b: Build) -> bool:
        q = b.recipe.quantize
        return q.enabled and q.target == "ort-cpu" and q.pad_depthwise and \
            unpadded_depthwise(onnx.load(str(b.source))) > 0  # fmt: skip

    def run(self, b: Build) -> str:
        model = onnx.load(str(b.source))
        padded = pad_depthwise(model)
        diff = 0.0
        if padded:
            out = b.workdir / PREPARED
            tmp = out.with_suffix(".tmp")  # the source may be `out` (equalized, or from QAT)
            onnx.save(model, str(tmp))
            diff = check_prepared(b, b.source, tmp)
            tmp.replace(out)
            b.source = out
        b.report["pad_depthwise"] = {"convs": padded, "max_abs_logit_diff": diff}
        return f"{len(padded)} depthwise convs padded to a multiple of {MULTIPLE} channels, max |logit diff| {diff:.1e}"
