"""report["stages_summary"]: params, MACs, ORT batch-1 p50 (and top-1 with a validation set) of the model after
each PyTorch stage that changes it (prune, distill), then of the exported fp32 and int8 models."""

from __future__ import annotations

from .. import macs, metrics
from ..core.context import Build
from ..runtimes.ort import OrtCpu
from .export_onnx import export


def start(b: Build) -> None:
    """The unpruned model's row, before the first stage that changes the model."""
    if "stages_summary" not in b.report:
        b.report["stages_summary"] = []
        record(b, "original")


def record(b: Build, name: str) -> None:
    """Add the current PyTorch model's row."""
    r, lat = b.recipe, b.recipe.verify.latency
    path = b.workdir / f".{name}.onnx"
    export(b.model, path, r.export.model_copy(update={"simplifier": "none"}), r.preprocess.input_size)
    rt = OrtCpu(path, lat.threads)
    shape = (3, r.preprocess.input_size, r.preprocess.input_size)
    entry = {"stage": name, **macs.count(b.model, r.preprocess.input_size),
             "p50_ms": rt.benchmark(shape, lat.batch, lat.warmup, lat.runs).p50_ms}  # fmt: skip
    if b.validation is not None:
        logits = metrics.logits(rt, b.validation, r.verify.batch, f"Evaluating after {name}")
        entry["top1"] = metrics.accuracy(logits, b.validation.labels)["top1"]
    path.unlink()
    b.report["stages_summary"].append(entry)


def after_verify(b: Build) -> None:
    """The exported fp32 model and the int8 one, from what verify measured."""
    acc, lat, last = b.report["accuracy"], b.report["latency"], b.report["stages_summary"][-1]
    for precision in ("fp32", "int8"):
        if precision in lat:
            b.report["stages_summary"].append({
                "stage": f"{precision} onnx", "params": last["params"], "macs": last["macs"],
                "p50_ms": lat[precision]["p50_ms"], **({"top1": acc[precision]["top1"]} if precision in acc else {}),
            })  # fmt: skip
