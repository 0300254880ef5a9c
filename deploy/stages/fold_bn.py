"""Fold every BatchNorm that directly follows a Conv or Linear into that layer's weights and bias."""

from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from ..core.context import Build
from ..errors import DeployError, traced


class _Tracer(fx.Tracer):
    """Keeps BatchNorm subclasses (timm's BatchNormAct2d) as leaves so they can be matched."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, qualname)


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Return a folded copy of `model` (same class, BN layers replaced) and the names of the folded BNs.

    `torch.fx.experimental.optimization.fuse` does the same on a GraphModule but matches only plain
    nn.BatchNorm2d and returns a GraphModule; we keep the original module tree (so later stages such as
    pruning and checkpoint reloading see a plain model) and also handle timm's BatchNormAct2d, whose
    activation stays in place of the folded norm.
    """
    model = copy.deepcopy(model).eval()
    graph = _Tracer().trace(model)
    modules = dict(model.named_modules())
    folded: list[str] = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _BatchNorm):
            continue
        prev = node.args[0]
        if not isinstance(prev, fx.Node) or prev.op != "call_module" or len(prev.users) != 1:
            continue
        layer, bn = modules[prev.target], modules[node.target]
        if not bn.track_running_stats or bn.running_mean is None:
            continue
        if isinstance(layer, nn.Conv2d):
            weight, bias = fuse_conv_bn_weights(
                layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
            )
        elif isinstance(layer, nn.Linear) and isinstance(bn, nn.BatchNorm1d):
            weight, bias = fuse_linear_bn_weights(
                layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
            )
        else:
            continue
        layer.weight, layer.bias = weight, bias
        _replace(model, node.target, _after_norm(bn))
        folded.append(node.target)
    return model, folded


def _after_norm(bn: nn.Module) -> nn.Module:
    """What remains of a norm layer once its affine transform is folded: timm's drop+act, else nothing."""
    rest = [m for name in ("drop", "act") if isinstance(m := getattr(bn, name, None), nn.Module)]
    rest = [m for m in rest if not isinstance(m, nn.Identity)]
    return nn.Sequential(*rest) if rest else nn.Identity()


def _replace(model: nn.Module, qualname: str, new: nn.Module) -> None:
    parent_name, _, child = qualname.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@torch.no_grad()
def max_logit_difference(a: nn.Module, b: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Max |a(x) - b(x)| and the same relative to max |a(x)|."""
    ya, yb = a(x), b(x)
    diff = (ya - yb).abs().max().item()
    return diff, diff / max(ya.abs().max().item(), 1e-12)


class FoldBN:
    name = "fold_bn"

    def applies(self, b: Build) -> bool:
        return b.model is not None and b.recipe.fold_bn.enabled

    def run(self, b: Build) -> str:
        probe = torch.from_numpy(b.calibration.calib.inputs[:8])
        with traced("fold_bn", b.model, "fold_bn.enabled: false"):
            folded, names = fold_batchnorm(b.model)
        diff, rel = max_logit_difference(b.model, folded, probe)
        b.report["fold_bn"] = {"folded": len(names), "max_abs_logit_diff": diff, "relative": rel}
        if rel > b.recipe.fold_bn.tolerance:
            raise DeployError(f"BN folding changed the logits by {rel:.2e} (relative) > {b.recipe.fold_bn.tolerance}")
        b.model = folded
        return f"{len(names)} BatchNorm folded, max |logit diff| {diff:.2e}"
