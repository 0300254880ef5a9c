"""The build context: what a build was given (BuildOptions) and what flows between its stages (Build)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from .. import metrics
from ..console import info, warn
from ..data import CalibrationData
from ..evalset import EvalSet
from ..recipe import Recipe
from ..runtimes.ort import OrtCpu, exact_int8_kernels

# The fp32 model the int8 one is quantized from, kept in the build folder when it is not model.fp32.onnx
# (equalized, padded, or fine-tuned by QAT): `deploy diagnose` re-quantizes from it with the cached ranges.
PREPARED = "model.fp32.prepared.onnx"


@dataclass
class BuildOptions:
    """Where a build's data comes from and goes: folders, or (Python API) the user's data sources and module."""

    calib: Any = None  # a folder, or a Dataset / DataLoader / iterable of preprocessed images (deploy.sources)
    val: Any = None  # a labeled folder (one subfolder per class), or a source of (image, label)
    out: Path | None = None
    force: bool = False
    train: Any = None  # images for distill and QAT: class folders (distill: also unlabeled), or a torch Dataset
    module: nn.Module | None = None  # the user's own model (deploy.build(net, ...)); copied, never modified
    evaluate: Callable[[Callable], Mapping[str, float]] | None = None  # the user's metrics (deploy.api.build)


@dataclass
class Build:
    """The state of one build. Stages read and write these fields; each records its part of report.json under
    its own key of `report` (the schema of report.json is the report's, see core/report.py)."""

    recipe: Recipe
    options: BuildOptions
    workdir: Path  # the temporary folder that becomes --out
    previous: Path | None = None  # the build this one replaces (its calibration cache is reused)
    model: nn.Module | None = None  # the PyTorch model, as the stages so far left it
    original: nn.Module | None = None  # the model before pruning: distillation's default teacher
    fp32_onnx: Path | None = None
    source: Path | None = None  # the fp32 model the int8 one is quantized from (fp32_onnx or PREPARED)
    int8_onnx: Path | None = None
    engine: Path | None = None
    calibration: CalibrationData | None = None
    validation: EvalSet | None = None  # labeled (--val), streamed
    heldout: EvalSet | None = None  # the held-out calibration images, without --val
    fp32_logits: np.ndarray | None = None  # on the evaluation images
    accuracy: dict | None = None  # of the current int8 model (None: not evaluated since it changed)
    report: dict = field(default_factory=dict)

    @property
    def threads(self) -> int | None:
        return self.recipe.verify.latency.threads

    @property
    def eval_images(self) -> EvalSet:
        """The images accuracy is judged on: --val, else the held-out calibration images."""
        return self.validation if self.validation is not None else self.heldout

    @contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        """Time a step and record it in report["stages"] (in start order); the block may set entry["notes"]."""
        info(f"[{name}] ...")
        start = time.perf_counter()
        entry = {"name": name}
        self.report["stages"].append(entry)
        yield entry
        entry["seconds"] = round(time.perf_counter() - start, 3)
        info(f"[{name}] done in {entry['seconds']:.1f}s" + (f": {entry['notes']}" if entry.get("notes") else ""))

    def warn(self, msg: str) -> None:
        warn(msg)
        self.report["warnings"].append(msg)

    def int8_changed(self) -> None:
        """The int8 model was rewritten: its accuracy must be measured again."""
        self.accuracy = None

    def missed(self) -> list[str]:
        """The accuracy thresholds the current int8 model misses on the evaluation images."""
        return metrics.missed_thresholds(self.recipe.verify, self.evaluate())

    def evaluate(self) -> dict:
        """Accuracy of fp32 (and of the current int8 model) on the evaluation images, measured once per model, all
        models of one call in one pass over the images."""
        if self.accuracy is not None:
            return self.accuracy
        v, target, threads, images = self.recipe.verify, self.recipe.quantize.target, self.threads, self.eval_images
        runtimes = {} if self.fp32_logits is not None else {"fp32": OrtCpu(self.fp32_onnx, threads)}
        if self.int8_onnx:
            # TensorRT and OpenVINO accumulate int8 products exactly in int32: their accuracy is that of the exact
            # Q/DQ arithmetic, which ORT's CPU kernels may not reproduce (see exact_int8_kernels).
            runtimes["int8"] = OrtCpu(self.int8_onnx, threads, reference=target != "ort-cpu")
            if target == "ort-cpu" and not exact_int8_kernels():
                runtimes["reference"] = OrtCpu(self.int8_onnx, threads, reference=True)
        start = time.perf_counter()
        got = metrics.logits_many(runtimes, images, v.batch, "Evaluating " + ", ".join(runtimes)) if runtimes else {}
        if "fp32" in got:
            self.fp32_logits = got["fp32"]
            self._record_eval_images(images, list(runtimes), time.perf_counter() - start)
        ref, labels = self.fp32_logits, images.labels
        acc: dict = {"dataset": f"{len(images)} {'labeled validation' if self.validation is not None else 'held-out'} images"
                     + _sample_note(images.sampled)}  # fmt: skip
        if labels is not None:
            acc["fp32"] = metrics.accuracy(ref, labels)
        if self.int8_onnx:
            acc.update(metrics.compare(ref, got["int8"], labels), compared=len(images),
                       int8_evaluated_on=runtimes["int8"].name)  # fmt: skip
            if "reference" in got:
                acc["reference"] = metrics.compare(ref, got["reference"], labels)
        self.accuracy = acc
        return acc

    def _record_eval_images(self, images: EvalSet, models: list[str], seconds: float) -> None:
        """After the first pass: how many images were evaluated, the unreadable ones skipped, and how fast."""
        if self.validation is None:
            return
        self.report["validation"].update(evaluated=len(images), skipped=len(images.skipped), workers=images.workers,
                                         first_pass={"models": models, "seconds": round(seconds, 2),
                                                     "images_per_s": round(len(images) / seconds, 1)})  # fmt: skip
        if images.skipped:
            self.warn(f"{len(images.skipped)} unreadable validation images were skipped (first: {images.skipped[0]})")


def _sample_note(sampled: dict | None) -> str:
    if not sampled:
        return ""
    if "of" in sampled:
        return f" (verify.val_limit: drawn from {sampled['of']} with seed {sampled['seed']})"
    return " (verify.val_limit: the first ones)"
