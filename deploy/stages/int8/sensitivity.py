"""Which layers of an int8 QDQ model lose the accuracy: per-node figures against the fp32 model.

`layer_sqnr` (one pass, cheap enough for every build): the fp32 and the int8 model run on the same images with
the tensors around every quantized node added as graph outputs; per node, SQNR in dB of
  - `sqnr_db`: its output as its consumers see it (after its Q/DQ pair, if any) against fp32: the error
    accumulated up to that point;
  - `input_sqnr_db`: the same for its quantized activation inputs (the worst one), so `lost_db` = input - output
    is what the node itself adds (its weights, its output's quantization) and ranks the culprits, not everything
    downstream of them;
  - `weight_sqnr_db`: its dequantized weight against the fp32 one; `output_qdq_sqnr_db`: its output before
    against after its own Q/DQ pair, in the int8 model (the rounding and clipping of that one tensor).

`variants` (a quantize and an evaluation per node and kind): the final logits with the node quantized alone
(everything else in float) and with the node alone excluded (kept in float), from the cached calibration ranges.
Both run on the exact Q/DQ arithmetic (OrtCpu reference mode): what TensorRT and VNNI CPUs compute.

onnxruntime.quantization.qdq_loss_debug does the one-pass part (modify_model_output_intermediate_tensors,
collect_activations, create_activation_matching) but is not used here: collect_activations keeps every tensor of
every batch in memory (EfficientNet-Lite0: about 100 MB per image and model), and its per-tensor "qdq_err"
compares the tensor before the Q with the one after the DQ, which is wrong where the quantizer removed a Relu or
Clip and renamed the Conv output to the activation's output (uint8 activations, the ort-cpu target): "before" is
then the unclipped Conv output, and the clipping that the Q's saturation does counts as error (EfficientNet-Lite0,
ort-cpu: its Conv->ReLU6 outputs read 1-7 dB instead of 47-52 dB). Here the removed activation is applied to "before" first, and the
sums are accumulated batch by batch.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...console import track
from ...core.context import Build
from ...errors import DeployError
from ...evalset import EvalSet
from ...recipe import QuantizeConfig
from ...runtimes.ort import OrtCpu
from ... import metrics
from . import quantize

Q, DQ = "QuantizeLinear", "DequantizeLinear"
REMOVABLE = ("Relu", "Clip")  # activations onnxruntime's QDQ quantizer folds into the Q of the op before them


@dataclass
class _Probe:
    """The tensors one quantized node's figures come from (names in the fp32 / int8 graphs)."""

    node: str
    op_type: str
    in_fp32: bool  # a node of the fp32 graph, so onnxruntime can exclude it by name
    output: str | None = None  # fp32 tensor of the node's output
    seen: str | None = None  # int8 tensor its consumers read (the DQ output when the output is quantized)
    pre: str | None = None  # int8 tensor before the output's Q
    activation: tuple[float, float] | None = None  # bounds of a Relu/Clip the quantizer removed after the node
    inputs: list[tuple[str, str]] = field(default_factory=list)  # (fp32 tensor, int8 DQ output) per activation input
    weight_sqnr_db: float | None = None


