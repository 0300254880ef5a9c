"""Recipes: typed, versioned build settings loaded from YAML and overridden by the CLI."""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import DeployError

Target = Literal["ort-cpu", "tensorrt", "openvino"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """Which network to build and where its weights come from."""

    name: str = Field(description="Model name: the recipe's name and, unless `arch` is set, the builder's.")
    source: Literal["torchvision", "timm", "deploy", "onnx", "python"] = Field(
        description="Where the network comes from. deploy: our own architectures (deploy/mobilenet_v1.py, "
        "hardnet.py, shufflenet_v1.py); "
        "onnx: an fp32 ONNX file given as `weights`; python: the user's own nn.Module, made by `factory` "
        "(or passed to deploy.build)."
    )
    arch: str | None = Field(None, description="Builder name in the source library; None = `name`.")
    factory: str | None = Field(
        None,
        description='Source python: "package.module:function" returning the nn.Module, called with `kwargs`; the '
        "current folder is importable. It runs the user's code, as `python -m` would.",
    )
    kwargs: dict[str, Any] = Field({}, description="Keyword arguments for `factory` (source python).")
    num_classes: int = Field(1000, gt=0, description="Number of output classes (logits).")
    weights: str | None = Field(
        None,
        description='Checkpoint path (the ONNX file for source onnx); None = the source\'s pretrained ImageNet '
        'weights; "random" = random init (cost checks).',
    )
    width: float = Field(
        1.0, gt=0, description='Width multiplier α, for source "deploy" (MobileNetV1 α, ShuffleNet v1 s×; HarDNet has none).'
    )

    @property
    def builder(self) -> str:
        return self.arch or self.name


class Preprocess(_Strict):
    """Evaluation preprocessing: resize the short side, center-crop, normalize."""

    resize: int = Field(256, gt=0, description="Short side after resizing, in pixels.")
    input_size: int = Field(224, gt=0, description="Side of the square center crop fed to the model, in pixels.")
    interpolation: Literal["bilinear", "bicubic"] = Field("bilinear", description="Resize interpolation.")
    mean: tuple[float, float, float] = Field(
        (0.485, 0.456, 0.406), description="Per-channel (RGB) mean subtracted from pixels scaled to [0, 1]."
    )
    std: tuple[float, float, float] = Field(
        (0.229, 0.224, 0.225), description="Per-channel (RGB) standard deviation the pixels are divided by."
    )


class FoldBNConfig(_Strict):
    enabled: bool = Field(True, description="Fold BatchNorm layers into the preceding convolutions.")
    tolerance: float = Field(
        1e-4, gt=0, description="Max |logit difference| / max |logit| allowed after folding (relative)."
    )


class ExportConfig(_Strict):
    opset: int = Field(17, ge=17, description="ONNX opset version of the exported model.")
    exporter: Literal["torchscript", "dynamo"] = Field(
        "torchscript",
        description="torchscript: fast, emits GlobalAveragePool/HardSwish that ORT's quantizer handles; "
        "dynamo: torch.export-based, much slower.",
    )
    simplifier: Literal["onnxslim", "onnxsim", "none"] = Field(
        "onnxslim",
        description="Graph simplifier run on the exported model; onnxsim is an optional extra "
        "(pip install 'edge-deploy[onnxsim]'). `simplify: false` (the earlier form) means none.",
    )
    tolerance: float = Field(
        1e-4, gt=0, description="Max |logit difference| / max |logit| allowed between PyTorch and ORT (relative)."
    )

    @model_validator(mode="before")
    @classmethod
    def _simplify_bool(cls, data: Any) -> Any:
        """The earlier `simplify: bool`: true = onnxslim, false = none."""
        if isinstance(data, dict) and "simplify" in data:
            data = dict(data)
            flag = data.pop("simplify")
            if "simplifier" in data or not isinstance(flag, bool):
                raise ValueError("simplify (the earlier form of simplifier) must be true or false, without simplifier")
            data["simplifier"] = "onnxslim" if flag else "none"
        return data


class CalibrationConfig(_Strict):
    method: Literal["minmax", "percentile", "entropy", "mse"] = Field(
        "percentile",
        description="How activation ranges are chosen. percentile measured best on EfficientNet-Lite0 over both "
        "targets (top-1 agreement with fp32, logit SQNR; see the README's calibration table); mse: per tensor, "
        "the range minimizing the int8 error over its histogram (deploy/stages/int8/calibration.py).",
    )
    percentile: float = Field(
        99.999, gt=90, le=100, description="Method percentile: the percentile of each activation histogram kept."
    )
    samples: int = Field(256, gt=0, description="Calibration images.")
    seed: int = Field(0, description="Random seed for drawing the calibration images.")


class QATConfig(_Strict):
    """Quantization-aware training (deploy/stages/int8/qat.py): fine-tuning with fake quantization for the target and
    the distillation loss toward the fp32 model; the int8 model is then quantized from the fine-tuned weights."""

    mode: Literal["auto", "on", "off"] = Field(
        "auto",
        description="auto: only when post-training quantization misses a verify threshold and --train images are "
        "given; on: always; off: never.",
    )
    epochs: int = Field(
        1,
        gt=0,
        description="Fine-tuning epochs over `images`; the defaults were measured with 1 (see lr). The CIFAR-10 "
        "EfficientNet-B0 recipe needs 2.",
    )
    lr: float | None = Field(
        None,
        gt=0,
        description="Learning rate at the start of a cosine schedule; the optimizer and augmentation are train's. "
        "None = train.lr / 10: with an SGD recipe it and the default temperature measured better than a lower lr "
        "and no softening; an AdamW recipe's lower peak scales it down (an SGD-sized lr made an AdamW model diverge).",
    )
    batch_size: int = Field(64, gt=0, description="Training batch size.")
    images: int | None = Field(
        10000, gt=0, description="Training images drawn per run (with train.seed); None = all."
    )
    alpha: float = Field(
        1.0, ge=0, le=1, description="KD weight, as distill.alpha: 1 = match the fp32 model only."
    )
    temperature: float = Field(4.0, gt=0, description="Distillation temperature T (softens both models' logits).")


class MixedPrecisionConfig(_Strict):
    """Keep the layers int8 hurts most in float until the verify thresholds are met (deploy/mixed_precision.py):
    layers ranked by the logit SQNR each gains kept alone in float, then added one at a time."""

    enabled: bool = Field(
        False, description="Try float layers when the (possibly QAT) int8 model still misses a verify threshold."
    )
    max_float_layers: int = Field(
        10, gt=0, description="Give up (fail the build) when this many layers in float still miss the thresholds."
    )
    images: int = Field(
        64, gt=0, description="Evaluation images for the ranking: one quantize and one pass per layer."
    )


class EqualizeConfig(_Strict):
    """Cross-layer equalization of the fp32 graph before calibration (deploy/stages/int8/equalize.py)."""

    enabled: bool = Field(False, description="Run cross-layer equalization.")
    pairs: Literal["depthwise", "all"] = Field(
        "depthwise", description="depthwise: depthwise -> pointwise pairs (Nagel et al.); all: every conv pair."
    )
    relu6: Literal["skip", "exact"] = Field(
        "skip",
        description="Pairs joined by a ReLU6. skip: left alone; exact: ReLU6 becomes Relu + a per-channel Min "
        "(kept in float).",
    )


class AdaRoundConfig(_Strict):
    """Learned weight rounding after calibration (deploy/stages/int8/adaround.py; Nagel et al. 2020)."""

    enabled: bool = Field(
        False,
        description="Run it. Measured on EfficientNet-Lite0 (docs/int8.md): tensorrt logit SQNR +2 to +3 dB and KL "
        "to fp32 a third, but top-1 drop no better on images it was not tuned on; ~2.5 min on 2 cores.",
    )
    iterations: int = Field(1000, gt=0, description="Optimizer steps per layer.")
    images: int = Field(
        256, gt=1, description="Calibration images used; both models' activations on them are held in memory "
        "(EfficientNet-Lite0, 224 px, 200 images: 5.7 GB peak RSS for the build).",
    )
    regularization: float = Field(0.01, gt=0, description="Weight of the rounding regularizer (AIMET's default).")


class QuantizeConfig(_Strict):
    """Post-training int8 quantization to QDQ ONNX, made for one target runtime."""

    enabled: bool = Field(False, description="Quantize to int8 (else the build stays fp32).")
    target: Target = Field(
        "ort-cpu", description="Runtime the QDQ model is made for: ONNX Runtime's CPU kernels, TensorRT, or "
        "OpenVINO's CPU plugin (edge-deploy[openvino]; the build verifies it there, verify.runtime openvino)."
    )
    per_channel: bool = Field(True, description="Per-output-channel weight scales (else one per tensor).")
    reduce_range: bool = Field(
        False,
        description="7-bit weights: avoids the int16 saturation of ORT's U8S8 kernels on x86 CPUs without VNNI, "
        "at some accuracy cost. Only for ort-cpu deployments on such CPUs.",
    )
    calibration: CalibrationConfig = Field(CalibrationConfig(), description="Activation range calibration.")
    exclude: list[str] = Field([], description="Node-name globs kept in float.")
    int8_hard_activations: bool = Field(
        True,
        description="Q/DQ placement (deploy/stages/int8/qdq_placement.py), ort-cpu: h-swish and the squeeze-excite "
        "h-sigmoid run on ORT's int8 kernels instead of as float islands between DQ and Q, which measured faster "
        "(benchmarks/int8_speed_mobilenet_v3.py).",
    )
    float_stem: bool | None = Field(
        None,
        description="ort-cpu: the nodes before the first pointwise conv (stem, first depthwise block) stay in float; "
        "None = where that measured faster, when they leave through one tensor.",
    )
    pad_depthwise: bool = Field(
        True,
        description="ort-cpu: zero-pad depthwise convs to a multiple of 16 channels (stages/int8/pad_channels.py), where "
        "ORT's int8 depthwise kernel is fast; the model computes the same.",
    )
    conv_inputs_only: bool = Field(
        True,
        description="tensorrt and openvino: Q/DQ only on the inputs of Conv, Gemm and Add, none between a Conv and "
        "its activation (both runtimes fuse them); False = onnxruntime's default, a Q/DQ pair on every tensor.",
    )
    center_activations: bool = Field(
        True,
        description="tensorrt: each ReLU/ReLU6 output that only unpadded convs and Gemms read is computed shifted by "
        "half its calibrated range, so that its symmetric int8 range is centred: twice the resolution, the same "
        "function (stages/int8/center.py).",
    )
    equalize: EqualizeConfig = Field(EqualizeConfig(), description="Cross-layer equalization before calibration.")
    adaround: AdaRoundConfig = Field(AdaRoundConfig(), description="AdaRound: learned rounding of the int8 weights.")
    bias_correction: bool = Field(
        True,
        description="Correct each quantized Conv/Gemm's output mean shift, measured on calibration images "
        "(stages/int8/bias_correction.py); raises top-1 agreement with fp32 and SQNR for seconds of build time "
        "(see the README).",
    )
    sensitivity_images: int = Field(
        16, ge=0, description="Per-layer SQNR section of the report on this many images; 0 = off."
    )
    qat: QATConfig = Field(
        QATConfig(), description="The fallback when post-training quantization misses the thresholds."
    )
    mixed_precision: MixedPrecisionConfig = Field(
        MixedPrecisionConfig(), description="The other fallback: float layers, no training."
    )

    @model_validator(mode="after")
    def _reduce_range_for_cpu_only(self):
        if self.reduce_range and self.target != "ort-cpu":
            raise ValueError(f"reduce_range is for the ort-cpu target (ORT's kernels on CPUs without VNNI), "
                             f"not {self.target}")
        return self


class LatencyConfig(_Strict):
    warmup: int = Field(20, ge=0, description="Untimed runs before measuring.")
    runs: int = Field(200, gt=0, description="Timed runs.")
    batch: int = Field(32, gt=0, description="Batch size of the throughput measurement.")
    threads: int | None = Field(None, gt=0, description="CPU threads; None = all cores.")


class DeviceConfig(_Strict):
    """A device reached over SSH with the system's ssh (deploy verify; prune.latency_on)."""

    url: str = Field(description="ssh://[user@]host[:port]; host may be a ~/.ssh/config alias.")
    python: str = Field("python3", description="Python on the device, with numpy and onnxruntime.")
    ssh_config: str | None = Field(None, description="ssh_config file used instead of ~/.ssh/config (ssh -F).")
    accept_new_host_key: bool = Field(
        False, description="Store the key of a device seen the first time (a changed key is always refused)."
    )
    timeout: float = Field(600, gt=0, description="Seconds for each remote run.")

    @model_validator(mode="after")
    def _url(self):
        from .remote.ssh import parse

        try:
            parse(self.url)
        except DeployError as err:
            raise ValueError(str(err)) from None
        return self


class MetricGate(_Strict):
    """Thresholds on a metric that the build's `evaluate` function returns (Python API), for a higher-is-better
    metric unless `max` is used: the int8 model's value (fp32's without int8) must stay within them."""

    min: float | None = Field(None, description="Lowest allowed value; None = no lower bound.")
    max: float | None = Field(None, description="Highest allowed value; None = no upper bound.")
    max_drop: float | None = Field(None, description="Largest allowed fp32 value - int8 value; None = no limit.")


class VerifyConfig(_Strict):
    max_top1_drop: float | None = Field(
        1.0, description="Largest allowed top-1 drop int8 vs fp32, percentage points (needs labeled --val); "
        "None = not checked."
    )
    min_agreement: float | None = Field(
        None, ge=0, le=100, description="Least top-1 agreement int8 vs fp32, percent; None = not checked."
    )
    min_sqnr_db: float | None = Field(None, description="Least logit SQNR int8 vs fp32, dB; None = not checked.")
    heldout: int = Field(64, gt=0, description="Images for agreement/SQNR when there is no --val.")
    batch: int = Field(32, gt=0, description="Batch size for accuracy evaluation.")
    workers: int | None = Field(
        None, ge=0, description="Processes decoding the evaluation images (results do not depend on it); "
        "None = the cores, 0 = decode in the build's process."
    )
    val_limit: int | None = Field(
        None, gt=0, description="Evaluate on this many validation images drawn with val_seed (quick checks); "
        "None = all."
    )
    val_seed: int = Field(0, description="Random seed of the val_limit draw.")
    latency: LatencyConfig = Field(LatencyConfig(), description="Latency and throughput measurement.")
    runtime: Literal["ort", "tensorrt", "ort-trt", "openvino"] = Field(
        "ort", description="Where the int8 (or engine) model is also verified. openvino (edge-deploy[openvino]): "
        "when it passes there, the deployment recommendation times it on OpenVINO too and may pick it."
    )
    metrics: dict[str, MetricGate] = Field(
        {}, description="Gates on the metrics of deploy.build(..., evaluate=fn), by name."
    )
    devices: list[DeviceConfig] = Field(
        [], description="Devices `deploy verify BUILD` measures on when no --on is given."
    )


class BatchProfile(_Strict):
    """TensorRT optimization profile for the batch dimension: the engine accepts min..max, tuned for opt."""

    min: int = Field(1, gt=0, description="Smallest batch size the engine accepts.")
    opt: int = Field(1, gt=0, description="Batch size the engine is tuned for.")
    max: int = Field(32, gt=0, description="Largest batch size the engine accepts.")

    @model_validator(mode="after")
    def _ordered(self):
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"need min <= opt <= max, got {self.min}, {self.opt}, {self.max}")
        return self


