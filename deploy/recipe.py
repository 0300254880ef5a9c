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
    # deploy: our own architectures (deploy/mobilenet_v1.py); onnx: an fp32 ONNX file given as `weights`
    source: Literal["torchvision", "timm", "deploy", "onnx"]
    arch: str | None = None  # builder name in the source library; defaults to `name`
    num_classes: int = Field(1000, gt=0)
    # checkpoint path; None = the source's pretrained ImageNet weights; "random" = random init (cost checks)
    weights: str | None = None
    width: float = Field(1.0, gt=0)  # width multiplier α, for source "deploy"

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
    # percentile measured best on EfficientNet-Lite0 over both targets (mean top-1 agreement with fp32
    # 96.2% vs 95.8% for minmax, highest logit SQNR); see the README's calibration table.
    # mse: per tensor, the range minimizing the int8 error over its histogram (deploy/stages/mse_calibration.py)
    method: Literal["minmax", "percentile", "entropy", "mse"] = "percentile"
    percentile: float = Field(99.999, gt=90, le=100)
    samples: int = Field(256, gt=0)
    seed: int = 0


class QATConfig(_Strict):
    """Quantization-aware training (deploy/stages/qat.py): fine-tuning with fake quantization for the target and
    the distillation loss toward the fp32 model; the int8 model is then quantized from the fine-tuned weights."""

    # auto: only when post-training quantization misses a verify threshold and --train images are given
    mode: Literal["auto", "on", "off"] = "auto"
    epochs: int = Field(1, gt=0)  # measured with 1 epoch of 10,000 images (see lr); the CIFAR-10 B0 recipe needs 2
    # start of a cosine schedule; the optimizer and augmentation are train's. None = train.lr / 10: 0.02 for the
    # SGD peak 0.2 of mobilenet_v3_small, where it and temperature 4 measured better than 0.001 and 1 (CIFAR-10,
    # tensorrt, 1 epoch: top-1 drop 0.80 -> -0.15 vs 0.20); an AdamW recipe's lower peak scales it down (0.02
    # with AdamW made the CIFAR-10 EfficientNet-B0 diverge)
    lr: float | None = Field(None, gt=0)
    batch_size: int = Field(64, gt=0)
    images: int | None = Field(10000, gt=0)  # training images drawn per run (with train.seed); None = all
    alpha: float = Field(1.0, ge=0, le=1)  # KD weight, as distill.alpha: 1 = match the fp32 model only
    temperature: float = Field(4.0, gt=0)


class MixedPrecisionConfig(_Strict):
    """Keep the layers int8 hurts most in float until the verify thresholds are met (deploy/mixed_precision.py):
    layers ranked by the logit SQNR each gains kept alone in float, then added one at a time."""

    enabled: bool = False
    max_float_layers: int = Field(10, gt=0)  # give up (fail the build) when this many in float still miss
    images: int = Field(64, gt=0)  # evaluation images for the ranking: one quantize and one pass per layer


