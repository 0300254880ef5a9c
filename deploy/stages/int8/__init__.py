"""The int8 stages, in plan order: equalize -> pad_depthwise -> quantize -> [adaround] -> bias_correction -> [qat] ->
[mixed_precision] -> sensitivity. QAT runs when `quantize.qat.mode` is on, or auto and the int8 model misses a
verify threshold and training images are given; mixed precision when enabled and the int8 model still misses
one. Both are judged on the build's evaluation images (--val, else held-out calibration images), the same ones
verify reports. Each stage quantizes or rewrites `Build.source` (the fp32 model the int8 one comes from)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...core.context import Build
from ...errors import DeployError
from ...runtimes.ort import OrtCpu


def check_prepared(b: Build, before: Path, after: Path) -> float:
    """Largest logit change a graph preparation made on 8 calibration images; raises if beyond export tolerance."""
    x = b.calibration.calib.inputs[:8]
    ref = OrtCpu(before, b.threads).infer(x)
    diff = float(np.abs(OrtCpu(after, b.threads).infer(x) - ref).max())
    if diff > b.recipe.export.tolerance * max(float(np.abs(ref).max()), 1.0):
        raise DeployError(f"graph preparation ({after.name}) changed the fp32 logits by {diff:.2e}")
    return diff
