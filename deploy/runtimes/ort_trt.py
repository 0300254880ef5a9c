"""ONNX Runtime with its TensorRT (then CUDA) execution provider: TensorRT without building engines by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DeployError
from .base import Runtime

PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


class OrtTensorRT(Runtime):
    """onnxruntime-gpu's TensorRT EP, falling back to the CUDA EP for nodes TensorRT does not take.
    Its engines are cached next to the model (`cache_dir`). Latency is wall-clock (the base class)."""

    def __init__(self, model: Path, cache_dir: Path, fp16: bool = False):
        import onnxruntime as ort

        missing = [p for p in PROVIDERS if p not in ort.get_available_providers()]
        if missing:
            raise DeployError(f"--runtime ort-trt needs onnxruntime-gpu built with {', '.join(missing)} "
                              f"(this onnxruntime has {', '.join(ort.get_available_providers())})")  # fmt: skip
        import onnx

        quantized = any(n.op_type == "QuantizeLinear" for n in onnx.load(str(model), load_external_data=False).graph.node)
        cache_dir.mkdir(parents=True, exist_ok=True)
        trt_options = {
            "trt_int8_enable": quantized,  # with Q/DQ nodes and no calibration table: explicit quantization
            "trt_fp16_enable": fp16,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache_dir),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache_dir),
        }
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(model), opts, providers=[(PROVIDERS[0], trt_options), PROVIDERS[1], "CPUExecutionProvider"]
        )
        if PROVIDERS[0] not in self.session.get_providers():
            raise DeployError(f"ONNX Runtime did not enable its TensorRT provider for {model.name} "
                              f"(active: {', '.join(self.session.get_providers())})")  # fmt: skip
        self.input_name = self.session.get_inputs()[0].name
        self.name = "onnxruntime-tensorrt" + (" fp16" if fp16 else "")
        self.threads = 1

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]
