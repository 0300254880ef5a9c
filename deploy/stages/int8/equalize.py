"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization", arXiv:1906.04721) on the fp32 ONNX graph.

For a pair conv1 -> [activation] -> conv2, scaling conv1's output channel i by 1/s_i (its weights and bias)
and conv2's input channel i by s_i leaves the network unchanged when the path between them is positively
homogeneous: identity, ReLU, max/average pooling, and the squeeze-excite pattern (pooling -> fc1 absorbs
the scale too; the gate Mul commutes). With s_i = sqrt(r1_i / r2_i) (r1: range of conv1's output channel i,
r2: of conv2's input channel i) both channels end up with the range sqrt(r1_i * r2_i).

ReLU6 (Clip 0..6) does not commute with the scaling: clip(x/s, 0, 6) != clip(x, 0, 6)/s. relu6="exact"
rewrites it as Relu -> Min(6/s_i per channel), which is exact but leaves a per-channel Min that
onnxruntime's quantizer keeps in float; relu6="skip" leaves those pairs alone. h-swish, h-sigmoid and
residual Adds do not commute with the scaling either: those pairs are skipped.

onnxruntime.quantization has no equalization (its SmoothQuant pass needs neural-compressor and targets
MatMul activations); AIMET's implementation works on PyTorch modules, not on an ONNX graph from any
source, hence this module.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...core.context import PREPARED, Build
from ...errors import DeployError
from . import check_prepared
from ...onnx_graph import Graph, attr

# ops that commute with a positive per-channel scale of their (first) input and keep the channel axis
_COMMUTE = {"Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Identity", "Dropout"}


@dataclass
class _Pair:
    conv1: onnx.NodeProto
    absorbers: list[tuple[onnx.NodeProto, str]]  # (conv, "in": group-1 input channels | "dw": depthwise channels)
    mins: list[onnx.NodeProto] = field(default_factory=list)  # Min(x, per-channel constant) on the path
    kind: str = ""


class _Graph(Graph):
    """qdq_placement's graph index, able to give a node its own copy of a constant input."""

    def set_input(self, node: onnx.NodeProto, slot: int, value: np.ndarray) -> None:
        """Give `node` its own initializer holding `value` at input `slot` (exporters share equal tensors)."""
        old = node.input[slot]
        if old in self.inits and len([1 for n in self.g.node for i in n.input if i == old]) == 1:
            self.inits[old].CopyFrom(numpy_helper.from_array(value, old))
            return
        node.input[slot] = self.add_const(f"{old}_equalized", value)


def _conv_kind(gr: _Graph, conv: onnx.NodeProto) -> str | None:
    """"dw" (depthwise, multiplier 1), "pw" (1x1, group 1), "conv" (other group-1) or None (grouped)."""
    w = gr.const(conv.input[1])
    if w is None or w.ndim != 4:
        return None
    group = attr(conv, "group", 1)
    if group == 1:
        return "pw" if w.shape[2:] == (1, 1) else "conv"
    return "dw" if group == w.shape[0] and w.shape[1] == 1 else None


def _relu6(gr: _Graph, clip: onnx.NodeProto) -> bool | None:
    """True for Clip(0, 6)-like (min 0, finite max), False for Clip(0, inf) (a ReLU), None otherwise."""
    lo = gr.const(clip.input[1]) if len(clip.input) > 1 and clip.input[1] else attr(clip, "min", None)
    hi = gr.const(clip.input[2]) if len(clip.input) > 2 and clip.input[2] else attr(clip, "max", None)
    if lo is None or float(np.asarray(lo)) != 0.0:
        return None
    return hi is not None and np.isfinite(float(np.asarray(hi)))


def _trace(gr: _Graph, conv1: onnx.NodeProto, relu6: str) -> _Pair | str:
    """Where conv1's output channels go: the pair, or why the scale cannot be absorbed exactly."""
    pair = _Pair(conv1, [])
    clips: list[onnx.NodeProto] = []
    scaled = {conv1.output[0]}
    stack = [conv1.output[0]]
    while stack:
        tensor = stack.pop()
        if tensor in gr.outputs:
            return "reaches a graph output"
        for node in gr.consumers.get(tensor, []):
            op = node.op_type
            if op == "Conv" and node.input[0] == tensor:
                kind = _conv_kind(gr, node)
                if kind is None:
                    return "feeds a grouped conv"
                pair.absorbers.append((node, "dw" if kind == "dw" else "in"))
                continue
            if op in _COMMUTE and node.input[0] == tensor:
                pass
            elif op == "Clip" and _relu6(gr, node) is False:
                pass
            elif op == "Clip" and _relu6(gr, node):
                if relu6 != "exact":
                    return "ReLU6 (relu6: skip)"
                clips.append(node)
            elif op == "Min" and sum(i in scaled for i in node.input) == 1 and gr.const(node.input[1]) is not None:
                pair.mins.append(node)
            elif op == "Mul" and sum(i in scaled for i in node.input) == 1 and gr.const(node.input[0]) is None \
                    and gr.const(node.input[1]) is None:  # fmt: skip
                pass  # the squeeze-excite gate, computed through an absorbing fc1 from the same channels
            elif op == "Add":
                return "residual Add"
            else:
                return f"{op} after the conv"
            for out in node.output:
                if out not in scaled:
                    scaled.add(out)
                    stack.append(out)
    if not pair.absorbers:
        return "no conv after it"
    for clip in clips:
        pair.mins.append(_clip_to_relu_min(gr, clip, gr.const(conv1.input[1]).shape[0]))
    kinds = sorted({_conv_kind(gr, c) for c, _ in pair.absorbers})
    pair.kind = f"{_conv_kind(gr, conv1)}->{'+'.join(kinds)}"
    return pair


def _clip_to_relu_min(gr: _Graph, clip: onnx.NodeProto, channels: int) -> onnx.NodeProto:
    """Clip(x, 0, hi) -> Min(Relu(x), hi per channel), in place: the same function, with a per-channel bound."""
    hi = float(np.asarray(gr.const(clip.input[2]) if len(clip.input) > 2 and clip.input[2] else attr(clip, "max", 0)))
    base = clip.name or clip.output[0]
    relu_out = gr.fresh(f"{base}/relu")
    bound = gr.add_const(f"{base}/per_channel_max", np.full((1, channels, 1, 1), hi, np.float32))
    relu = helper.make_node("Relu", [clip.input[0]], [relu_out], name=gr.fresh(f"{base}/Relu"))
    mn = helper.make_node("Min", [relu_out, bound], [clip.output[0]], name=gr.fresh(f"{base}/Min"))
    at = list(gr.g.node).index(clip)
    gr.g.node.remove(clip)
    gr.g.node.insert(at, mn)
    gr.g.node.insert(at, relu)
    gr.index()
    return mn


def _ranges(gr: _Graph, pair: _Pair) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel weight ranges (max |w|) of conv1's outputs and of the absorbers' inputs."""
    w1 = gr.const(pair.conv1.input[1])
    r1 = np.abs(w1).reshape(w1.shape[0], -1).max(1)
    r2 = np.zeros_like(r1)
    for conv, how in pair.absorbers:
        w = np.abs(gr.const(conv.input[1]))
        r2 = np.maximum(r2, w.reshape(w.shape[0], -1).max(1) if how == "dw" else w.max(axis=(0, 2, 3)))
    return r1, r2


def _apply(gr: _Graph, pair: _Pair, s: np.ndarray) -> None:
    """conv1 output channel i / s_i, absorbers' input channel i * s_i, per-channel Min bounds / s_i."""
    conv1 = pair.conv1
    gr.set_input(conv1, 1, gr.const(conv1.input[1]) / s[:, None, None, None])
    if len(conv1.input) > 2 and conv1.input[2]:
        gr.set_input(conv1, 2, gr.const(conv1.input[2]) / s)
    for conv, how in pair.absorbers:
        w = gr.const(conv.input[1])
        gr.set_input(conv, 1, w * (s[:, None, None, None] if how == "dw" else s[None, :, None, None]))
    for mn in pair.mins:
        bound = np.broadcast_to(gr.const(mn.input[1]), (1, len(s), 1, 1))
        gr.set_input(mn, 1, (bound / s[None, :, None, None]).astype(np.float32))


def _spread(r: np.ndarray) -> float:
    """How unevenly a per-channel quantization grid would be used: largest channel range / median one."""
    med = float(np.median(r))
    return float(r.max() / med) if med > 0 else float("inf")


def _geomean(values: list[float]) -> float | None:
    finite = [v for v in values if np.isfinite(v) and v > 0]
    return float(np.exp(np.mean(np.log(finite)))) if finite else None


def equalize(
    model: onnx.ModelProto, relu6: str = "skip", pairs: str = "depthwise", iterations: int = 20
) -> tuple[onnx.ModelProto, dict]:
    """Cross-layer-equalize a copy of the fp32 `model`; returns it and a record for the report.

    pairs="depthwise": conv1 is a depthwise conv (Nagel's dw -> pw case); "all": any conv with constant weights.
    relu6: "skip" or "exact" (see the module docstring). Chained pairs are equalized `iterations` times.
    """
    if relu6 not in ("skip", "exact") or pairs not in ("depthwise", "all"):
        raise DeployError(f"equalize: relu6 must be skip|exact and pairs depthwise|all, got {relu6!r}, {pairs!r}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    gr = _Graph(out)
    found: list[_Pair] = []
    skipped: Counter[str] = Counter()
    for conv in [n for n in gr.g.node if n.op_type == "Conv"]:
        kind = _conv_kind(gr, conv)
        if kind is None or (pairs == "depthwise" and kind != "dw"):
            continue
        traced = _trace(gr, conv, relu6)
        if isinstance(traced, str):
            skipped[f"{kind}: {traced}"] += 1
        else:
            found.append(traced)
    before = [_ranges(gr, p) for p in found]
    for _ in range(iterations if pairs == "all" else 1):
        largest = 0.0
        for pair in found:
            r1, r2 = _ranges(gr, pair)
            s = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.where(r2 > 0, r2, 1)), 1.0).astype(np.float32)
            _apply(gr, pair, s)
            largest = max(largest, float(np.abs(np.log(s)).max(initial=0.0)))
        if largest < 1e-3:
            break
    after = [_ranges(gr, p) for p in found]
    record = {
        "pairs": len(found),
        "kinds": dict(Counter(p.kind for p in found)),
        "skipped": dict(skipped),
        "relu6": relu6,
        "per_channel_min": sum(len(p.mins) for p in found) if relu6 == "exact" else 0,
        # geometric mean over the pairs of (largest / median) per-channel weight range
        "range_spread": {
            "conv1_out": {"before": _geomean([_spread(r1) for r1, _ in before]),
                          "after": _geomean([_spread(r1) for r1, _ in after])},
            "conv2_in": {"before": _geomean([_spread(r2) for _, r2 in before]),
                         "after": _geomean([_spread(r2) for _, r2 in after])},
        },  # fmt: skip
    }
    onnx.checker.check_model(out)
    return out, record


class Equalize:
    name = "equalize"

    def applies(self, b: Build) -> bool:
        return b.recipe.quantize.enabled and b.recipe.quantize.equalize.enabled

    def run(self, b: Build) -> str:
        cfg = b.recipe.quantize.equalize
        model, record = equalize(onnx.load(str(b.source)), cfg.relu6, cfg.pairs)
        out = b.workdir / PREPARED
        onnx.save(model, str(out))
        record["max_abs_logit_diff"] = diff = check_prepared(b, b.source, out)
        b.report["equalize"] = record
        b.source = out
        return f"{record['pairs']} pairs ({cfg.pairs}, relu6 {cfg.relu6}), max |logit diff| {diff:.1e}"
