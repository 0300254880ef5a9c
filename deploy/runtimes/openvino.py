"""OpenVINO's CPU plugin (optional: `pip install edge-deploy[openvino]`): it reads the same ONNX files, the QDQ int8
model included (its low-precision transformations turn Q/DQ pairs into int8 kernels), and by default runs float
layers in bf16 on CPUs that have it. Measured faster than ONNX Runtime on some models and CPUs (docs/int8.md), so
the build can verify a model on it and time it for its deployment recommendation (verify.runtime: openvino)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

from ..errors import DeployError
from .base import Runtime

RUNTIME = "openvino-cpu"  # its name in report.json's deployment grid and serving.json


@cache
def _core():
    """One openvino.Core for the process. With one Core per model, the build crashed (segmentation fault, 4 runs of
    5, the fifth under gdb) in its deployment timing, after the verification's runtime and its Core were freed; with
    one, every build since ran."""
    import openvino

    return openvino.Core()


def available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class OpenVinoCpu(Runtime):
    """`model` on OpenVINO's CPU plugin with `threads` inference threads and the latency hint, compiled once per
    batch size it is given: static shapes measured 25% faster at batch 1 than a dynamic batch (benchmarks/
    int8_threads.py)."""

    def __init__(self, model, threads: int | None = None):
        """`model`: an ONNX file, or an openvino.Model (NNCF's, in benchmarks/int8_threads.py)."""
        if not available():
            raise DeployError("verify.runtime openvino needs OpenVINO: pip install 'edge-deploy[openvino]'")
        from .ort import default_threads

        self.threads = threads or default_threads()
        self.core = _core()
        self.model = self.core.read_model(str(model)) if isinstance(model, Path) else model
        self._requests: dict = {}
        self.precision = self._request(1).get_compiled_model().get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.name = f"{RUNTIME} ({self.precision} float layers)"

    def _request(self, batch: int):
        if batch not in self._requests:
            model = self.model.clone()
            model.reshape([batch, *list(self.model.input(0).get_partial_shape())[1:]])
            config = {"INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY"}
            self._requests[batch] = self.core.compile_model(model, "CPU", config).create_infer_request()
        return self._requests[batch]

    def infer(self, batch: np.ndarray) -> np.ndarray:
        # the result is the request's own buffer, overwritten by its next run
        return np.array(self._request(len(batch)).infer({0: batch})[0], copy=True)
