"""The prune stage: structured channel pruning by a ratio (ratio.py) or to a latency budget (latency.py), on
Torch-Pruning's dependency graph; what both share is in groups.py."""

from __future__ import annotations

import torch
from torch import nn

from ...core.context import Build
from ...errors import DeployError, traced
from ...recipe import PruneConfig
from .. import summary
from .groups import adapt_bn, exact_shuffle_units, pruned_checkpoint


def prune(model: nn.Module, cfg: PruneConfig, input_size: int, data=None) -> tuple[nn.Module, dict]:
    """A pruned copy of `model` and its record (MACs/params before and after, widths, and the mode's details).
    `data`: unlabeled images (N x 3 x H x W) for Taylor importance, adaptive BN and the latency mode's KL."""
    from ...shufflenet_v1 import ShuffleNetV1

    if isinstance(model, ShuffleNetV1) and (cfg.mode == "latency" or cfg.importance == "taylor"):
        raise DeployError("ShuffleNet v1 prunes with prune.mode ratio and importance l1, l2 or bn_scale: its "
                          "bottleneck channels are re-selected across the channel shuffle (stages/prune/groups.py)")  # fmt: skip
    if cfg.mode == "latency":
        from .latency import prune_latency

        return prune_latency(model, cfg, input_size, data)
    if cfg.scope == "kl" and cfg.ratio > 0:
        from .latency import prune_macs_kl

        if not isinstance(model, ShuffleNetV1):
            return prune_macs_kl(model, cfg, input_size, data)
        cfg = cfg.model_copy(update={"scope": "uniform"})  # its shuffle's units are refilled after a uniform prune
    from .ratio import prune_ratio

    pruned, record = prune_ratio(model, cfg, input_size, data)
    if exact_shuffle_units(model, pruned, cfg.importance) and data is not None:
        adapt_bn(pruned, (data[i : i + 64] for i in range(0, len(data), 64)))  # again, on the refilled units
        pruned.eval()
    return pruned, record


class Prune:
    name = "prune"

    def applies(self, b: Build) -> bool:
        return b.recipe.prune.enabled

    def run(self, b: Build) -> str:
        r = b.recipe
        summary.start(b)
        b.original = b.model
        with traced("prune", b.model, "prune.enabled: false"):
            b.model, b.report["prune"] = prune(b.model, r.prune, r.preprocess.input_size, b.calibration.calib.inputs)
        torch.save(pruned_checkpoint(b.model), b.workdir / "model.pruned.pth")
        summary.record(b, "prune")
        p = b.report["prune"]
        return (f"MACs {p['before']['macs'] / 1e6:.1f}M -> {p['after']['macs'] / 1e6:.1f}M, "
                f"params {p['before']['params'] / 1e6:.2f}M -> {p['after']['params'] / 1e6:.2f}M")  # fmt: skip
