"""Pruning by a ratio of channels or of MACs (prune.mode ratio), uniform or global, with Torch-Pruning's MetaPruner."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ... import macs
from ...errors import DeployError
from ...recipe import PruneConfig
from .groups import adapt_bn, importance, protected_layers, traceable_shuffle, widths


def _prune_once(model: nn.Module, cfg: PruneConfig, ratio: float, input_size: int, data) -> nn.Module:
    """A pruned copy of `model` with `ratio` of the channels of every prunable group removed."""
    import torch_pruning as tp

    model = copy.deepcopy(model).eval().requires_grad_(True)  # Torch-Pruning skips frozen weights
    modules = dict(model.named_modules())
    ignored = [modules[n] for n in protected_layers(model, cfg)]
    example = torch.zeros(1, 3, input_size, input_size)
    with traceable_shuffle():
        pruner = tp.pruner.MetaPruner(
            model, example, importance=importance(cfg.importance), global_pruning=cfg.scope == "global",
            pruning_ratio=ratio, ignored_layers=ignored, round_to=cfg.round_to,
        )  # fmt: skip
    if cfg.importance == "taylor":
        if data is None:
            raise DeployError("prune.importance taylor needs images (calibration data)")
        # Gradients of the loss against the model's own predictions: works without labels.
        x = torch.as_tensor(data[:32])
        logits = model(x)
        model.zero_grad()
        nn.functional.cross_entropy(logits, logits.argmax(1).detach()).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def prune_ratio(model: nn.Module, cfg: PruneConfig, input_size: int, data=None) -> tuple[nn.Module, dict]:
    """Prune `model` (a copy) by cfg.ratio of channels, or of MACs found by bisection on the channel ratio.

    With `data` (unlabeled images, N x 3 x H x W), Taylor importance uses it and the pruned model's BatchNorm
    statistics are re-estimated on it (adapt_bn). Returns the pruned model and a record: MACs/params before
    and after, the channel ratio used, widths."""
    before = macs.count(model, input_size)
    if cfg.by == "channels" or cfg.ratio == 0:
        channel_ratio = cfg.ratio
        pruned = _prune_once(model, cfg, channel_ratio, input_size, data)
    else:
        # MACs fall about quadratically with the channel ratio: start there, then bisect (each try prunes
        # a copy, a few seconds) until within 1% of the target, keeping the closest try.
        target = before["macs"] * (1 - cfg.ratio)
        lo, hi, best = 0.0, 0.95, None
        guess = 1 - (1 - cfg.ratio) ** 0.5
        for _ in range(8):
            candidate = _prune_once(model, cfg, guess, input_size, data)
            got = macs.count(candidate, input_size)["macs"]
            if best is None or abs(got - target) < abs(best[1] - target):
                best = (candidate, got, guess)
            if abs(got - target) <= 0.01 * before["macs"]:
                break
            lo, hi = (guess, hi) if got > target else (lo, guess)
            guess = (lo + hi) / 2
        pruned, _, channel_ratio = best
    if data is not None:
        adapt_bn(pruned, (data[i : i + 64] for i in range(0, len(data), 64)))
        pruned.eval()
    after = macs.count(pruned, input_size)
    record = {"bn_adapted_on": 0 if data is None else len(data),
        "by": cfg.by, "ratio": cfg.ratio, "channel_ratio": round(channel_ratio, 4), "scope": cfg.scope,
        "importance": cfg.importance, "round_to": cfg.round_to, "before": before, "after": after,
        "macs_reduction": 1 - after["macs"] / before["macs"], "params_reduction": 1 - after["params"] / before["params"],
        "protected": protected_layers(model, cfg), "widths": widths(pruned),
    }  # fmt: skip
    return pruned, record