def _constant(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(n.attribute[0].t)
    return None


def _dequantize(model: onnx.ModelProto, dq: onnx.NodeProto) -> np.ndarray:
    q = _constant(model, dq.input[0]).astype(np.float32)
    scale = _constant(model, dq.input[1]).astype(np.float32)
    zp = _constant(model, dq.input[2]).astype(np.float32) if len(dq.input) > 2 and dq.input[2] else np.zeros_like(scale)
    if scale.size > 1:  # per channel along `axis`
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return (q - zp) * scale


def _probes(fmodel: onnx.ModelProto, qmodel: onnx.ModelProto) -> list[_Probe]:
    """One probe per node of the int8 graph that reads a dequantized tensor (except Q/DQ themselves)."""
    fprod = {o: n for n in fmodel.graph.node for o in n.output}
    fnodes = {n.name: n for n in fmodel.graph.node}
    ftensors = set(fprod) | {i.name for i in fmodel.graph.input}
    qprod = {o: n for n in qmodel.graph.node for o in n.output}
    qcons: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in qmodel.graph.node:
        for i in n.input:
            qcons[i].append(n)
    qinits = {i.name for i in qmodel.graph.initializer}
    probes = []
    for n in qmodel.graph.node:
        dqs = [(k, qprod[i]) for k, i in enumerate(n.input) if i in qprod and qprod[i].op_type == DQ]
        if n.op_type in (Q, DQ) or not dqs:
            continue
        p = _Probe(n.name, n.op_type, n.name in fnodes)
        for k, dq in dqs:
            src = dq.input[0]
            if src in qinits or _constant(qmodel, src) is not None:  # a weight or bias
                if k == 1 and p.in_fp32 and len(fnodes[n.name].input) > 1:
                    ref = _constant(fmodel, fnodes[n.name].input[1])
                    if ref is not None:
                        p.weight_sqnr_db = _finite(metrics.sqnr_db(ref, _dequantize(qmodel, dq).reshape(ref.shape)))
            elif src in qprod and qprod[src].op_type == Q and qprod[src].input[0] in ftensors:
                p.inputs.append((qprod[src].input[0], dq.output[0]))
        out = n.output[0]
        if out in ftensors:
            p.output, p.seen = out, out
            q = next((c for c in qcons[out] if c.op_type == Q), None)
            dq = next((c for c in qcons[q.output[0]] if c.op_type == DQ), None) if q else None
            if dq is not None:
                p.seen, p.pre = dq.output[0], out
            act = fprod[out]
            if act.name != n.name and act.op_type in REMOVABLE and fprod.get(act.input[0], act).name == n.name:
                lo = _constant(fmodel, act.input[1]) if act.op_type == "Clip" and len(act.input) > 1 and act.input[1] else None
                hi = _constant(fmodel, act.input[2]) if act.op_type == "Clip" and len(act.input) > 2 and act.input[2] else None
                p.activation = (0.0 if act.op_type == "Relu" else -np.inf if lo is None else float(lo),
                                np.inf if hi is None else float(hi))  # fmt: skip
        if p.inputs or p.weight_sqnr_db is not None:  # not, e.g., an Identity of a dequantized bias
            probes.append(p)
    return probes


def quantized_nodes(fp32: Path, int8: Path) -> list[str]:
    """The fp32 graph's nodes that are quantized in `int8`: the ones onnxruntime can keep in float by name."""
    return [p.node for p in _probes(onnx.load(str(fp32)), onnx.load(str(int8))) if p.in_fp32]


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> bytes:
    """The serialized model with `names` added as (float) graph outputs."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n not in have)
    return m.SerializeToString()


def _finite(db: float) -> float | None:
    """JSON-safe dB: None for an exact match (infinite SQNR)."""
    return None if not np.isfinite(db) else round(float(db), 3)


def layer_sqnr(fp32: Path, int8: Path, images: np.ndarray, batch: int = 8, threads: int | None = None) -> list[dict]:
    """Per quantized node of `int8`, the one-pass SQNR figures of the module docstring, in graph order."""
    fmodel, qmodel = onnx.load(str(fp32)), onnx.load(str(int8))
    probes = _probes(fmodel, qmodel)
    if not probes:
        raise DeployError(f"{int8} has no quantized node (no DequantizeLinear feeding an operator)")
    # pairs (reference in fp32 or int8, tensor there, tensor in int8, activation applied to the reference)
    pairs: dict[tuple, list[float]] = {}
    for p in probes:
        if p.output:
            pairs[("f", p.output, p.seen, None)] = [0.0, 0.0]
            if p.pre:
                pairs[("q", p.pre, p.seen, p.activation)] = [0.0, 0.0]
        for ref, seen in p.inputs:
            pairs[("f", ref, seen, None)] = [0.0, 0.0]
    fnames = sorted({k[1] for k in pairs if k[0] == "f"})
    qnames = sorted({k[2] for k in pairs} | {k[1] for k in pairs if k[0] == "q"})
    frt = OrtCpu(_with_outputs(fmodel, fnames), threads, reference=True)
    qrt = OrtCpu(_with_outputs(qmodel, qnames), threads, reference=True)
    chunks = range(0, len(images), batch)
    for i in track(chunks, "Per-layer SQNR", total=len(chunks)):
        x = images[i : i + batch]
        f = dict(zip(fnames, frt.session.run(fnames, {frt.input_name: x})))
        q = dict(zip(qnames, qrt.session.run(qnames, {qrt.input_name: x})))
        for (side, ref, seen, act), sums in pairs.items():
            r = (f if side == "f" else q)[ref].astype(np.float64)
            if act is not None:
                r = np.clip(r, *act)
            sums[0] += float((r**2).sum())
            sums[1] += float(((r - q[seen]) ** 2).sum())

    def db(key) -> float | None:
        signal, noise = pairs[key]
        return _finite(float("inf") if noise == 0 else 10 * np.log10(max(signal, 1e-30) / noise))

    rows = []
    for p in probes:
        out = db(("f", p.output, p.seen, None)) if p.output else None
        ins = [db(("f", ref, seen, None)) for ref, seen in p.inputs]
        ins = [float("inf") if v is None else v for v in ins]
        inp = _finite(min(ins)) if ins else None
        rows.append({
            "node": p.node,
            "op_type": p.op_type,
            "excludable": p.in_fp32,
            "sqnr_db": out,
            "input_sqnr_db": inp,
            "lost_db": round(inp - out, 3) if inp is not None and out is not None else None,
            "output_qdq_sqnr_db": db(("q", p.pre, p.seen, p.activation)) if p.pre else None,
            "weight_sqnr_db": p.weight_sqnr_db,
        })  # fmt: skip
    return rows


def one_pass(fp32: Path, int8: Path, calib: np.ndarray, images: int = 16, threads: int | None = None) -> dict:
    """layer_sqnr on the first `images` calibration images, as a build report's "sensitivity" section (report.py
    renders its worst layers by `lost_db`). EfficientNet-Lite0, 16 images: about 15 s on 2 cores."""
    return {"sqnr_images": min(images, len(calib)), "layers": layer_sqnr(fp32, int8, calib[:images], threads=threads),
            "ranking": "lost_db"}  # fmt: skip


RANK_KEYS = ("excluded_gain_db", "lost_db")  # larger = worse; any other key is an SQNR: smaller = worse


def worst(rows: list[dict], n: int, key: str = "lost_db") -> list[dict]:
    """The `n` worst rows by `key` (rows without that figure left out)."""
    have = [r for r in rows if r.get(key) is not None]
    return sorted(have, key=lambda r: -r[key] if key in RANK_KEYS else r[key])[:n]


def escape(name: str) -> str:
    """A glob matching exactly the node name `name` (quantize.exclude takes globs)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def requantize(fp32: Path, out: Path, calib: np.ndarray, cfg: QuantizeConfig, floats: list[str], ranges: Path) -> dict:
    """quantize() with the nodes `floats` kept in float too, from the calibration ranges cached in `ranges`."""
    cfg = cfg.model_copy(update={"exclude": [*cfg.exclude, *map(escape, floats)]})
    with tempfile.TemporaryDirectory() as tmp:
        info = quantize.quantize(fp32, out, calib, cfg, Path(tmp), ranges)
    if not info["calibration"]["cache_reused"]:
        raise DeployError(f"no calibration ranges for these images and settings in {ranges}")
    return info


