"""The load stage: the PyTorch model, from the recipe's source and weights or the user's own module (copied)."""

from __future__ import annotations

import copy

from .. import models
from ..core.context import Build


class Load:
    name = "load"

    def applies(self, b: Build) -> bool:
        return b.recipe.model.source != "onnx"

    def run(self, b: Build) -> str:
        module = b.options.module
        b.model = copy.deepcopy(module).eval() if module is not None else models.build(b.recipe.model)
        if b.recipe.model.weights == models.RANDOM_WEIGHTS:
            b.warn("random weights (--weights random): size and latency are real, accuracy figures are not")
        return f"{sum(p.numel() for p in b.model.parameters()) / 1e6:.2f}M parameters"
