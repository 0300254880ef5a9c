"""The int8 stages of a build: graph preparation, quantization, and the fallbacks when a threshold is missed.

    equalize (optional) -> pad_depthwise (ort-cpu) -> quantize -> bias_correction (optional) -> [qat]
        -> [mixed_precision] -> sensitivity

QAT runs when `quantize.qat.mode` is on, or auto and the int8 model misses a verify threshold and --train images
are given; mixed precision when enabled and the (possibly QAT) int8 model still misses one. Both are judged on
the build's evaluation images (--val, else held-out calibration images), the same ones verify reports.
QAT fine-tunes the model as exported (not equalized): training adapts its weight ranges itself, and its
biases were learned under fake quantization, so its int8 model gets no bias correction (on the CIFAR-10
EfficientNet-B0 after 2 QAT epochs it moved the top-1 drop from 0.06 to 0.58, ort-cpu, and from 0.04 to 0.42,
tensorrt; 10,000 test images). That model replaces the post-training one only when it is no worse there (QAT
can diverge on a model whose activations quantize badly, as the CIFAR-10 EfficientNet-B0 did at lr 0.02).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from . import sensitivity
from .errors import DeployError
from .report import figures
from .runtimes.ort import OrtCpu
from .stages import quantize, verify, verify_trt

if TYPE_CHECKING:
    from .pipeline import Build, BuildOptions

# The fp32 model the int8 one is quantized from, kept in the build folder when it is not model.fp32.onnx
# (equalized, padded, or fine-tuned by QAT): `deploy diagnose` re-quantizes from it with the cached ranges.
PREPARED = "model.fp32.prepared.onnx"


def build_int8(b: Build, opts: BuildOptions, previous: Path | None, threads: int | None) -> None:
    q = b.recipe.quantize
    source = _pad_depthwise(b, _equalize(b, threads) if q.equalize.enabled else b.fp32_onnx, threads)
    b.int8_onnx = b.workdir / "model.int8.onnx"
    _quantize(b, source, previous)
    auto = q.qat.mode == "auto" and opts.train is not None and b.model is not None
    if q.qat.mode == "on" or (auto and _missed(b, threads)):
        source = _qat(b, opts, source, threads)
    if q.mixed_precision.enabled and _missed(b, threads):
        _mixed_precision(b, source, threads)
    b.report["quantize"]["source"] = source.name
    if q.sensitivity_images:
        with b.stage("sensitivity") as s:
            sens = sensitivity.one_pass(source, b.int8_onnx, b.calibration.calib.inputs, q.sensitivity_images, threads)
            b.report["sensitivity"] = sens
            worst = sensitivity.worst(sens["layers"], 1)
            s["notes"] = f"{len(sens['layers'])} quantized nodes" + (
                f", worst {worst[0]['node']} ({worst[0]['lost_db']:.1f} dB lost)" if worst else "")


def _equalize(b: Build, threads: int | None) -> Path:
    from .stages.equalize import equalize

    cfg = b.recipe.quantize.equalize
    with b.stage("equalize") as s:
        model, record = equalize(onnx.load(str(b.fp32_onnx)), cfg.relu6, cfg.pairs)
        out = b.workdir / PREPARED
        onnx.save(model, str(out))
        record["max_abs_logit_diff"] = diff = _logit_diff(b, b.fp32_onnx, out, threads)
        b.report["equalize"] = record
        s["notes"] = f"{record['pairs']} pairs ({cfg.pairs}, relu6 {cfg.relu6}), max |logit diff| {diff:.1e}"
    return out


def _pad_depthwise(b: Build, source: Path, threads: int | None) -> Path:
    """Zero-pad depthwise channels to a multiple of 16 for ORT's int8 kernels (stages/pad_channels.py)."""
    from .stages.pad_channels import pad_depthwise

    if b.recipe.quantize.target != "ort-cpu" or not b.recipe.quantize.pad_depthwise:
        return source
    model = onnx.load(str(source))
    padded = pad_depthwise(model)
    if not padded:
        return source
    with b.stage("pad_depthwise") as s:
        out = b.workdir / PREPARED
        tmp = out.with_suffix(".tmp")  # `source` may be `out` (equalized, or from QAT)
        onnx.save(model, str(tmp))
        diff = _logit_diff(b, source, tmp, threads)
        tmp.replace(out)
        b.report["pad_depthwise"] = {"convs": padded, "max_abs_logit_diff": diff}
        s["notes"] = f"{len(padded)} depthwise convs padded to a multiple of 16 channels, max |logit diff| {diff:.1e}"
    return out


def _logit_diff(b: Build, before: Path, after: Path, threads: int | None) -> float:
    """Largest logit change a graph preparation made on 8 calibration images; raises if beyond export tolerance."""
    x = b.calibration.calib.inputs[:8]
    ref = OrtCpu(before, threads).infer(x)
    diff = float(np.abs(OrtCpu(after, threads).infer(x) - ref).max())
    if diff > b.recipe.export.tolerance * max(float(np.abs(ref).max()), 1.0):
        raise DeployError(f"graph preparation ({after.name}) changed the fp32 logits by {diff:.2e}")
    return diff


