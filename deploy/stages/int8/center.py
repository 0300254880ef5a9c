"""Centred activations for the tensorrt form's symmetric int8 (`quantize.center_activations`).

TensorRT takes int8 activations with zero-point 0 only, so a ReLU6 output calibrated to [0, a] is quantized with
the scale a/127 and uses the codes 0..127: half the grid. Where such an activation y = Clip(x, 0, hi) (or Relu)
reads the only output of a Conv, and every reader of y, directly or through GlobalAveragePool / Flatten, is a Conv
without padding or a Gemm, the graph computes y - c instead, with c = a/2:

    the Conv's bias b -> b - c,   Clip(x, 0, hi) -> Clip(x, -c, hi - c),   each reader's bias b' -> b' + c * W 1

(W 1: the sum of each output's weights). The function is the same, every node keeps its type (Conv + Clip still
fuse in TensorRT), and the quantized tensor's range is [-c, c]: scale c/127, all 255 codes, and y = 0 still exact
(code -127), the resolution of uint8 with a zero-point. A padded reader (a depthwise conv) would take its border
zeros for y = c, so activations that one reads stay as they are. The new ranges are the calibrated ones, shifted:
there is no second calibration.

The int8 reader computes W_q (y - c): its bias must take back c W_q 1, not c W 1, or the weights' rounding error,
summed over the inputs and times c, becomes a per-channel offset (docs/int8.md). The centred model records its
shifts in its metadata (META), and compensate() sets each int8 reader's bias from its int8 weights: quantize()
after every quantization of such a model, AdaRound whenever it changes them; bias correction and AdaRound take
the readers' errors as those of the uncentred activations (offsets()).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ...onnx_graph import Graph, attr, drop_unused

# between the activation and its readers: ops through which y - c stays (y - c) elementwise
PASS_THROUGH = {"GlobalAveragePool", "Flatten"}
META = "edge_deploy.centred_activations"  # a centred model's shifts: {quantized tensor: c}, as JSON


@dataclass
class _Site:
    producer: onnx.NodeProto  # the Conv whose bias takes -c
    act: onnx.NodeProto  # Relu, or Clip with min 0
    tensors: list[str]  # what the shift changes: the Conv's output, the activation's, the pass-through outputs
    readers: list[onnx.NodeProto]  # Conv/Gemm reading tensors[-1], the quantized tensor, as their input 0


def _bias(gr: Graph, node: onnx.NodeProto) -> np.ndarray | None:
    """The node's constant bias (the exporter may share one between nodes: _set gives each its own), or None."""
    return gr.const(node.input[2]) if len(node.input) > 2 and node.input[2] in gr.inits else None


def _reader_ok(gr: Graph, node: onnx.NodeProto, tensor: str) -> bool:
    if node.input[0] != tensor or tensor in node.input[1:] or _bias(gr, node) is None or not gr.is_const(node.input[1]):
        return False
    if node.op_type == "Gemm":
        return attr(node, "transB", 0) == 1 and attr(node, "transA", 0) == 0 and attr(node, "alpha", 1.0) == 1.0
    return node.op_type == "Conv" and not any(attr(node, "pads", [])) and attr(node, "auto_pad", b"NOTSET") in (
        b"NOTSET", b"VALID")  # fmt: skip


def sites(model: onnx.ModelProto) -> list[_Site]:
    """The activations that can be centred, in graph order."""
    gr = Graph(model)
    out = []
    for act in model.graph.node:
        if act.op_type == "Relu":
            low = 0.0
        elif act.op_type == "Clip" and len(act.input) > 1 and act.input[1] and gr.is_const(act.input[1]):
            low = float(gr.const(act.input[1]))
        else:
            continue
        producer = gr.producer.get(act.input[0])
        if low != 0.0 or producer is None or producer.op_type != "Conv" or _bias(gr, producer) is None:
            continue
        if gr.only_consumer(act.input[0], act.op_type) is None:
            continue
        tensors = [act.input[0], act.output[0]]
        while (nxt := gr.consumers.get(tensors[-1], [])) and len(nxt) == 1 and nxt[0].op_type in PASS_THROUGH \
                and tensors[-1] not in gr.outputs:  # fmt: skip
            tensors.append(nxt[0].output[0])
        readers = gr.consumers.get(tensors[-1], [])
        if readers and tensors[-1] not in gr.outputs and all(_reader_ok(gr, r, tensors[-1]) for r in readers):
            out.append(_Site(producer, act, tensors, readers))
    return out


def _set(gr: Graph, node: onnx.NodeProto, k: int, value: np.ndarray) -> None:
    """Input `k` of `node` becomes a new initializer holding `value` (the old one may be shared: Clip's bounds)."""
    node.input[k] = gr.add_const(f"{node.name or node.op_type}_centred", value.astype(np.float32))


