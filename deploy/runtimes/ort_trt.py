"""ONNX Runtime with its TensorRT (then CUDA) execution provider: TensorRT without building engines by hand.

onnxruntime-gpu is built against one TensorRT/CUDA pair and must match the image's: 1.20 pairs with TensorRT 10.4
and CUDA 12.0-12.6, 1.21 with TensorRT 10.8 and CUDA 12.0-12.8 (NVIDIA's 25.01 container; docker/Dockerfile.x86),
per https://onnxruntime.ai/docs/execution-providers/TensorRT-ExecutionProvider.html#requirements.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from ..console import warn
from ..errors import DeployError
from .base import Runtime

PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def profile_options(input_name: str, chw: list[int], batch) -> dict[str, str]:
    """The TensorRT EP's explicit optimization profile for batches batch.min..max (tuned for opt): without it
    the EP builds a new engine for every batch size it meets."""
    def shape(n: int) -> str:
        return f"{input_name}:{'x'.join(str(d) for d in (n, *chw))}"

    return {"trt_profile_min_shapes": shape(batch.min), "trt_profile_opt_shapes": shape(batch.opt),
            "trt_profile_max_shapes": shape(batch.max)}  # fmt: skip


def node_providers(profile: list[dict]) -> dict[str, int]:
    """Kernel runs per execution provider in an onnxruntime session profile (the `args.provider` of its Node
    events): where the nodes ran, which `get_providers()` (the providers registered) does not say."""
    kernels = [e for e in profile if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    return dict(Counter(e["args"]["provider"] for e in kernels if "provider" in e.get("args", {})))


class OrtTensorRT(Runtime):
    """onnxruntime-gpu's TensorRT EP, falling back to the CUDA EP (never the CPU) for nodes TensorRT does not take.
    Its engines are cached in `cache_dir`, built once for the batch profile `batch`. A first run, profiled, records
    where the nodes ran (`placement`); no node on TensorRT is an error. Latency is wall-clock (the base class)."""

    def __init__(self, model: Path, cache_dir: Path, batch, fp16: bool = False):
        import onnx
        import onnxruntime as ort

        from .tensorrt.builder import onnx_facts

        missing = [p for p in PROVIDERS if p not in ort.get_available_providers()]
        if missing:
            raise DeployError(f"--runtime ort-trt needs onnxruntime-gpu built with {', '.join(missing)} "
                              f"(this onnxruntime has {', '.join(ort.get_available_providers())})")  # fmt: skip
        name, dims, quantized = onnx_facts(onnx.load(str(model), load_external_data=False))
        cache_dir.mkdir(parents=True, exist_ok=True)
        trt_options = {
            "trt_int8_enable": quantized,  # with Q/DQ nodes and no calibration table: explicit quantization
            "trt_fp16_enable": fp16 or quantized,  # layers outside Q/DQ pairs in fp16 (see build_trt.py)
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache_dir),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache_dir),
            **profile_options(name, dims[1:], batch),
        }
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.enable_profiling = True
        opts.profile_file_prefix = str(cache_dir / "placement")
        # a node neither TensorRT nor CUDA takes fails the session instead of running on the CPU unnoticed
        opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        try:
            self.session = ort.InferenceSession(str(model), opts, providers=[(PROVIDERS[0], trt_options), PROVIDERS[1]])
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own Fail/RuntimeException types
            raise DeployError(f"ONNX Runtime could not place {model.name} on TensorRT/CUDA: "
                              f"{str(err).splitlines()[0][:300]}") from None  # fmt: skip
        self.input_name = self.session.get_inputs()[0].name
        self.session.run(None, {self.input_name: np.zeros((batch.opt, *dims[1:]), np.float32)})
        trace = Path(self.session.end_profiling())
        self.placement = node_providers(json.loads(trace.read_text()))
        trace.unlink()
        if not self.placement.get(PROVIDERS[0]):
            raise DeployError(f"ONNX Runtime ran no node of {model.name} on TensorRT (kernel runs: {self.placement})")
        others = {p: n for p, n in self.placement.items() if p != PROVIDERS[0]}
        if others:
            warn(f"ort-trt: {sum(others.values())} kernels of {model.name} ran outside TensorRT ({others})")
        self.name = "onnxruntime-tensorrt" + (" fp16" if fp16 else "")
        self.threads = 1
        self.batch = batch

    def infer(self, batch: np.ndarray) -> np.ndarray:
        from .tensorrt import run_in_profile

        return run_in_profile(batch, self.batch.min, self.batch.max,
                              lambda x: self.session.run(None, {self.input_name: x})[0])  # fmt: skip
