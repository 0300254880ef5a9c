"""The TensorRT parts of a build: the Q/DQ rule check, the engine build, verification on TensorRT.

Called by the pipeline for `quantize.target: tensorrt` and `verify.runtime: tensorrt | ort-trt`.
"""

from __future__ import annotations

from ..errors import DeployError
from . import verify


def preflight(recipe) -> None:
    """Refuse, before any work, a build whose verify.runtime cannot run here."""
    if recipe.verify.runtime == "tensorrt":
        from ..runtimes.tensorrt import unavailable

        why = unavailable()
        if why:
            raise DeployError(f"--runtime tensorrt: {why}")
        if recipe.tensorrt.precision == "int8" and not (recipe.quantize.enabled and recipe.quantize.target == "tensorrt"):
            raise DeployError("tensorrt.precision int8 needs --int8 --target tensorrt (or set tensorrt.precision: fp16)")


def check_qdq(b) -> list[str]:
    """Check the int8 model against TensorRT's Q/DQ rules: errors fail the build, fusion losses warn."""
    import onnx

    from .. import qdq_check

    model = onnx.load(str(b.int8_onnx))
    violations = qdq_check.check(model)
    b.report["qdq_check"] = qdq_check.summary(model, violations)
    b.report["failures"] += [f"TensorRT Q/DQ rule: {e}" for e in b.report["qdq_check"]["errors"]]
    warnings = b.report["qdq_check"]["warnings"]
    return [f"{len(warnings)} Q/DQ placements cost TensorRT a fusion (builds, runs slower), first: {warnings[0]}"] if warnings else []


def build_engine(b) -> str:
    """Build the engine of `tensorrt.precision` into the build folder; returns the stage notes."""
    from .build_trt import build_engine as build

    precision = b.recipe.tensorrt.precision
    side = build(b.int8_onnx if precision == "int8" else b.fp32_onnx, b.workdir, b.recipe.tensorrt, precision)
    b.report["engine"] = side
    b.engine = b.workdir / f"model.{precision}.engine"
    return f"{precision} engine, TensorRT {side['tensorrt']} on {side['gpu']}, {side['build_seconds']:.0f}s"


def verify_runtime(b, images, labels) -> dict:
    """Accuracy, parity against ORT fp32 and latency of the model on `verify.runtime`."""
    from ..runtimes.ort import OrtCpu

    r, v = b.recipe, b.recipe.verify
    if v.runtime == "tensorrt":
        from ..runtimes.tensorrt import TensorRTEngine

        rt = TensorRTEngine(b.engine)
    else:
        from ..runtimes.ort_trt import OrtTensorRT

        rt = OrtTensorRT(b.int8_onnx or b.fp32_onnx, b.workdir / "ort-trt-cache", fp16=r.tensorrt.precision == "fp16")
    ref = verify.logits(OrtCpu(b.fp32_onnx, v.latency.threads), images.inputs, v.batch, "Evaluating fp32 (reference)")
    got = verify.logits(rt, images.inputs, v.batch, f"Evaluating on {rt.name}")
    acc = verify.compare(ref, got, labels)  # agreement and SQNR against ORT fp32: the parity figures
    shape = (3, r.preprocess.input_size, r.preprocess.input_size)
    lat = rt.benchmark(shape, v.latency.batch, v.latency.warmup, v.latency.runs).to_dict()
    b.report["failures"] += [f"on {rt.name}: {m}" for m in verify.missed_thresholds(v, acc)]
    return {"runtime": rt.name, "accuracy": acc, "latency": lat}
