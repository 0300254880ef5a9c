"""The Python API: `deploy.build(model, calib=..., val=...)`, the same run as `deploy build`.

    import deploy
    result = deploy.build(net, calib=calib_loader, val=val_loader, int8=True, input_size=64)
    result.passed, result.accuracy["top1_drop"], result.recommended
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DeployError
from .recipe import Recipe

# keyword shortcuts of build(): recipe fields they set (any dotted path, e.g. "quantize.calibration.method", works too)
SHORTCUTS = {
    "int8": "quantize.enabled",
    "target": "quantize.target",
    "calibration": "quantize.calibration.method",
    "samples": "quantize.calibration.samples",
    "qat": "quantize.qat.mode",
    "mixed_precision": "quantize.mixed_precision.enabled",
    "distill": "distill.enabled",
    "input_size": "preprocess.input_size",
    "resize": "preprocess.resize",
    "mean": "preprocess.mean",
    "std": "preprocess.std",
    "num_classes": "model.num_classes",
    "weights": "model.weights",
    "max_top1_drop": "verify.max_top1_drop",
    "threads": "verify.latency.threads",
    "runtime": "verify.runtime",
    "workers": "verify.workers",
    "val_limit": "verify.val_limit",
}


@dataclass(frozen=True)
class BuildResult:
    """What a build wrote and measured; `report` is report.json's content."""

    out: Path
    passed: bool
    failures: list[str]
    recommended: Path  # the model to deploy (what `deploy run` / `deploy serve` load)
    fp32_onnx: Path
    int8_onnx: Path | None
    engine: Path | None
    accuracy: dict
    latency: dict
    report: dict

    def predictor(self, threads: int | None = None):
        """The recommended model, ready for inference with the build's preprocessing and class names."""
        from .serving.predictor import Predictor

        return Predictor(self.out, threads)


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A registered model's recipe, a recipe YAML file, `timm:<name>`, or a recipe for an fp32 ONNX file."""
    from . import recipe as recipes

    return recipes.load(str(name_or_path))


def build(model, *, recipe: Recipe | str | Path | None = None, calib=None, val=None, train=None,
          evaluate: Callable[[Callable], Mapping[str, float]] | None = None, out: str | Path | None = None,
          force: bool = False, **overrides: Any) -> BuildResult:  # fmt: skip
    """Build `model` (a registered name, a recipe path or Recipe, an fp32 ONNX path, or an nn.Module of your own).

    calib / val / train: a folder, or a torch Dataset / DataLoader / iterable of preprocessed image tensors
    (val and train: (image, label) pairs); see deploy.sources and deploy.Dataset. evaluate(predict) -> {name:
    value} is called for the fp32 and the int8 model with predict(batch) -> logits; `verify.metrics` in the
    recipe gates its values. `overrides`: keyword shortcuts (SHORTCUTS, `prune=0.3`) or dotted recipe paths.
    A missed threshold does not raise: the result says `passed=False` and why."""
    from torch import nn

    from .core.context import BuildOptions
    from .core.runner import build as run

    module = model if isinstance(model, nn.Module) else None
    r = _recipe(model, recipe, module, overrides)
    opts = BuildOptions(calib=_path_or_data(calib), val=_path_or_data(val), train=_path_or_data(train),
                                 out=Path(out) if out is not None else None, force=force, module=module,
                                 evaluate=evaluate)  # fmt: skip
    report, folder = run(r, opts)
    files = {name: folder / name for name in report["files"]}
    recommended = report.get("recommended", {}).get("model", "model.fp32.onnx")
    return BuildResult(
        out=folder, passed=report["passed"], failures=list(report["failures"]), recommended=folder / recommended,
        fp32_onnx=folder / "model.fp32.onnx", int8_onnx=files.get("model.int8.onnx"),
        engine=next((p for n, p in files.items() if n.endswith(".engine")), None),
        accuracy=report.get("accuracy", {}), latency=report.get("latency", {}), report=report,
    )  # fmt: skip


def _path_or_data(source):
    from os import PathLike

    return Path(source) if isinstance(source, (str, PathLike)) else source


def _recipe(model, recipe, module, overrides: dict[str, Any]) -> Recipe:
    from . import recipe as recipes

    if module is None and recipe is not None:
        raise DeployError("recipe= goes with an nn.Module; for a registered name or file, pass the recipe as model")
    if module is None:
        base = model if isinstance(model, Recipe) else load_recipe(model)
    elif recipe is None:
        base = recipes.validate({"model": {"name": type(module).__name__, "source": "python"}}, "deploy.build")
    else:
        base = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    updates = _updates(overrides)
    if module is not None:
        size = updates.get("preprocess.input_size", base.preprocess.input_size)
        updates = {"model.source": "python", "model.name": base.model.name if recipe is not None
                   else type(module).__name__, "model.num_classes": _classes(module, size), **updates}  # fmt: skip
    if "preprocess.input_size" in updates and "preprocess.resize" not in updates:
        updates["preprocess.resize"] = round(updates["preprocess.input_size"] / 0.875)  # the usual 87.5% crop
    return recipes.override(base, updates)


def _updates(overrides: dict[str, Any]) -> dict[str, Any]:
    updates: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "prune":
            updates.update({"prune.enabled": bool(value), **({"prune.ratio": value} if value is not True else {})})
        elif key == "latency_budget":
            updates.update({"prune.enabled": True, "prune.mode": "latency", "prune.latency_budget": value})
        elif key in SHORTCUTS or "." in key:
            updates[SHORTCUTS.get(key, key)] = value
        else:
            raise DeployError(f"unknown build option {key!r}: use one of {', '.join(sorted(SHORTCUTS))}, prune, "
                              "latency_budget, or a dotted recipe path such as 'quantize.calibration.method'")  # fmt: skip
    return updates


def _classes(module, size: int) -> int:
    """The class count of a module's logits, from one forward pass on a copy (the user's module is not touched)."""
    import torch

    probe = copy.deepcopy(module).eval()
    try:
        with torch.no_grad():
            out = probe(torch.zeros(1, 3, size, size))
    except Exception as err:  # noqa: BLE001 - the user's forward
        raise DeployError(f"the model's forward failed on a (1, 3, {size}, {size}) input: {type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200]}; set input_size= to the size it takes") from None  # fmt: skip
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DeployError(f"the model returned {got} for one image; it must return (batch, classes) logits")
    return int(out.shape[1])