def center(model: onnx.ModelProto, amax: dict[str, float]) -> dict[str, float]:
    """Centre, in place, every site whose quantized tensor has a calibrated range `amax` (its largest magnitude);
    returns the shift c of each centred site, by quantized tensor."""
    gr = Graph(model)
    shifts = {}
    for s in sites(model):
        hi = float(gr.const(s.act.input[2])) if s.act.op_type == "Clip" and len(s.act.input) > 2 and \
            s.act.input[2] else np.inf  # fmt: skip
        c = min(amax.get(s.tensors[-1], 0.0), hi) / 2
        if not c > 0:
            continue
        _set(gr, s.producer, 2, _bias(gr, s.producer) - c)
        s.act.op_type = "Clip"  # a Relu becomes Clip(x - c, -c)
        del s.act.input[1:]
        s.act.input.append(gr.add_const(f"{s.act.name}_min", np.array(-c, np.float32)))
        if np.isfinite(hi):
            s.act.input.append(gr.add_const(f"{s.act.name}_max", np.array(hi - c, np.float32)))
        for r in s.readers:
            w = gr.const(r.input[1])
            _set(gr, r, 2, _bias(gr, r) + c * w.reshape(len(w), -1).sum(1))
        gr.index()
        shifts[s.tensors[-1]] = c
    drop_unused(gr)  # the replaced biases and bounds
    if shifts:
        onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, META: json.dumps(shifts)})
    return shifts


def offsets(fp32: onnx.ModelProto) -> dict[str, float]:
    """The shift c of each reader's input in a centred model (by node name); empty for any other model."""
    shifts = json.loads(next((p.value for p in fp32.metadata_props if p.key == META), "{}"))
    gr = Graph(fp32)
    return {r.name: c for t, c in shifts.items() for r in gr.consumers.get(t, [])}


def int8_bias(qmodel: onnx.ModelProto, fp32: onnx.ModelProto) -> dict[str, tuple[str, np.ndarray]]:
    """Per reader of a centred `fp32` that `qmodel` computes with int8 weights and a float bias: its bias initializer
    and the bias that takes back c W_q 1 (the fp32 bias, which took back c W 1, plus c (W_q - W) 1)."""
    shift = offsets(fp32)
    if not shift:
        return {}
    q, f = Graph(qmodel), Graph(fp32)
    refs = {n.name: n for n in fp32.graph.node if n.name in shift}
    out = {}
    for node in qmodel.graph.node:
        dq = q.producer.get(node.input[1]) if node.name in shift and len(node.input) > 2 else None
        if dq is None or dq.op_type != "DequantizeLinear" or node.input[2] not in q.inits:
            continue
        ref = refs[node.name]
        w, scale, axis = q.const(dq.input[0]), q.const(dq.input[1]), attr(dq, "axis", 1)
        if scale.ndim:
            scale = scale.reshape([-1 if d == axis else 1 for d in range(w.ndim)])
        residue = (w * scale - f.const(ref.input[1])).reshape(len(w), -1).sum(1)
        out[node.name] = (node.input[2], (f.const(ref.input[2]) + shift[node.name] * residue).astype(np.float32))
    return out


def compensate(qmodel: onnx.ModelProto, fp32: onnx.ModelProto) -> int:
    """Set the bias of each int8 reader of a centred `fp32` from its int8 weights (int8_bias); returns how many."""
    biases = int8_bias(qmodel, fp32)
    inits = {i.name: i for i in qmodel.graph.initializer}
    for name, value in biases.values():
        inits[name].CopyFrom(numpy_helper.from_array(value, name))
    return len(biases)


def center_ranges(model: onnx.ModelProto, ranges: dict) -> dict:
    """Centre `model` in place from the calibrated `ranges` (onnxruntime's TensorsData values, `range_value`) and
    shift those ranges to match: each centred tensor gets [-c, c], the tensors before it on its chain move by -c.
    Returns the record ("activations": how many were centred, "candidates", "shift")."""
    found = sites(model)
    shifts = center(model, {k: float(np.abs(v.range_value).max()) for k, v in ranges.items()})
    record = {"activations": len(shifts), "candidates": len(found)}
    for s in found:
        c = shifts.get(s.tensors[-1])
        for t in [t for t in s.tensors if c and t in ranges]:
            lo, hi = ranges[t].range_value
            ranges[t].lowest, ranges[t].highest = (np.float32(-c), np.float32(c)) if t == s.tensors[-1] else \
                (np.float32(lo - c), np.float32(hi - c))  # fmt: skip
    if shifts:
        c = np.array(list(shifts.values()))
        record["shift"] = {"min": float(c.min()), "median": float(np.median(c)), "max": float(c.max())}
    return record