class TensorRTConfig(_Strict):
    """TensorRT engine build settings (quantize.target tensorrt, `deploy engine`)."""

    precision: Literal["int8", "fp16", "fp32"] = Field(
        "int8", description="Engine precision: int8 needs the QDQ ONNX; fp16/fp32 the fp32 one."
    )
    workspace_mib: int = Field(1024, gt=0, description="Builder workspace memory limit, MiB.")
    batch: BatchProfile = Field(BatchProfile(), description="Optimization profile for the batch dimension.")
    timing_cache: str | None = Field(
        "~/.cache/edge-deploy/tensorrt.timing-cache",
        description="Timing cache file, shared across builds; None = off.",
    )
    dla_core: int | None = Field(None, ge=0, description="Jetson Orin DLA core to run on; None = GPU only.")
    gpu_fallback: bool = Field(True, description="Layers DLA cannot run go to the GPU.")


Augment = Literal["none", "flip", "crop_flip", "random_resized_crop"]


class TrainConfig(_Strict):
    """The training loop of `deploy train`, also used (with distill's overrides) by the distill stage."""

    epochs: int = Field(15, gt=0, description="Training epochs.")
    batch_size: int = Field(128, gt=0, description="Training batch size.")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="Optimizer.")
    lr: float = Field(0.1, gt=0, description="Peak learning rate of the schedule.")
    weight_decay: float = Field(5e-4, ge=0, description="Weight decay (L2 penalty).")
    schedule: Literal["cosine", "onecycle"] = Field("onecycle", description="Learning-rate schedule.")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Label smoothing of the cross-entropy loss.")
    augment: Augment = Field(
        "crop_flip",
        description="Training augmentation. crop_flip: resize to input_size, random crop with input_size/8 "
        "padding, flip (small images, CIFAR); random_resized_crop: ImageNet-style scale (0.25, 1) crops and flip.",
    )
    subset: int | None = Field(
        None, gt=0, description="Train on this many images drawn with `seed` (CI, quick checks); None = all."
    )
    seed: int = Field(0, description="Random seed: the `subset` draw, initial weights and shuffling.")
    workers: int = Field(1, ge=0, description="DataLoader worker processes; 0 = load in the main process.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Training device; auto = cuda if available.")