class EqualizeConfig(_Strict):
    """Cross-layer equalization of the fp32 graph before calibration (deploy/stages/equalize.py)."""

    enabled: bool = False
    pairs: Literal["depthwise", "all"] = "depthwise"  # depthwise -> pointwise (Nagel et al.), or every conv pair
    relu6: Literal["skip", "exact"] = "skip"  # exact: ReLU6 becomes Relu + a per-channel Min (kept in float)


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
    # Q/DQ placement (deploy/stages/qdq_placement.py; figures: benchmarks/int8_speed_mobilenet_v3.py).
    # ort-cpu: h-swish and the squeeze-excite h-sigmoid run on ORT's int8 kernels instead of as float
    # islands between DQ and Q (mobilenet_v3_small 224px batch 1, 1 thread: 0.75x -> 0.89x of fp32)
    int8_hard_activations: bool = True
    # ort-cpu: the nodes before the first pointwise conv (stem, first depthwise block) stay in float;
    # None = where that measured faster, when they leave through one tensor (mobilenet_v3_small 0.89x ->
    # 1.14x; also v2, Lite0, MNASNet; not v3_large's or ShuffleNetV2's stems)
    float_stem: bool | None = None
    # ort-cpu: zero-pad depthwise convs to a multiple of 16 channels (stages/pad_channels.py), where ORT's int8
    # depthwise kernel is fast; the model computes the same (mobilenet_v3_small 224px batch 1: 1.14x -> 1.22x of fp32)
    pad_depthwise: bool = True
    # tensorrt: Q/DQ only on the inputs of Conv, Gemm and Add, none between a Conv and its activation
    # (TensorRT fuses them); False = onnxruntime's default, a Q/DQ pair on every tensor
    conv_inputs_only: bool = True
    equalize: EqualizeConfig = EqualizeConfig()
    # correct each quantized Conv/Gemm's output mean shift, measured on calibration images (stages/bias_correction.py).
    # On: top-1 agreement with fp32 96.4 -> 98.5% (ort-cpu) and 96.3 -> 97.6% (tensorrt) on EfficientNet-Lite0,
    # +0.1 / +0.2 points and +0.5 dB on CIFAR-10 mobilenet_v3_small; 1-15 s (see the README)
    bias_correction: bool = True
    sensitivity_images: int = Field(16, ge=0)  # per-layer SQNR section of the report on this many images; 0 = off
    qat: QATConfig = QATConfig()  # the fallback when post-training quantization misses the thresholds
    mixed_precision: MixedPrecisionConfig = MixedPrecisionConfig()  # the other fallback: float layers, no training

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
    runtime: Literal["ort", "tensorrt", "ort-trt"] = "ort"  # where the int8 (or engine) model is verified


class BatchProfile(_Strict):
    """TensorRT optimization profile for the batch dimension: the engine accepts min..max, tuned for opt."""

    min: int = Field(1, gt=0)
    opt: int = Field(1, gt=0)
    max: int = Field(32, gt=0)

    @model_validator(mode="after")
    def _ordered(self):
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"need min <= opt <= max, got {self.min}, {self.opt}, {self.max}")
        return self


class TensorRTConfig(_Strict):
    """TensorRT engine build settings (quantize.target tensorrt, `deploy engine`)."""

    precision: Literal["int8", "fp16", "fp32"] = "int8"  # int8 needs the QDQ ONNX; fp16/fp32 the fp32 one
    workspace_mib: int = Field(1024, gt=0)
    batch: BatchProfile = BatchProfile()
    timing_cache: str | None = "~/.cache/edge-deploy/tensorrt.timing-cache"  # shared across builds; None = off
    dla_core: int | None = Field(None, ge=0)  # Jetson Orin DLA core; None = GPU only
    gpu_fallback: bool = True  # layers DLA cannot run go to the GPU


Augment = Literal["none", "flip", "crop_flip", "random_resized_crop"]


class TrainConfig(_Strict):
    """The training loop of `deploy train`, also used (with distill's overrides) by the distill stage."""

    epochs: int = Field(15, gt=0)
    batch_size: int = Field(128, gt=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)  # peak learning rate of the schedule
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "onecycle"] = "onecycle"
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    # crop_flip: resize to input_size, random crop with input_size/8 padding, flip (small images, CIFAR);
    # random_resized_crop: ImageNet-style scale (0.25, 1) crops and flip.
    augment: Augment = "crop_flip"
    subset: int | None = Field(None, gt=0)  # train on this many images drawn with `seed` (CI, quick checks)
    seed: int = 0
    workers: int = Field(1, ge=0)  # DataLoader worker processes
    device: Literal["auto", "cpu", "cuda"] = "auto"


class PruneConfig(_Strict):
    """Structured channel pruning with Torch-Pruning's dependency graph."""

    enabled: bool = False
    ratio: float = Field(0.3, ge=0, lt=1)  # fraction of channels, or of MACs when by == "macs"
    by: Literal["channels", "macs"] = "macs"
    scope: Literal["uniform", "global"] = "uniform"  # same ratio in every layer, or ranked across layers
    importance: Literal["l1", "l2", "bn_scale", "taylor"] = "l2"  # taylor uses the calibration images
    round_to: int = Field(8, gt=0)  # kept channel counts are multiples of this (SIMD / tensor cores)
    protect_stem: bool = True  # the first conv; the classifier head is always protected
    protect: list[str] = []  # module-name globs never pruned
    # ratio: ratio/by/scope above. latency: NetAdapt-style steps on Torch-Pruning's groups, each the one that
    # costs least accuracy (KL to the unpruned model) per ms saved on ORT CPU (deploy/stages/prune_latency.py)
    mode: Literal["ratio", "latency"] = "ratio"
    # mode latency: target batch-1 latency (ORT CPU, 1 thread) as a fraction of the unpruned model's, measured
    latency_budget: float = Field(0.7, gt=0, lt=1)
    latency_step: float = Field(0.25, gt=0, lt=1)  # mode latency: fraction of a group's channels one step removes