def _quantize(b: Build, source: Path, previous: Path | None, after_qat: bool = False) -> None:
    """PTQ of `source` into b.int8_onnx (with bias correction when the recipe asks, but not after QAT), recorded
    in the report."""
    q = b.recipe.quantize
    calib = b.calibration.calib.inputs
    with b.stage("quantize_qat" if after_qat else "quantize") as s:
        prev_cache = previous / "calibration-cache" if previous else None
        b.report["quantize"] = quantize.quantize(source, b.int8_onnx, calib, q, b.workdir / "calibration-cache",
                                                 prev_cache)  # fmt: skip
        reused = b.report["quantize"]["calibration"]["cache_reused"]
        s["notes"] = f"{q.target}, {q.calibration.method}" + (", cached ranges reused" if reused else "")
        if q.target == "tensorrt":
            for w in verify_trt.check_qdq(b):
                b.warn(w)
    if q.bias_correction and not after_qat:
        from .stages.bias_correction import correct_bias

        with b.stage("bias_correction") as s:
            record = correct_bias(source, b.int8_onnx, calib, b.int8_onnx)
            b.report["bias_correction"] = record
            s["notes"] = f"{record['layers']} layers corrected on {record['images']} calibration images"
    b.accuracy = None  # the int8 model changed


def _missed(b: Build, threads: int | None) -> list[str]:
    """The accuracy thresholds the current int8 model misses on the evaluation images."""
    return verify.missed_thresholds(b.recipe.verify, b.evaluate(threads))


def _qat(b: Build, opts: BuildOptions, ptq_source: Path, threads: int | None) -> Path:
    """Fine-tune with fake quantization and KD from the fp32 model, then quantize the result (stages/qat.py).
    Returns the fp32 model the kept int8 one was quantized from."""
    from .stages import export_onnx, qat
    from .train import image_folder, train_transform

    r, q = b.recipe, b.recipe.quantize
    if b.model is None:
        raise DeployError("quantize.qat needs a PyTorch model, not an ONNX file")
    if opts.train is None:
        raise DeployError("quantize.qat: on needs training images: pass --train DIR")
    before = dict(b.evaluate(threads))
    ptq_report = {k: b.report[k] for k in ("quantize", "bias_correction", "pad_depthwise") if k in b.report}
    with tempfile.TemporaryDirectory(dir=b.workdir) as keep:
        kept = {p: Path(keep, p.name) for p in (b.int8_onnx, b.workdir / PREPARED) if p.is_file()}
        for path, copy in kept.items():
            shutil.copy(path, copy)
        with b.stage("qat") as s:
            images = image_folder(opts.train, train_transform(r.preprocess, r.distill.augment), None, "training")
            tuned, history = qat.qat(b.model, b.model, images, q.qat, r.train, q.target, r.preprocess.input_size)
            source = b.workdir / PREPARED
            export_onnx.export(tuned, source, r.export, r.preprocess.input_size)
            reason = "quantize.qat: on" if q.qat.mode == "on" else \
                "post-training int8 missed: " + "; ".join(verify.missed_thresholds(r.verify, before))  # fmt: skip
            b.report["qat"] = {"mode": q.qat.mode, "history": history, "ptq": _figures(before), "reason": reason}
            s["notes"] = f"{len(history)} epochs on {min(len(images), q.qat.images or len(images))} images"
        source = _pad_depthwise(b, source, threads)
        b.report.pop("bias_correction", None)
        _quantize(b, source, None, after_qat=True)
        after = b.evaluate(threads)
        b.report["qat"]["int8"] = _figures(after)
        if _score(b, after) <= _score(b, before):
            return source
        (b.workdir / PREPARED).unlink()
        for path, copy in kept.items():
            copy.replace(path)
    b.report.update(ptq_report)
    b.report["qat"]["kept"] = "post-training"
    b.accuracy = before
    b.warn(f"QAT made int8 worse ({figures(after)}; post-training {figures(before)}): kept the post-training model")
    return ptq_source


def _score(b: Build, acc: dict) -> tuple:
    """Lower is better: thresholds missed, then disagreement with fp32 (less noisy than the top-1 drop, in
    which flips either way cancel)."""
    return len(verify.missed_thresholds(b.recipe.verify, acc)), -acc["agreement"]


def _mixed_precision(b: Build, source: Path, threads: int | None) -> None:
    from .mixed_precision import MixedPrecisionFailed, fallback

    images = b.validation or b.calibration.heldout
    labels = b.validation.labels if b.validation else None
    with b.stage("mixed_precision") as s:
        try:
            record = fallback(source, b.calibration.calib.inputs, images.inputs, labels, b.recipe.quantize,
                              b.recipe.verify, b.int8_onnx, b.workdir / "calibration-cache", threads=threads,
                              ref=b.fp32_logits)  # the original fp32 model's, as verify measures  # fmt: skip
        except MixedPrecisionFailed as err:  # the int8 model stays as it was; verify reports what it misses
            b.report["mixed_precision"] = {**err.record, "error": str(err)}
            b.warn(str(err))
            s["notes"] = "failed"
            return
        if b.recipe.quantize.bias_correction:
            record["note"] = "re-quantized from the calibration ranges without bias correction"
        b.report["mixed_precision"] = record
        s["notes"] = f"{len(record['float_layers'])} layers kept in float: " + ", ".join(record["float_layers"])
    b.accuracy = None


def _figures(acc: dict) -> dict:
    return {k: acc[k] for k in ("top1_drop", "agreement", "sqnr_db") if k in acc}
