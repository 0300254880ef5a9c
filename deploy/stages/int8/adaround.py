"""AdaRound (Nagel et al., ICML 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization") on a QDQ model.

Per quantized Conv/Gemm, in graph order, learn for each int8 weight whether it rounds down or up so that the
layer's output on calibration images matches the fp32 model's: ||W_q x_q - W x||^2 summed over output channels,
plus the annealed regularizer that drives the soft rounding h(V) to 0 or 1 (the loss and defaults of AIMET and
BRECQ, without the activation). x_q is the layer's input in the QDQ model, where the layers before it already
carry their learned weights, as in AIMET; x the fp32 model's. The scales stay those of quantize_static: only the
integer weights change, so ORT and TensorRT compute with them as with any QDQ model.

onnxruntime.quantization has no AdaRound; AIMET's and NNCF's need the PyTorch model in their own quantization
simulation, which would not be the QDQ graph this build ships. So the optimization is ours, in PyTorch, on
inputs computed by onnxruntime (bias_correction._Stepper).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from ...console import track
from ...core.context import Build
from ...errors import DeployError
from ...recipe import AdaRoundConfig
from ...train import torch_threads
from . import center
from .bias_correction import DQ, _Stepper

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (paper, section 4)
BETA = (20.0, 2.0)  # regularizer exponent annealed from/to, after a warm start on the reconstruction alone
WARM_START = 0.2
LR = 1e-2  # Adam on V, as AIMET and BRECQ
MIN_IMAGES = 8  # fewer and the stage is skipped: the held-out check needs images the optimization does not see
# a step's product with A below this runs on one thread: with two, a small layer's steps of a few microseconds of
# work cost up to 70x more when another process shares the cores (21 ms vs 0.3 ms a step for an 8x16 layer)
ONE_THREAD_MACS = 20_000_000
# The input moments take every k-th output row and column where that still leaves POSITIONS positions per input of
# a group's weights: a depthwise layer's 9 or 25 inputs need few of its millions at 112 px (Lite0: same logit SQNR
# and KL as all positions, 153 s instead of 170; the moments' cost no longer grows with the resolution)
POSITIONS = 1024
HOLD_OUT = 0.125  # of the images: each layer keeps nearest rounding where the learned one does worse on them


@dataclass
class _Layer:
    """A Conv/Gemm of the QDQ model whose weights are int8 behind a DequantizeLinear, with its fp32 counterpart."""

    node: onnx.NodeProto  # the QDQ model's
    init: onnx.TensorProto  # its int8 weight initializer
    scale: np.ndarray  # per output channel (or one), broadcastable to the weight
    weight: np.ndarray  # the fp32 model's
    ref_input: str  # the fp32 model's input of the same node


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def layers(qmodel: onnx.ModelProto, fp32: onnx.ModelProto) -> tuple[list[_Layer], dict[str, int]]:
    """The layers AdaRound can optimize, in graph order, and the count of those skipped, by reason."""
    inits = {i.name: i for i in qmodel.graph.initializer}
    producer = {o: n for n in qmodel.graph.node for o in n.output}
    users = Counter(i for n in qmodel.graph.node for i in n.input)
    f_inits = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
    f_nodes = {n.name: n for n in fp32.graph.node if n.op_type in ("Conv", "Gemm") and n.name}
    out, skipped = [], Counter()
    for node in qmodel.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        dq = producer.get(node.input[1])
        if dq is None or dq.op_type != DQ or dq.input[0] not in inits or users.get(dq.input[0]) != 1:
            skipped["weights not quantized (or shared)"] += 1
            continue
        q = numpy_helper.to_array(inits[dq.input[0]])
        ref = f_nodes.get(node.name)
        a = _attrs(node)
        if q.dtype != np.int8 or ref is None or ref.input[1] not in f_inits:
            skipped["no int8 weights or no fp32 counterpart"] += 1
            continue
        gemm_ok = node.op_type != "Gemm" or (a.get("transB") and not a.get("transA") and a.get("alpha", 1.0) == 1.0)
        if a.get("auto_pad", b"NOTSET") != b"NOTSET" or not gemm_ok:
            skipped["unsupported attributes"] += 1
            continue
        axis = _attrs(dq).get("axis", 1)
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
        if scale.ndim:
            scale = scale.reshape([-1 if d == axis else 1 for d in range(q.ndim)])
        weight = f_inits[ref.input[1]].astype(np.float32)
        # a weight rewritten after quantization (the h-sigmoid folded into the SE conv) is no longer the fp32 one
        if weight.shape != q.shape or np.abs(np.rint(weight / scale) - q).max() > 1:
            skipped["weights differ from the fp32 model"] += 1
            continue
        out.append(_Layer(node, inits[dq.input[0]], scale, weight, ref.input[0]))
    return out, dict(skipped)


class _Adam:
    """Adam on one tensor (torch.optim.Adam's defaults, LR): a few in-place ops per step, where torch.optim's
    per-step overhead costs more than a small layer's whole step."""

    def __init__(self, v: torch.Tensor, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.v, self.m, self.s = v, torch.zeros_like(v), torch.zeros_like(v)
        self.b1, self.b2, self.eps, self.t = b1, b2, eps, 0

    def step(self, grad: torch.Tensor) -> None:
        self.t += 1
        self.m.mul_(self.b1).add_(grad, alpha=1 - self.b1)
        self.s.mul_(self.b2).addcmul_(grad, grad, value=1 - self.b2)
        denom = (self.s / (1 - self.b2**self.t)).sqrt_().add_(self.eps)
        self.v.addcdiv_(self.m, denom, value=-LR / (1 - self.b1**self.t))


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def thinning(layer: _Layer, x: np.ndarray) -> int:
    """Every how many output rows and columns a position enters the moments: as few as leave POSITIONS positions
    per input of a group's weights."""
    if layer.node.op_type == "Gemm":
        return 1
    stride, inputs = _attrs(layer.node).get("strides", [1, 1]), layer.weight[0].size
    positions = len(x) * math.ceil(x.shape[2] / stride[0]) * math.ceil(x.shape[3] / stride[1])
    return max(1, math.isqrt(positions // (POSITIONS * inputs)))


def _patches(layer: _Layer, x: torch.Tensor, thin: int = 1) -> torch.Tensor:
    """The layer's input as (groups, inputs per group, positions): each output value is a dot product of one group's
    weights with one column; of the output positions, every `thin`-th row and column."""
    if layer.node.op_type == "Gemm":
        return x.reshape(len(x), -1).T[None]
    a = _attrs(layer.node)
    pads, group = a.get("pads", [0] * 4), a.get("group", 1)
    x = F.pad(x, [pads[1], pads[3], pads[0], pads[2]])
    stride = [s * thin for s in a.get("strides", [1, 1])]
    u = F.unfold(x, layer.weight.shape[2:], dilation=a.get("dilations", 1), stride=stride)
    n, d, positions = u.shape
    return u.reshape(n, group, d // group, positions).permute(1, 2, 0, 3).reshape(group, d // group, n * positions)


def _moments(layer: _Layer, xq: np.ndarray, xf: np.ndarray, w: torch.Tensor, chunk: int = 8, thin: int = 1):
    """Per group, A = E[p_q p_q^T] and Bw = E[w p_f p_q^T] over the layer's input positions p (QDQ and fp32) and
    c = E||w p_f||^2, the mean squared fp32 output: the output error of weights q is q A q - 2 q.Bw + c. With fewer
    positions than inputs (a classifier on a few hundred images) A comes as its factor P / sqrt(positions), which
    costs less per step than A itself."""
    gram, kept, bw, c, count = None, [], 0.0, 0.0, 0
    for i in range(0, len(xq), chunk):
        pq, pf = (_patches(layer, torch.from_numpy(t[i : i + chunk]), thin) for t in (xq, xf))
        yf = torch.bmm(w, pf)  # the fp32 outputs, without bias
        bw = bw + torch.bmm(yf, pq.transpose(1, 2)).double()
        c = c + float(yf.double().pow(2).sum())
        count += pq.shape[-1]
        kept.append(pq)
        if count >= pq.shape[1]:
            gram = sum((torch.bmm(p, p.transpose(1, 2)).double() for p in kept), 0.0 if gram is None else gram)
            kept = []
    a = gram / count if gram is not None else torch.cat(kept, -1).double() / math.sqrt(count)
    return a, bw / count, c / count


def _times_a(q: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """q A, from A or from its factor."""
    return torch.bmm(q, a) if a.shape[-1] == a.shape[-2] else torch.bmm(torch.bmm(q, a), a.transpose(1, 2))


def _error(q: torch.Tensor, a: torch.Tensor, bw: torch.Tensor, c: float) -> torch.Tensor:
    """Mean over positions of the output error summed over channels (AIMET's and BRECQ's loss), for weights `q`."""
    return (_times_a(q, a) * q).sum() - 2 * (q * bw).sum() + c


def _gradient(v: torch.Tensor, a: torch.Tensor, bw: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
              beta: float | None, regularization: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The loss's gradient in v (by hand: autograd's overhead would dominate a small layer's step), and where h is
    still free (strictly between 0 and 1). The error's gradient in q is 2 (q A - Bw); the regularizer's in h
    -2 lambda beta |2h-1|^(beta-1) sign(2h-1) (none before beta is set: the warm start); h is the clamped
    rectified sigmoid of v, q = scale * clamp(base + h, -127, 127)."""
    sig = torch.sigmoid(v)
    raw = sig * (ZETA - GAMMA) + GAMMA
    h = raw.clamp(0, 1)
    grad_h = 2 * (_times_a(scale * torch.clamp(base + h, -127, 127), a) - bw) * scale * ((base >= -127) & (base <= 126))
    if beta is not None:
        d = 2 * h - 1
        grad_h -= 2 * regularization * beta * d.abs().pow(beta - 1) * d.sign()
    free = (raw > 0) & (raw < 1)
    return grad_h * free * (ZETA - GAMMA) * sig * (1 - sig), free


def optimize(layer: _Layer, xq: np.ndarray, xf: np.ndarray, cfg: AdaRoundConfig) -> tuple[np.ndarray, dict]:
    """The learned int8 weights of `layer`, from its QDQ inputs `xq` and fp32 inputs `xf` on the calibration images;
    the last HOLD_OUT of them only measure the error of nearest and learned rounding.

    The loss is the layer's output error without its activation (the paper's asymmetric reconstruction, eq. 25,
    less f_a): a quadratic form in the weights, so each step sees every position of every image through the input
    second moments, at a cost that does not grow with the images."""
    group = 1 if layer.node.op_type == "Gemm" else _attrs(layer.node).get("group", 1)
    shape = layer.weight.shape
    # weights as (groups, outputs per group, inputs per group)
    w = torch.from_numpy(layer.weight).reshape(group, shape[0] // group, -1)
    scale = torch.from_numpy(np.broadcast_to(layer.scale, shape).copy()).reshape(w.shape)
    ratio = w / scale
    base = torch.floor(ratio)
    rest = ratio - base
    held = max(1, int(len(xq) * HOLD_OUT))
    thin = thinning(layer, xq)
    a, bw, _ = _moments(layer, xq[:-held], xf[:-held], w, thin=thin)
    a, bw = a.float(), bw.float()
    v = -torch.log((ZETA - GAMMA) / (rest.clamp(1e-4, 1 - 1e-4) - GAMMA) - 1)  # h(v) = rest: start at w
    adam = _Adam(v)
    warm = int(WARM_START * cfg.iterations)
    steps = cfg.iterations
    with torch_threads(1 if w.numel() * a.shape[-1] < ONE_THREAD_MACS else torch.get_num_threads()):
        for it in range(cfg.iterations):
            beta = None
            if it >= warm:
                rel = (it - warm) / max(cfg.iterations - warm, 1)
                beta = BETA[1] + 0.5 * (BETA[0] - BETA[1]) * (1 + math.cos(rel * math.pi))
            grad, free = _gradient(v, a, bw, base, scale, beta, cfg.regularization)
            if beta is not None and it % 50 == 0 and not free.any():  # every h at 0 or 1 (gradient 0): done
                steps = it
                break
            adam.step(grad)
    hard = (_h(v) >= 0.5).float()
    nearest = torch.round(ratio) - base
    a, bw, c = _moments(layer, xq[-held:], xf[-held:], w, thin=thin)
    err = [float(_error((scale * torch.clamp(base + r, -127, 127)).double(), a, bw, c)) for r in (nearest, hard)]
    q = torch.clamp(base + hard, -127, 127).reshape(shape).to(torch.int8).numpy()
    return q, {"flipped": float((hard != nearest).float().mean()), "error_nearest": err[0], "error_adaround": err[1],
               "steps": steps}  # fmt: skip


def adaround(fp32: Path, int8: Path, calib: np.ndarray, out: Path, cfg: AdaRoundConfig) -> dict:
    """Write `int8` with AdaRound's integer weights to `out`; returns a record for the report.

    `fp32` is the model `int8` was quantized from; `cfg.images` of the calibration images, evenly spaced, are
    used: both models' activations on them are held in memory as far as later layers need them (the build's peak
    RSS for EfficientNet-Lite0 at 224 px on 200 images: 5.7 GB)."""
    if len(calib) < 2:
        raise DeployError("AdaRound needs at least 2 calibration images (one to learn on, one to check)")
    start = time.perf_counter()
    calib = calib[np.unique(np.linspace(0, len(calib) - 1, min(cfg.images, len(calib))).round().astype(int))]
    fp32_model, qmodel = onnx.load(str(fp32)), onnx.load(str(int8))
    todo, skipped = layers(qmodel, fp32_model)
    shifts = center.offsets(fp32_model)
    quantized, reference = _Stepper(qmodel, calib), _Stepper(fp32_model, calib)
    errors, flipped, kept = [], [], 0
    for layer in track(todo, "AdaRound", total=len(todo)):
        xq, xf = quantized.run_to(layer.node.input[0]), reference.run_to(layer.ref_input)
        if c := shifts.get(layer.node.name):  # a centred input: compensate() makes the error that of y = x + c
            xq, xf = xq + c, xf + c
        q, rec = optimize(layer, xq, xf, cfg)
        if rec["error_adaround"] > rec["error_nearest"]:
            kept += 1
            continue
        layer.init.CopyFrom(numpy_helper.from_array(q, layer.init.name))
        if c:  # the bias of a centred input's reader follows its new weights, before later layers see its output
            center.compensate(qmodel, fp32_model)
        errors.append(rec["error_adaround"] / max(rec["error_nearest"], 1e-12))
        flipped.append(rec["flipped"])
    onnx.save(qmodel, str(out))
    return {
        "layers": len(errors),
        "kept_nearest": kept,
        "skipped": skipped,
        "images": len(calib),
        "iterations": cfg.iterations,
        # per optimized layer: its output error relative to nearest rounding, and the share of weights rounded the
        # other way
        "error_ratio": {"median": float(np.median(errors)), "max": float(np.max(errors))} if errors else None,
        "flipped": float(np.mean(flipped)) if flipped else 0.0,
        "seconds": round(time.perf_counter() - start, 1),
    }


class AdaRound:
    name = "adaround"

    def applies(self, b: Build) -> bool:
        return b.recipe.quantize.enabled and b.recipe.quantize.adaround.enabled

    def run(self, b: Build) -> str:
        if len(b.calibration.calib.inputs) < MIN_IMAGES:
            b.warn(f"AdaRound skipped: {len(b.calibration.calib.inputs)} calibration images, it needs {MIN_IMAGES}")
            return "skipped"
        record = adaround(b.source, b.int8_onnx, b.calibration.calib.inputs, b.int8_onnx, b.recipe.quantize.adaround)
        b.report["adaround"] = record
        b.int8_changed()
        return f"{record['layers']} layers on {record['images']} calibration images, {record['seconds']:.0f} s"
