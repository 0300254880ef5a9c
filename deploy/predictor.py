"""A built artifact ready for inference: the model on a runtime, its preprocessing and class names."""

from __future__ import annotations

import json
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np

from .errors import DeployError


@dataclass
class Prediction:
    index: int
    name: str
    probability: float


def _pick_model(folder: Path) -> Path:
    """An engine when TensorRT can run here, else the ONNX model the build recommends (report.json: int8 unless it
    missed a threshold or ran slower than fp32), else the int8 ONNX, else the fp32 one."""
    from .runtimes.tensorrt import unavailable

    engines = sorted(folder.glob("model.*.engine"))
    if engines and unavailable() is None:
        return engines[0]
    report = folder / "report.json"
    recommended = json.loads(report.read_text()).get("recommended", {}).get("model") if report.is_file() else None
    for name in ([recommended] if recommended else []) + ["model.int8.onnx", "model.fp32.onnx"]:
        if (folder / name).is_file():
            return folder / name
    raise DeployError(f"{folder} holds no model.*.onnx or model.*.engine: pass a `deploy build` output folder")


class Predictor:
    """Decode, preprocess exactly as the build evaluated, run, and return top-k with class names."""

    def __init__(self, artifact: Path, threads: int | None = None):
        from . import data
        from .recipe import validate

        artifact = Path(artifact)
        if not artifact.exists():
            raise DeployError(f"artifact not found: {artifact}")
        model = _pick_model(artifact) if artifact.is_dir() else artifact
        report = model.parent / "report.json"
        if not report.is_file():
            raise DeployError(f"{report} is missing: the artifact must be a `deploy build` output (its report "
                              "holds the preprocessing and classes)")  # fmt: skip
        self.recipe = validate(json.loads(report.read_text())["recipe"], str(report))
        self.pre = data.Preprocessor(self.recipe.preprocess)
        self.classes = data.class_names(self.recipe.model.num_classes)
        self.model_file = model
        self.runtime = _runtime(model, threads)

    def decode(self, payload: bytes, what: str = "image") -> np.ndarray:
        """Preprocessed CHW float32 from encoded image bytes; a one-line DeployError when unreadable."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(BytesIO(payload)) as img:
                img.load()
                return self.pre(img)
        except Image.DecompressionBombError:
            raise DeployError(f"{what}: image too large (decompression-bomb limit)") from None
        except UnidentifiedImageError:
            raise DeployError(f"{what}: not a readable image (unknown format)") from None
        except (OSError, ValueError, SyntaxError) as err:
            raise DeployError(f"{what}: not a readable image ({str(err).splitlines()[0][:120]})") from None

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


def _runtime(model: Path, threads: int | None):
    if model.suffix == ".engine":
        from .runtimes.tensorrt import TensorRTEngine

        return TensorRTEngine(model)
    if model.suffix != ".onnx":
        raise DeployError(f"{model}: expected a .onnx or .engine file")
    from .runtimes.ort import OrtCpu

    return OrtCpu(model, threads)
