"""Run a build: the stages in order, each timed, into a temporary folder renamed into place at the end."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__, data, int8, models, output, report
from .console import info, warn
from .errors import DeployError, ThresholdMissed
from .recipe import Recipe
from .runtimes.base import interleaved_best_ms
from .runtimes.ort import OrtCpu, exact_int8_kernels
from .stages import export_onnx, fold_bn, verify, verify_trt

BUILTIN_CALIBRATION_WARNING = (
    "calibrated on the built-in sample photos (no --calib given): fine for trying the tool, "
    "not for production; pass --calib DIR with a few hundred images from your deployment domain"
)


@dataclass
class BuildOptions:
    calib: Path | None = None
    val: Path | None = None
    out: Path | None = None
    force: bool = False
    train: Path | None = None  # images for the distill stage (labeled class folders, or unlabeled)


@dataclass
class Build:
    """What flows between stages: the model in its current forms and what each stage recorded."""

    recipe: Recipe
    workdir: Path
    model: nn.Module | None = None
    fp32_onnx: Path | None = None
    int8_onnx: Path | None = None
    engine: Path | None = None
    calibration: data.CalibrationData | None = None
    validation: data.ImageSet | None = None
    report: dict = field(default_factory=dict)
    fp32_logits: np.ndarray | None = None  # on the evaluation images
    accuracy: dict | None = None  # of the current int8 model (None: not evaluated since it changed)

    @contextmanager
    def stage(self, name: str):
        info(f"[{name}] ...")
        start = time.perf_counter()
        entry = {"name": name}
        yield entry
        entry["seconds"] = round(time.perf_counter() - start, 3)
        self.report["stages"].append(entry)
        info(f"[{name}] done in {entry['seconds']:.1f}s" + (f": {entry['notes']}" if entry.get("notes") else ""))

    def warn(self, msg: str) -> None:
        warn(msg)
        self.report["warnings"].append(msg)

    def evaluate(self, threads: int | None) -> dict:
        """Accuracy of fp32 (and of the current int8 model) on the --val images, else the held-out ones."""
        if self.accuracy is not None:
            return self.accuracy
        v, target = self.recipe.verify, self.recipe.quantize.target
        labels = self.validation.labels if self.validation else None
        images = self.validation or self.calibration.heldout
        acc: dict = {"dataset": f"{len(images)} {'labeled validation' if self.validation else 'held-out'} images"}
        if self.fp32_logits is None:
            self.fp32_logits = verify.logits(OrtCpu(self.fp32_onnx, threads), images.inputs, v.batch, "Evaluating fp32")
        ref = self.fp32_logits
        if labels is not None:
            acc["fp32"] = verify.accuracy(ref, labels)
        if self.int8_onnx:
            # TensorRT accumulates int8 products exactly in int32: its accuracy is that of the exact Q/DQ
            # arithmetic, which ORT's CPU kernels may not reproduce (see exact_int8_kernels).
            int8 = OrtCpu(self.int8_onnx, threads, reference=target == "tensorrt")
            got = verify.logits(int8, images.inputs, v.batch, "Evaluating int8")
            acc.update(verify.compare(ref, got, labels), compared=len(images), int8_evaluated_on=int8.name)
            if target == "ort-cpu" and not exact_int8_kernels():
                exact = OrtCpu(self.int8_onnx, threads, reference=True)
                got = verify.logits(exact, images.inputs, v.batch, "Evaluating int8 (exact)")
                acc["reference"] = verify.compare(ref, got, labels)
        self.accuracy = acc
        return acc


def default_out(recipe: Recipe) -> Path:
    return Path("build") / recipe.model.name


def build(recipe: Recipe, opts: BuildOptions) -> dict:
    """Run every stage of `recipe`; return report.json's content. Raises ThresholdMissed after writing
    the complete output when a recipe threshold is missed."""
    verify_trt.preflight(recipe)
    out = (opts.out or default_out(recipe)).resolve()
    with output.replacing(out, opts.force) as tmp:
        b = Build(recipe, tmp)
        _run(b, opts, previous=out if output.is_build(out) else None)
    info(f"wrote {out}/report.md")
    if b.report["failures"]:
        raise ThresholdMissed("; ".join(b.report["failures"]))
    return b.report


def _run(b: Build, opts: BuildOptions, previous: Path | None) -> None:
    r, q = b.recipe, b.recipe.quantize
    threads = r.verify.latency.threads
    b.report.update({
        "schema": 1,
        "tool": {"name": "edge-deploy", "version": __version__},
        "model": r.model.name,
        "target": q.target,
        "int8": q.enabled,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe": r.model_dump(mode="json"),
        "stages": [],
        "warnings": [],
        "failures": [],
    })  # fmt: skip
    pre = data.Preprocessor(r.preprocess)

    if r.model.source != "onnx":
        with b.stage("load") as s:
            b.model = models.build(r.model)
            s["notes"] = f"{sum(p.numel() for p in b.model.parameters()) / 1e6:.2f}M parameters"
            if r.model.weights == models.RANDOM_WEIGHTS:
                b.warn("random weights (--weights random): size and latency are real, accuracy figures are not")

    with b.stage("data") as s:
        heldout = 0 if opts.val else r.verify.heldout
        b.calibration = data.calibration_data(opts.calib, pre, q.calibration.samples, q.calibration.seed, heldout)
        if opts.val:
            b.validation = data.labeled_set(opts.val, pre, r.model.num_classes)
            b.report["validation"] = {"images": len(b.validation), "class_mapping": b.validation.class_mapping}
        b.report["calibration"] = {k: v for k, v in b.calibration.manifest.items() if k != "files"}
        (b.workdir / "calibration.json").write_text(_json(b.calibration.manifest))
        skipped = len(b.calibration.calib.skipped) + (len(b.validation.skipped) if b.validation else 0)
        s["notes"] = f"{len(b.calibration.calib)} calibration images" + (
            f", {len(b.validation)} validation images" if b.validation else ""
        ) + (f", {skipped} unreadable skipped" if skipped else "")
        if skipped:
            b.warn(f"{skipped} unreadable images were skipped (calibration ones are listed in calibration.json)")
        if b.calibration.manifest["builtin"]:
            b.warn(BUILTIN_CALIBRATION_WARNING)

    if r.model.source == "onnx":
        with b.stage("import_onnx") as s:
            b.fp32_onnx = b.workdir / "model.fp32.onnx"
            s["notes"] = export_onnx.import_onnx(Path(r.model.weights), b.fp32_onnx)
            b.report["export"] = {"source": r.model.weights, "note": s["notes"]}
    else:
        _pytorch_stages(b, opts, threads)

    if q.enabled:
        int8.build_int8(b, opts, previous, threads)

    if r.verify.runtime == "tensorrt":
        with b.stage("build_trt") as s:
            s["notes"] = verify_trt.build_engine(b)

    with b.stage("verify") as s:
        _verify(b, threads)
        if r.verify.runtime != "ort":
            images = b.validation or b.calibration.heldout
            b.report["runtime"] = verify_trt.verify_runtime(b, images, b.validation.labels if b.validation else None)
        s["notes"] = _verify_summary(b.report)

    b.report["size_bytes"] = {
        "fp32": b.fp32_onnx.stat().st_size,
        **({"int8": b.int8_onnx.stat().st_size} if b.int8_onnx else {}),
    }
    if "stages_summary" in b.report:
        _summary_after_verify(b)
    b.report["passed"] = not b.report["failures"]
    report.write(b.report, b.workdir)


def _pytorch_stages(b: Build, opts: BuildOptions, threads: int | None) -> None:
    """prune / distill, fold_bn and export_onnx: the stages that need the PyTorch model."""
    r = b.recipe
    probe = torch.from_numpy(b.calibration.calib.inputs[:8])
    if r.prune.enabled or r.distill.enabled:  # before fold_bn: BN-scale importance and training need BatchNorm
        _prune_and_distill(b, opts)
    if r.fold_bn.enabled:
        with b.stage("fold_bn") as s:
            folded, names = fold_bn.fold_batchnorm(b.model)
            diff, rel = fold_bn.max_logit_difference(b.model, folded, probe)
            b.report["fold_bn"] = {"folded": len(names), "max_abs_logit_diff": diff, "relative": rel}
            s["notes"] = f"{len(names)} BatchNorm folded, max |logit diff| {diff:.2e}"
            if rel > r.fold_bn.tolerance:
                raise DeployError(f"BN folding changed the logits by {rel:.2e} (relative) > {r.fold_bn.tolerance}")
            b.model = folded

    with b.stage("export_onnx") as s:
        b.fp32_onnx = b.workdir / "model.fp32.onnx"
        proto = export_onnx.export(b.model, b.fp32_onnx, r.export, r.preprocess.input_size)
        with torch.no_grad():
            ref = b.model(probe).numpy()
        got = OrtCpu(b.fp32_onnx, threads).infer(probe.numpy())
        diff = float(np.abs(ref - got).max())
        rel = diff / max(float(np.abs(ref).max()), 1e-12)
        b.report["export"] = {"opset": r.export.opset, "exporter": r.export.exporter, "nodes": len(proto.graph.node),
                              "parity": {"max_abs_logit_diff": diff, "relative": rel, "images": len(probe)}}  # fmt: skip
        s["notes"] = f"opset {r.export.opset}, {len(proto.graph.node)} nodes, PyTorch vs ORT max |diff| {diff:.2e}"
        if rel > r.export.tolerance:
            raise DeployError(f"ONNX Runtime output differs from PyTorch by {rel:.2e} (relative) > {r.export.tolerance}")


def _verify(b: Build, threads: int | None) -> None:
    r, v, target = b.recipe, b.recipe.verify, b.recipe.quantize.target
    b.report["accuracy"] = acc = b.evaluate(threads)
    if "reference" in acc:
        b.warn(_saturation_warning(acc))
    chance = 100.0 / r.model.num_classes
    if "fp32" in acc and acc["fp32"]["top1"] < chance:
        b.warn(f"fp32 top-1 {acc['fp32']['top1']:.2f}% is below chance ({chance:.2f}%): do the validation folders "
               f"name the model's classes? ({b.validation.class_mapping})")  # fmt: skip
    b.report["failures"] += verify.missed_thresholds(v, acc)

    shape = (3, r.preprocess.input_size, r.preprocess.input_size)
    fp32 = OrtCpu(b.fp32_onnx, threads)
    lat: dict = {"runtime": fp32.name}
    runtimes = [("fp32", fp32)] + ([("int8", OrtCpu(b.int8_onnx, threads))] if b.int8_onnx else [])
    for name, rt in runtimes:
        info(f"  measuring {name} latency ({v.latency.runs} runs)")
        lat[name] = rt.benchmark(shape, v.latency.batch, v.latency.warmup, v.latency.runs).to_dict()
    if b.int8_onnx:
        lat["int8_speedup"] = lat["fp32"]["p50_ms"] / lat["int8"]["p50_ms"]
        lat["int8_throughput_speedup"] = lat["int8"]["throughput_ips"] / lat["fp32"]["throughput_ips"]
        if target == "tensorrt":
            lat["note"] = "the tensorrt-target model on ORT CPU; TensorRT latency comes from the engine on the GPU"
        if target == "ort-cpu":  # the recommendation's speed figure: both timed in alternating rounds
            fp32_ms, int8_ms = interleaved_best_ms([fp32, runtimes[1][1]], shape, batch=1)
            lat["int8_speedup_interleaved"] = fp32_ms / int8_ms
        b.report["recommended"] = _recommend(target, verify.missed_thresholds(v, acc), lat)
        if b.report["recommended"]["precision"] == "fp32":
            b.warn(f"deploy the fp32 model: {b.report['recommended']['reason']}")
        elif target == "ort-cpu" and lat["int8_throughput_speedup"] < 1:
            b.warn(f"int8 is faster at batch 1 but slower at batch {v.latency.batch} "
                   f"({lat['int8_throughput_speedup']:.2f}x throughput) on {fp32.name}")  # fmt: skip
    b.report["latency"] = lat
    b.report["environment"] = {**report.environment(fp32.threads), "exact_int8_kernels": exact_int8_kernels()}


# int8 counts as slower below this batch-1 speedup: two sessions of one model differ by up to ~1.5% here
SLOWER = 0.95


def _recommend(target: str, missed: list[str], lat: dict) -> dict:
    """The model to deploy (`deploy run` / `serve` pick it from a build folder): int8 unless it misses an
    accuracy threshold or, on ORT CPU, runs slower than fp32 at batch 1."""
    int8 = {"model": "model.int8.onnx", "precision": "int8"}
    fp32 = {"model": "model.fp32.onnx", "precision": "fp32"}
    if missed:
        return {**fp32, "reason": "int8 misses " + "; ".join(missed)}
    if target == "tensorrt":
        return {**int8, "reason": "made for TensorRT, which runs it in int8 (ORT CPU runs this form slowly)"}
    speedup = lat["int8_speedup_interleaved"]
    if speedup < SLOWER:
        return {**fp32, "reason": f"int8 is slower than fp32 on {lat['runtime']} at batch 1 ({speedup:.2f}x, "
                                  "timed in alternating rounds); its accuracy is within the thresholds"}  # fmt: skip
    return {**int8, "reason": f"within the accuracy thresholds and {speedup:.2f}x the speed of fp32 at batch 1 on "
                              f"{lat['runtime']} (timed in alternating rounds)"}  # fmt: skip


def _saturation_warning(acc: dict) -> str:
    exact = acc["reference"]
    if "top1_drop" in acc:
        figures = f"int8 top-1 drop {acc['top1_drop']:.2f} points here vs {exact['top1_drop']:.2f} with exact arithmetic"
    else:
        figures = f"agreement {acc['agreement']:.1f}% here vs {exact['agreement']:.1f}% with exact arithmetic"
    return (
        f"this CPU has no VNNI/AMX int8 dot-product instructions, so ORT's U8S8 kernels saturate: {figures} "
        "(what VNNI/AMX CPUs compute); for deployment on such CPUs set quantize.reduce_range: true or keep fp32"
    )


def _verify_summary(r: dict) -> str:
    acc, lat = r["accuracy"], r["latency"]
    parts = []
    if "fp32" in acc:
        parts.append(f"fp32 top-1 {acc['fp32']['top1']:.2f}%")
    if "int8" in acc:
        parts.append(f"int8 top-1 {acc['int8']['top1']:.2f}% (drop {acc['top1_drop']:.2f})")
    if "agreement" in acc:
        parts.append(f"agreement {acc['agreement']:.1f}%, SQNR {acc['sqnr_db']:.1f} dB")
    parts.append(f"fp32 p50 {lat['fp32']['p50_ms']:.2f} ms")
    if "int8" in lat:
        parts.append(f"int8 p50 {lat['int8']['p50_ms']:.2f} ms ({lat['int8_speedup']:.2f}x)")
    return ", ".join(parts)


def _json(obj) -> str:
    return json.dumps(obj, indent=2) + "\n"


def _prune_and_distill(b: Build, opts: BuildOptions) -> None:
    """The prune and distill stages, with params, MACs, ORT latency (and accuracy with --val) after each."""
    from .stages import distill, prune
    from .train import image_folder, train_transform

    r = b.recipe
    b.report["stages_summary"] = [_summary(b, "original")]
    original = b.model
    if r.prune.enabled:
        with b.stage("prune") as s:
            b.model, b.report["prune"] = prune.prune(b.model, r.prune, r.preprocess.input_size,
                                                     b.calibration.calib.inputs)  # fmt: skip
            torch.save(prune.pruned_checkpoint(b.model), b.workdir / "model.pruned.pth")
            p = b.report["prune"]
            s["notes"] = (f"MACs {p['before']['macs'] / 1e6:.1f}M -> {p['after']['macs'] / 1e6:.1f}M, "
                          f"params {p['before']['params'] / 1e6:.2f}M -> {p['after']['params'] / 1e6:.2f}M")  # fmt: skip
        b.report["stages_summary"].append(_summary(b, "prune"))
    if r.distill.enabled:
        if opts.train is None:
            raise DeployError("the distill stage needs training images: pass --train DIR")
        with b.stage("distill") as s:
            teacher = distill.teacher_model(r.distill, original, r.model.num_classes)
            images = image_folder(opts.train, train_transform(r.preprocess, r.distill.augment), None, "training")
            history = distill.distill(b.model, teacher, images, r.distill, r.train)
            b.report["distill"] = {"images": len(images), "history": history,
                                   "teacher": r.distill.teacher or "the model before pruning"}  # fmt: skip
            torch.save(prune.pruned_checkpoint(b.model), b.workdir / "model.distilled.pth")
            s["notes"] = f"{len(history)} epochs on {len(images)} images, final loss {history[-1]['loss']:.4f}"
        b.report["stages_summary"].append(_summary(b, "distill"))


def _summary(b: Build, name: str) -> dict:
    """Params and MACs of the current PyTorch model, and its batch-1 p50 (and top-1 with --val) on ORT."""
    from . import macs

    r, lat = b.recipe, b.recipe.verify.latency
    path = b.workdir / f".{name}.onnx"
    export_onnx.export(b.model, path, r.export.model_copy(update={"simplify": False}), r.preprocess.input_size)
    rt = OrtCpu(path, lat.threads)
    shape = (3, r.preprocess.input_size, r.preprocess.input_size)
    entry = {"stage": name, **macs.count(b.model, r.preprocess.input_size),
             "p50_ms": rt.benchmark(shape, lat.batch, lat.warmup, lat.runs).p50_ms}  # fmt: skip
    if b.validation is not None:
        logits = verify.logits(rt, b.validation.inputs, r.verify.batch, f"Evaluating after {name}")
        entry["top1"] = verify.accuracy(logits, b.validation.labels)["top1"]
    path.unlink()
    return entry


def _summary_after_verify(b: Build) -> None:
    """The exported fp32 model and the int8 one, from what verify measured."""
    acc, lat, last = b.report["accuracy"], b.report["latency"], b.report["stages_summary"][-1]
    for precision in ("fp32", "int8"):
        if precision in lat:
            b.report["stages_summary"].append({
                "stage": f"{precision} onnx", "params": last["params"], "macs": last["macs"],
                "p50_ms": lat[precision]["p50_ms"], **({"top1": acc[precision]["top1"]} if precision in acc else {}),
            })  # fmt: skip