class PruneConfig(_Strict):
    """Structured channel pruning with Torch-Pruning's dependency graph."""

    enabled: bool = Field(False, description="Prune the PyTorch model (before BN folding and export).")
    ratio: float = Field(
        0.3, ge=0, lt=1, description='Fraction of channels removed, or of MACs when by == "macs" (mode ratio).'
    )
    by: Literal["channels", "macs"] = Field("macs", description="What `ratio` is a fraction of.")
    scope: Literal["kl", "uniform", "global"] = Field(
        "kl", description="kl (by macs; by channels defaults to uniform): step by step, the group whose pruning costs "
        "least KL to the unpruned model "
        "per MAC saved, across groups, with BatchNorm re-estimated (the latency mode's proxy, MACs as the cost); "
        "uniform: the same ratio in every layer; global: channels ranked across layers by importance."
    )
    importance: Literal["l1", "l2", "bn_scale", "taylor"] = Field(
        "l2", description="Channel importance criterion; taylor uses the calibration images."
    )
    round_to: int = Field(
        8, gt=0, description="Kept channel counts are multiples of this (SIMD / tensor cores)."
    )
    protect_stem: bool = Field(True, description="Never prune the first conv; the classifier head is always protected.")
    protect: list[str] = Field([], description="Module-name globs never pruned.")
    mode: Literal["ratio", "latency"] = Field(
        "ratio",
        description="ratio: ratio/by/scope above. latency: NetAdapt-style steps on Torch-Pruning's groups, each the "
        "one that costs least accuracy (KL to the unpruned model) per ms saved on ORT CPU "
        "(deploy/stages/prune/latency.py).",
    )
    latency_budget: float = Field(
        0.7,
        gt=0,
        lt=1,
        description="Mode latency: target batch-1 latency (ORT CPU, 1 thread) as a fraction of the unpruned "
        "model's, measured.",
    )
    latency_step: float = Field(
        0.25, gt=0, lt=1, description="Mode latency: fraction of a group's channels one step removes."
    )
    latency_table: str | None = Field(
        "~/.cache/edge-deploy/latency-table.json",
        description="Mode latency, timed here: NetAdapt's per-layer latency look-up table, shared across runs (keyed "
        "by runtime and CPU); candidates are predicted from it and each step confirmed by timing the model whole. "
        "None = time every candidate whole.",
    )
    latency_on: DeviceConfig | None = Field(
        None, description="Mode latency: time the candidates on this device over SSH (each step's in one round "
        "trip); None = on this machine."
    )

    @model_validator(mode="before")
    @classmethod
    def _scope_default(cls, data):
        if isinstance(data, dict) and data.get("by") == "channels" and "scope" not in data:
            return {**data, "scope": "uniform"}  # kl removes a fraction of the MACs
        return data

    @model_validator(mode="after")
    def _kl_by_macs(self):
        if self.scope == "kl" and self.by != "macs":
            raise ValueError("scope kl removes a fraction of the MACs: set by: macs, or scope uniform or global")
        return self