def evaluate(model: Path, images: np.ndarray, ref: np.ndarray, labels: np.ndarray | None, batch: int = 32,
             threads: int | None = None) -> dict:
    """Agreement and logit SQNR against the fp32 logits `ref` (and top-1/drop with labels), exact Q/DQ arithmetic."""
    got = metrics.logits(OrtCpu(model, threads, reference=True), images, batch, f"Evaluating {model.name}")
    out = metrics.compare(ref, got, labels)
    figures = {"agreement": out["agreement"], "sqnr_db": _finite(out["sqnr_db"])}
    if labels is not None:
        figures.update(top1=out["int8"]["top1"], top1_drop=out["top1_drop"])
    return figures


def variants(fp32: Path, calib: np.ndarray, cfg: QuantizeConfig, nodes: list[str], images: np.ndarray,
             ref: np.ndarray, labels: np.ndarray | None, ranges: Path, kinds: tuple[str, ...] = ("excluded", "alone"),
             threads: int | None = None) -> dict[str, dict]:
    """Per node, the final-logit figures (evaluate, against the fp32 logits `ref`) with the node alone kept in
    float ("excluded") and with only the node quantized ("alone"), re-quantizing `fp32` from the cached ranges."""
    names = [n.name for n in onnx.load(str(fp32), load_external_data=False).graph.node if n.name]
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "variant.onnx"
        for node in track(nodes, "Layer variants", total=len(nodes)):
            out[node] = {}
            for kind in kinds:
                floats = [node] if kind == "excluded" else [n for n in names if n != node]
                requantize(fp32, path, calib, cfg, floats, ranges)
                out[node][kind] = evaluate(path, images, ref, labels, threads=threads)
    return out


