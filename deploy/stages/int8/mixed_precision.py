"""Mixed precision: keep the fewest layers in float that bring the int8 model within the verify thresholds.

Layers are ranked by the logit SQNR each gains when it alone is kept in float (sensitivity.variants, on
`quantize.mixed_precision.images` evaluation images), then added to the float set one at a time, re-quantizing
from the cached calibration ranges and evaluating on all the evaluation images (exact Q/DQ arithmetic) after
each addition, until `verify.max_top1_drop` (with labels), `min_agreement` and `min_sqnr_db` are all met, or
`max_float_layers` are in float and the build fails. The record says which layers, the figures after each
addition and what each costs in latency: ORT batch-1 time of the model at each step against the all-int8 one.

What "a layer in float" means is onnxruntime's `nodes_to_exclude`: the node computes in float on float weights,
and the Q/DQ pairs on its inputs go away unless another node needs them. A tensor both made and read by int8
nodes stays quantized: on the ort-cpu target every int8 node quantizes its output, so there an activation whose
range int8 cannot hold is fixed only with its producer and all its consumers in float, which single-layer
exclusions do not reveal (tensorrt quantizes inputs only: excluding the consumers is enough).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from . import sensitivity
from ...console import info
from ...core.context import Build
from ...errors import DeployError
from ...evalset import EvalSet
from ...recipe import QuantizeConfig, VerifyConfig
from ...core.report import figures as figures_line
from ...runtimes.base import interleaved_best_ms
from ...runtimes.ort import OrtCpu
from ... import metrics


class MixedPrecisionFailed(DeployError):
    """Even `max_float_layers` layers in float miss a threshold; `record` holds every step tried."""

    def __init__(self, message: str, record: dict):
        super().__init__(message)
        self.record = record


def rank(fp32: Path, calib: np.ndarray, cfg: QuantizeConfig, int8: Path, images: np.ndarray, ref: np.ndarray,
         labels: np.ndarray | None, ranges: Path, threads: int | None = None) -> list[dict]:
    """The quantized nodes of `int8` whose exclusion alone raises the logit SQNR, best first, with their figures."""
    base = sensitivity.evaluate(int8, images, ref, labels, threads=threads)
    nodes = sensitivity.quantized_nodes(fp32, int8)
    per = sensitivity.variants(fp32, calib, cfg, nodes, images, ref, labels, ranges, ("excluded",), threads)
    rows = [{"node": n, **v["excluded"], "gain_db": sensitivity.gain_db(v["excluded"]["sqnr_db"], base["sqnr_db"])}
            for n, v in per.items()]  # fmt: skip
    return sorted((r for r in rows if r["gain_db"] > 0), key=lambda r: -r["gain_db"])


def fallback(fp32: Path, calib: np.ndarray, images: EvalSet, cfg: QuantizeConfig, thresholds: VerifyConfig,
             out: Path, ranges: Path, ranking: list[str] | None = None, threads: int | None = None,
             ref: np.ndarray | None = None) -> dict:  # fmt: skip
    """Write to `out` the int8 model of `fp32` with the fewest most sensitive layers in float that meets
    `thresholds` on `images` (top-1 when labeled; exact Q/DQ arithmetic); return the record of the search.

    `ranges`: the folder holding the calibration ranges quantize() cached for `calib` and `cfg` (the build's
    calibration-cache). `ranking`: node names, most sensitive first (e.g. from `deploy diagnose`); computed
    with `rank` when None. `ref`: the fp32 logits on `images` to measure against (the original model's, when
    `fp32` is a prepared copy); computed from `fp32` when None. Raises MixedPrecisionFailed when
    `max_float_layers` layers are not enough.
    """
    mp = cfg.mixed_precision
    applies = [name for name, value, need in (("max_top1_drop", thresholds.max_top1_drop, images.labeled),
                                              ("min_agreement", thresholds.min_agreement, True),
                                              ("min_sqnr_db", thresholds.min_sqnr_db, True)) if value is not None and need]  # fmt: skip
    if not applies:
        raise DeployError("mixed precision needs a threshold to meet: verify.max_top1_drop (with labeled --val), "
                          "min_agreement or min_sqnr_db")  # fmt: skip
    if ref is None:
        ref = metrics.logits(OrtCpu(fp32, threads), images, 32, "Evaluating fp32")
    labels = images.labels
    shape = tuple(calib.shape[1:])
    record: dict = {"thresholds": applies, "images": len(images), "max_float_layers": mp.max_float_layers}
    with tempfile.TemporaryDirectory() as tmp:
        base, step = Path(tmp) / "int8.onnx", Path(tmp) / "step.onnx"
        sensitivity.requantize(fp32, base, calib, cfg, [], ranges)
        figures = sensitivity.evaluate(base, images, ref, labels, threads=threads)
        record["int8"] = {**figures, "missed": metrics.missed_thresholds(thresholds, figures)}
        if labels is not None:
            record["fp32_top1"] = metrics.accuracy(ref, labels)["top1"]
        if not record["int8"]["missed"]:
            shutil.copyfile(base, out)
            return {**record, "float_layers": [], "steps": [], "met": True}
        if ranking is None:
            n = min(mp.images, len(images))
            first, first_labels = images.head(n)
            rows = rank(fp32, calib, cfg, base, first, ref[:n], first_labels, ranges, threads)
            record["ranking"] = {"images": n, "layers": rows}
            ranking = [r["node"] for r in rows]
        record["steps"] = []
        previous_ms = None
        for k, node in enumerate(ranking[: mp.max_float_layers], 1):
            sensitivity.requantize(fp32, step, calib, cfg, ranking[:k], ranges)
            figures = sensitivity.evaluate(step, images, ref, labels, threads=threads)
            # batch-1 time of the all-int8 model and this step's, best of alternating rounds
            int8_ms, step_ms = interleaved_best_ms([OrtCpu(base, threads), OrtCpu(step, threads)], shape, 1, 5, 10)
            missed = metrics.missed_thresholds(thresholds, figures)
            record["steps"].append({"added": node, **figures, "missed": missed, "int8_ms": round(int8_ms, 3),
                                    "ms": round(step_ms, 3), "slowdown": round(step_ms / int8_ms, 3),
                                    "added_ms": None if previous_ms is None else round(step_ms - previous_ms, 3)})  # fmt: skip
            previous_ms = step_ms
            info(f"  {k} in float (+{node}): " + figures_line(figures) + f", {step_ms / int8_ms:.2f}x the all-int8 time")
            if not missed:
                shutil.copyfile(step, out)
                final = OrtCpu(out, threads).benchmark(shape, 1, 10, 100).p50_ms
                int8_p50 = OrtCpu(base, threads).benchmark(shape, 1, 10, 100).p50_ms
                record.update(float_layers=ranking[:k], met=True, latency={"int8_p50_ms": int8_p50, "p50_ms": final,
                              "slowdown": final / int8_p50, "batch": 1, "runs": 100})  # fmt: skip
                return record
    record.update(float_layers=ranking[: mp.max_float_layers], met=False)
    last = record["steps"][-1]["missed"] if record["steps"] else record["int8"]["missed"]
    why = (f"with {len(record['steps'])} layers in float (quantize.mixed_precision.max_float_layers "
           f"{mp.max_float_layers})" if len(ranking) >= mp.max_float_layers else
           f"with all {len(ranking)} layers whose exclusion helps in float")  # fmt: skip
    raise MixedPrecisionFailed(f"mixed precision: {why}, still {last[0]}", record)


class MixedPrecision:
    name = "mixed_precision"

    def applies(self, b: Build) -> bool:
        return b.recipe.quantize.enabled and b.recipe.quantize.mixed_precision.enabled and bool(b.missed())

    def run(self, b: Build) -> str:
        try:
            record = fallback(b.source, b.calibration.calib.inputs, b.eval_images, b.recipe.quantize,
                              b.recipe.verify, b.int8_onnx, b.workdir / "calibration-cache", threads=b.threads,
                              ref=b.fp32_logits)  # the original fp32 model's, as verify measures  # fmt: skip
        except MixedPrecisionFailed as err:  # the int8 model stays as it was; verify reports what it misses
            b.report["mixed_precision"] = {**err.record, "error": str(err)}
            b.warn(str(err))
            return "failed"
        q = b.recipe.quantize
        if q.bias_correction or q.adaround.enabled:
            record["note"] = "re-quantized from the calibration ranges without AdaRound or bias correction"
        b.report["mixed_precision"] = record
        b.int8_changed()
        return f"{len(record['float_layers'])} layers kept in float: " + ", ".join(record["float_layers"])
