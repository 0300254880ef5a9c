"""The engine stage (verify.runtime tensorrt): a TensorRT engine of `tensorrt.precision` built in the build
folder, after checking that TensorRT's parser would take the model (runtimes/tensorrt/qdq_check.py)."""

from __future__ import annotations

from ..core.context import Build
from ..errors import DeployError
from ..recipe import Recipe


class Engine:
    name = "build_trt"

    def preflight(self, recipe: Recipe) -> None:
        """Refuse, before any work, a build whose engine cannot be built here."""
        if recipe.verify.runtime != "tensorrt":
            return
        from ..runtimes.tensorrt import unavailable

        if why := unavailable():
            raise DeployError(f"--runtime tensorrt: {why}")
        if recipe.tensorrt.precision == "int8" and not (recipe.quantize.enabled and recipe.quantize.target == "tensorrt"):
            raise DeployError("tensorrt.precision int8 needs --int8 --target tensorrt (or set tensorrt.precision: fp16)")

    def applies(self, b: Build) -> bool:
        return b.recipe.verify.runtime == "tensorrt"

    def run(self, b: Build) -> str:
        import onnx

        from ..runtimes.tensorrt.builder import build_engine
        from ..runtimes.tensorrt.qdq_check import refuse_errors

        precision = b.recipe.tensorrt.precision
        model = b.int8_onnx if precision == "int8" else b.fp32_onnx
        # the final int8 model (mixed precision may have re-quantized it since the quantize stage checked it)
        refuse_errors(onnx.load(str(model)), model, precision == "int8")
        side = build_engine(model, b.workdir, b.recipe.tensorrt, precision)
        b.report["engine"] = side
        b.engine = b.workdir / f"model.{precision}.engine"
        return f"{precision} engine, TensorRT {side['tensorrt']} on {side['gpu']}, {side['build_seconds']:.0f}s"
