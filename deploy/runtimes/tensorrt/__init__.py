"""TensorRT: the engine builder (builder.py), the engine sidecar (sidecar.py), the runtime (runtime.py) and the
ONNX checks TensorRT's parser would fail (qdq_check.py). TensorRT itself is imported only where it runs."""

from .runtime import TensorRTEngine, chunks, environment, run_in_profile, unavailable

__all__ = ["TensorRTEngine", "chunks", "environment", "run_in_profile", "unavailable"]