def analyze(fp32: Path, int8: Path, calib: np.ndarray, images: EvalSet, cfg: QuantizeConfig, ranges: Path, sqnr_images: int = 32, variant_images: int = 64,
            kinds: tuple[str, ...] = ("excluded", "alone"), threads: int | None = None) -> dict:
    """layer_sqnr on `sqnr_images` calibration images, then (with `kinds`) the variants of every node on the first
    `variant_images` of `images`, each compared with the all-int8 model there (`excluded_gain_db`: the logit SQNR
    gained by keeping the node alone in float). Layers are ranked by that gain, else by `lost_db`."""
    result = one_pass(fp32, int8, calib, sqnr_images, threads)
    rows = result["layers"]
    if not kinds or not variant_images:
        return result
    x, y = images.head(variant_images)
    ref = metrics.logits(OrtCpu(fp32, threads), x, 32, "Evaluating fp32")
    with tempfile.TemporaryDirectory() as tmp:
        base_path = Path(tmp) / "base.onnx"
        requantize(fp32, base_path, calib, cfg, [], ranges)
        base = evaluate(base_path, x, ref, y, threads=threads)
    per = variants(fp32, calib, cfg, [r["node"] for r in rows if r["excludable"]], x, ref, y, ranges, kinds, threads)
    for r in rows:
        r.update(per.get(r["node"], {}))
        if "excluded" in r:
            r["excluded_gain_db"] = gain_db(r["excluded"]["sqnr_db"], base["sqnr_db"])
    result.update(variant_images=len(x), base=base, ranking="excluded_gain_db" if "excluded" in kinds else "lost_db")
    if y is not None:
        result["fp32_top1"] = metrics.accuracy(ref, y)["top1"]
    return result


def gain_db(db: float | None, base: float | None) -> float:
    """SQNR gain in dB, an exact match (None) counted as 100 dB."""
    return round((100.0 if db is None else db) - (100.0 if base is None else base), 3)


class Sensitivity:
    name = "sensitivity"

    def applies(self, b: Build) -> bool:
        return b.recipe.quantize.enabled and b.recipe.quantize.sensitivity_images > 0

    def run(self, b: Build) -> str:
        sens = one_pass(b.source, b.int8_onnx, b.calibration.calib.inputs, b.recipe.quantize.sensitivity_images,
                        b.threads)  # fmt: skip
        b.report["sensitivity"] = sens
        top = worst(sens["layers"], 1)
        return f"{len(sens['layers'])} quantized nodes" + (
            f", worst {top[0]['node']} ({top[0]['lost_db']:.1f} dB lost)" if top else "")
