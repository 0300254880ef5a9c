"""Recipes: typed, versioned build settings loaded from YAML and overridden by the CLI."""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import DeployError

Target = Literal["ort-cpu", "tensorrt"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """Which network to build and where its weights come from."""

    name: str
    source: Literal["torchvision", "timm"]
    arch: str | None = None  # builder name in the source library; defaults to `name`
    num_classes: int = Field(1000, gt=0)
    weights: str | None = None  # checkpoint path; None = the source's pretrained ImageNet weights

    @property
    def builder(self) -> str:
        return self.arch or self.name


class Preprocess(_Strict):
    """Evaluation preprocessing: resize the short side, center-crop, normalize."""

    resize: int = Field(256, gt=0)
    input_size: int = Field(224, gt=0)
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


class FoldBNConfig(_Strict):
    enabled: bool = True
    tolerance: float = Field(1e-4, gt=0)  # max |logit difference| / max |logit| allowed after folding


class ExportConfig(_Strict):
    opset: int = Field(17, ge=17)
    # torchscript: fast (about 1 s), emits GlobalAveragePool/HardSwish that ORT's quantizer handles;
    # dynamo: torch.export-based, about 20 s per model here.
    exporter: Literal["torchscript", "dynamo"] = "torchscript"
    simplify: bool = True
    tolerance: float = Field(1e-4, gt=0)  # max |logit difference| / max |logit| PyTorch vs ORT


class CalibrationConfig(_Strict):
    # minmax measured best on EfficientNet-Lite0 (see README): ReLU6 bounds the ranges anyway.
    method: Literal["minmax", "percentile", "entropy"] = "minmax"
    percentile: float = Field(99.999, gt=90, le=100)
    samples: int = Field(256, gt=0)
    seed: int = 0


class QuantizeConfig(_Strict):
    """Post-training int8 quantization to QDQ ONNX, made for one target runtime."""

    enabled: bool = False
    target: Target = "ort-cpu"
    per_channel: bool = True
    # 7-bit weights: avoids the int16 saturation of ORT's U8S8 kernels on x86 CPUs without VNNI,
    # at some accuracy cost. Only for ort-cpu deployments on such CPUs.
    reduce_range: bool = False
    calibration: CalibrationConfig = CalibrationConfig()
    exclude: list[str] = []  # node-name globs kept in float

    @model_validator(mode="after")
    def _reduce_range_for_cpu_only(self):
        if self.reduce_range and self.target == "tensorrt":
            raise ValueError("reduce_range is for the ort-cpu target; TensorRT computes int8 exactly")
        return self


class LatencyConfig(_Strict):
    warmup: int = Field(20, ge=0)
    runs: int = Field(200, gt=0)
    batch: int = Field(32, gt=0)  # batch size of the throughput measurement
    threads: int | None = Field(None, gt=0)  # None = all cores


class VerifyConfig(_Strict):
    max_top1_drop: float | None = 1.0  # percentage points, needs labeled --val
    min_agreement: float | None = Field(None, ge=0, le=100)  # top-1 agreement int8 vs fp32, percent
    min_sqnr_db: float | None = None  # logit SQNR int8 vs fp32
    heldout: int = Field(64, gt=0)  # images for agreement/SQNR when there is no --val
    batch: int = Field(32, gt=0)  # batch size for accuracy evaluation
    latency: LatencyConfig = LatencyConfig()


class Recipe(_Strict):
    version: Literal[1] = 1
    model: ModelSpec
    preprocess: Preprocess = Preprocess()
    fold_bn: FoldBNConfig = FoldBNConfig()
    export: ExportConfig = ExportConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    verify: VerifyConfig = VerifyConfig()


def recipe_dir() -> Path:
    return Path(str(resources.files("deploy") / "recipes"))


def available() -> list[str]:
    return sorted(p.stem for p in recipe_dir().glob("*.yaml"))


def _one_line(err: ValidationError, origin: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{origin}: unknown key '{where}'"
    return f"{origin}: {where}: {first['msg']}" + (f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else "")


def validate(data: dict[str, Any], origin: str) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise DeployError(_one_line(err, origin)) from None


def load(name_or_path: str) -> Recipe:
    """Load a built-in recipe by model name, or a recipe YAML file by path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = recipe_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            close = difflib.get_close_matches(name_or_path, available(), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `deploy list` shows the supported models"
            raise DeployError(f"unknown model '{name_or_path}'{hint}")
    elif not path.is_file():
        raise DeployError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise DeployError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise DeployError(f"{path}: a recipe must be a mapping of settings")
    return validate(data, str(path))


def override(recipe: Recipe, updates: dict[str, Any]) -> Recipe:
    """Return `recipe` with dotted-path fields replaced (`{"quantize.target": "tensorrt"}`)."""
    data = recipe.model_dump()
    for dotted, value in updates.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return validate(data, "command-line options")
