"""A built artifact ready for inference: the model on a runtime, its preprocessing and class names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..console import warn
from ..errors import DeployError
from ..runtimes.openvino import RUNTIME as OPENVINO
from .images import open_image
from .spec import load, recommended


@dataclass
class Prediction:
    index: int
    name: str
    probability: float


def pick_model(folder: Path, here: dict | None = None) -> Path:
    """An engine whose sidecar matches this TensorRT and GPU (`here`, as runtimes.tensorrt.environment() gives it;
    looked up when TensorRT can run here), else the ONNX model the build recommends (serving.json, or report.json
    in older folders: int8 unless it missed a threshold or ran slower than fp32), else the int8 ONNX, else fp32."""
    from ..console import warn
    from ..runtimes.tensorrt import environment, unavailable
    from ..runtimes.tensorrt.sidecar import compatible_engine

    engines = sorted(folder.glob("model.*.engine"))
    if engines and here is None and unavailable() is None:
        here = environment()
    if engines and here is not None:
        engine, refused = compatible_engine(engines, here)
        for why in refused:
            warn(f"not serving {why}")
        if engine is not None:
            return engine
    choice = recommended(folder)
    for name in ([choice] if choice else []) + ["model.int8.onnx", "model.fp32.onnx"]:
        if (folder / name).is_file():
            return folder / name
    raise DeployError(f"{folder} holds no model.*.onnx or model.*.engine: pass a `deploy build` output folder")


class Predictor:
    """Decode, preprocess exactly as the build evaluated (serving.json), run, and return top-k with class names.
    Needs onnxruntime, numpy and Pillow only (TensorRT for an engine)."""

    def __init__(self, artifact: Path, threads: int | None = None):
        artifact = Path(artifact)
        if not artifact.exists():
            raise DeployError(f"artifact not found: {artifact}")
        folder = artifact if artifact.is_dir() else artifact.parent
        self.spec = load(folder)
        self.pre = self.spec.preprocess
        self.classes = self.spec.classes
        self.model_file = pick_model(folder) if artifact.is_dir() else artifact
        self.runtime = _runtime(self.model_file, threads or self._measured_threads(), self._measured_runtime())

    def _measured_threads(self) -> int | None:
        """The build's fastest thread count for the model it recommends, on a machine with as many cores."""
        from ..runtimes.ort import default_threads

        same = self.model_file.name == self.spec.model and self.spec.cores == default_threads()
        return self.spec.threads if same else None

    def _measured_runtime(self) -> str | None:
        """The runtime the build measured fastest for the model it recommends (OpenVINO's, or None for ORT)."""
        return self.spec.runtime if self.model_file.name == self.spec.model else None

    def decode(self, payload: bytes, what: str = "image") -> np.ndarray:
        """Preprocessed CHW float32 from encoded image bytes; a one-line DeployError when unreadable or over the
        image limits (serving.images)."""
        img = open_image(payload, what)
        try:
            return self.pre(img)
        finally:
            img.close()  # free the decoded pixels now, not when the garbage collector gets to them

    def top_k(self, batch: np.ndarray, k: int) -> list[list[Prediction]]:
        logits = self.runtime.infer(np.ascontiguousarray(batch, dtype=np.float32))
        z = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        k = min(k, probs.shape[1])
        out = []
        for row in probs:
            idx = np.argsort(-row)[:k]
            out.append([Prediction(int(i), self.classes[i], float(row[i])) for i in idx])
        return out


def _runtime(model: Path, threads: int | None, runtime: str | None):
    if model.suffix == ".engine":
        from ..runtimes.tensorrt import TensorRTEngine

        return TensorRTEngine(model)
    if model.suffix != ".onnx":
        raise DeployError(f"{model}: expected a .onnx or .engine file")
    if runtime == OPENVINO:
        from ..runtimes.openvino import OpenVinoCpu, available

        if available():
            return OpenVinoCpu(model, threads)
        warn(f"{model.name}: the build measured it fastest on OpenVINO, which is not installed here; serving it on "
             "ONNX Runtime (pip install 'edge-deploy[openvino]')")  # fmt: skip
    from ..runtimes.ort import OrtCpu

    return OrtCpu(model, threads)