class DistillConfig(_Strict):
    """Knowledge-distillation fine-tuning: alpha*T^2*KL(teacher/T || student/T) + (1-alpha)*CE."""

    enabled: bool = False
    teacher: str | None = None  # a recipe name or YAML; None = the model before pruning
    teacher_weights: str | None = None
    alpha: float = Field(0.9, ge=0, le=1)  # 1 = pure KD (forced on unlabeled images)
    temperature: float = Field(4.0, gt=0)
    epochs: int = Field(3, gt=0)
    lr: float = Field(0.01, gt=0)
    batch_size: int = Field(128, gt=0)
    augment: Augment = "crop_flip"


class Recipe(_Strict):
    version: Literal[1] = 1
    model: ModelSpec
    preprocess: Preprocess = Preprocess()
    fold_bn: FoldBNConfig = FoldBNConfig()
    export: ExportConfig = ExportConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    verify: VerifyConfig = VerifyConfig()
    train: TrainConfig = TrainConfig()
    prune: PruneConfig = PruneConfig()
    distill: DistillConfig = DistillConfig()
    tensorrt: TensorRTConfig = TensorRTConfig()

    @model_validator(mode="after")
    def _onnx_input_has_no_pytorch_stages(self):
        if self.model.source == "onnx" and (self.prune.enabled or self.distill.enabled or self.quantize.qat.mode == "on"):
            raise ValueError("prune, distill and qat need a PyTorch model, not an ONNX file")
        return self


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
    """Load a built-in recipe by model name, a recipe YAML file by path, or `timm:<name>`."""
    if name_or_path.startswith("timm:"):
        return timm_recipe(name_or_path.removeprefix("timm:"))
    path = Path(name_or_path)
    if path.suffix == ".onnx":
        return onnx_recipe(path)
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


def timm_recipe(name: str) -> Recipe:
    """A default recipe for any timm model, preprocessing taken from its pretrained_cfg."""
    import math

    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        raise DeployError(f"unknown timm model '{name}'" + (f"; did you mean {', '.join(close)}?" if close else ""))
    cfg = timm.models.get_pretrained_cfg(name)
    size = cfg.input_size[-1]
    if cfg.interpolation not in ("bilinear", "bicubic"):
        raise DeployError(f"timm model {name} uses {cfg.interpolation} interpolation; only bilinear and bicubic work")
    preprocess = {"input_size": size, "resize": math.floor(size / cfg.crop_pct), "interpolation": cfg.interpolation,
                  "mean": list(cfg.mean), "std": list(cfg.std)}  # fmt: skip
    return validate({"model": {"name": name, "source": "timm"}, "preprocess": preprocess}, f"timm:{name}")


def onnx_recipe(path: Path) -> Recipe:
    """A recipe for an fp32 ONNX file: ImageNet mean/std, resize = input size / 0.875; the input size and
    the class count are read from the file when it fixes them (else 224 and 1000)."""
    import onnx

    if not path.is_file():
        raise DeployError(f"ONNX file not found: {path}")
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as err:  # noqa: BLE001 - protobuf decode errors
        raise DeployError(f"{path} is not an ONNX model: {str(err).splitlines()[0][:200]}") from None
    dims = [d.dim_value or None for d in graph.input[0].type.tensor_type.shape.dim] if graph.input else []
    outs = [d.dim_value or None for d in graph.output[0].type.tensor_type.shape.dim] if graph.output else []
    size = dims[-1] if len(dims) == 4 and dims[-1] else 224
    model = {"name": path.stem, "source": "onnx", "weights": str(path.resolve()), "num_classes": (outs[-1] if outs else None) or 1000}
    return validate({"model": model, "preprocess": {"input_size": size, "resize": round(size / 0.875)}}, str(path))


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
