"""Parameters and MACs of a model, counted by torch.utils.flop_counter (MACs = FLOPs / 2)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def count(model: nn.Module, input_size: int) -> dict:
    """{"params": ..., "macs": ...} for one image of input_size x input_size, in eval mode."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, input_size, input_size, device=device))
    model.train(was_training)
    return {"params": sum(p.numel() for p in model.parameters()), "macs": counter.get_total_flops() // 2}
