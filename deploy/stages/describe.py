"""The describe stage: serving.json, what the build folder serves (the recommended model, its input and output,
preprocessing and class names), so that `deploy run`, `deploy serve` and `deploy export` need no build stack."""

from __future__ import annotations

import json

from .. import data
from ..core.context import Build
from ..deployment import ORT
from ..runtimes.ort import default_threads
from ..serving.spec import SCHEMA, SPEC_FILE, model_io


class Describe:
    name = "describe"

    def applies(self, b: Build) -> bool:
        return True

    def run(self, b: Build) -> str:
        r = b.recipe
        dep = b.report.get("deployment")
        rec = b.report.get("recommended") or {"model": b.fp32_onnx.name,
                                               "precision": dep["latency"]["precision"] if dep else "fp32"}
        inp, out = model_io(b.workdir / rec["model"])
        named = b.validation.classes if b.validation is not None else None
        classes = named or data.class_names(r.model.num_classes)
        spec = {"schema": SCHEMA, "name": r.model.name, "model": rec["model"], "precision": rec["precision"],
                "input": inp.to_dict(), "output": out.to_dict(), "max_batch": r.tensorrt.batch.max,
                "preprocess": r.preprocess.model_dump(mode="json"), "classes": classes,
                **_threads(b.report)}  # fmt: skip
        (b.workdir / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
        return f"{SPEC_FILE}: {rec['model']}, input {inp.name} {inp.shape}, {len(classes)} classes"


def _threads(report: dict) -> dict:
    """The thread count the build measured fastest for the served model, and the cores it had (serving uses it on a
    machine with as many; elsewhere all cores); the runtime, when the fastest was OpenVINO."""
    dep = report.get("deployment")
    if not dep:
        return {}
    fastest = dep["latency"]
    out = {"threads": fastest["threads"], "cores": default_threads()}
    return out | ({"runtime": fastest["runtime"]} if fastest["runtime"] != ORT else {})