class DistillConfig(_Strict):
    """Knowledge-distillation fine-tuning: alpha*T^2*KL(teacher/T || student/T) + (1-alpha)*CE."""

    enabled: bool = Field(False, description="Fine-tune with knowledge distillation from `teacher`.")
    teacher: str | None = Field(
        None, description="Teacher: a recipe name or YAML; None = the model before pruning."
    )
    teacher_weights: str | None = Field(
        None,
        description="Checkpoint for `teacher` (needed when its class count differs); None = the teacher recipe's "
        "weights.",
    )
    alpha: float = Field(0.9, ge=0, le=1, description="KD weight; 1 = pure KD (forced on unlabeled images).")
    temperature: float = Field(4.0, gt=0, description="Distillation temperature T.")
    epochs: int = Field(3, gt=0, description="Fine-tuning epochs.")
    lr: float = Field(0.01, gt=0, description="Peak learning rate (replaces train.lr).")
    batch_size: int = Field(128, gt=0, description="Training batch size (replaces train.batch_size).")
    augment: Augment = Field("crop_flip", description="Training augmentation (replaces train.augment).")


class Recipe(_Strict):
    version: Literal[1] = Field(1, description="Recipe format version.")
    model: ModelSpec = Field(description="The network and its weights.")
    preprocess: Preprocess = Field(Preprocess(), description="Evaluation preprocessing.")
    fold_bn: FoldBNConfig = Field(FoldBNConfig(), description="BatchNorm folding.")
    export: ExportConfig = Field(ExportConfig(), description="ONNX export.")
    quantize: QuantizeConfig = Field(QuantizeConfig(), description="int8 quantization.")
    verify: VerifyConfig = Field(VerifyConfig(), description="Accuracy and latency checks of the built model.")
    train: TrainConfig = Field(TrainConfig(), description="Training loop (`deploy train`, distill).")
    prune: PruneConfig = Field(PruneConfig(), description="Structured channel pruning.")
    distill: DistillConfig = Field(DistillConfig(), description="Knowledge-distillation fine-tuning.")
    tensorrt: TensorRTConfig = Field(TensorRTConfig(), description="TensorRT engine build.")

    @model_validator(mode="before")
    @classmethod
    def _openvino_target_verified_there(cls, data: Any) -> Any:
        """A model made for OpenVINO is verified on it: verify.runtime ort (the default) becomes openvino."""
        if not isinstance(data, dict) or not isinstance(data.get("quantize"), dict):
            return data
        verify = data.get("verify") or {}
        if data["quantize"].get("target") == "openvino" and isinstance(verify, dict) and \
                verify.get("runtime", "ort") == "ort":  # fmt: skip
            data = {**data, "verify": {**verify, "runtime": "openvino"}}
        return data

    @model_validator(mode="after")
    def _openvino_target_runtime(self):
        if self.quantize.target == "openvino" and self.verify.runtime != "openvino":
            raise ValueError(f"quantize.target openvino is verified on OpenVINO, not verify.runtime "
                             f"{self.verify.runtime}")
        return self

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
    """Load a built-in recipe by model name, a recipe YAML file by path, `timm:<name>` or `torchvision:<builder>`."""
    if name_or_path.startswith("timm:"):
        return timm_recipe(name_or_path.removeprefix("timm:"))
    if name_or_path.startswith("torchvision:"):
        return torchvision_recipe(name_or_path.removeprefix("torchvision:"))
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


def torchvision_recipe(name: str) -> Recipe:
    """A default recipe for any torchvision classifier, preprocessing taken from its DEFAULT weights' transforms."""
    import torchvision

    builders = torchvision.models.list_models(module=torchvision.models)
    if name not in builders:
        close = difflib.get_close_matches(name, builders, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else " (classification models only)"
        raise DeployError(f"unknown torchvision classifier '{name}'{hint}")
    t = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    if t.interpolation.value not in ("bilinear", "bicubic"):
        raise DeployError(f"torchvision {name} uses {t.interpolation.value} interpolation; only bilinear and bicubic work")
    preprocess = {"input_size": t.crop_size[0], "resize": t.resize_size[0], "interpolation": t.interpolation.value,
                  "mean": list(t.mean), "std": list(t.std)}  # fmt: skip
    return validate({"model": {"name": name, "source": "torchvision"}, "preprocess": preprocess}, f"torchvision:{name}")


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
