"""The stages of a build, in order. Each is an object with a name, a test of whether it applies to a build, and
a run that updates the build context and returns its notes for the report:

    class Stage(Protocol):
        name: str                                   # log label and report["stages"] name
        def applies(self, b: Build) -> bool: ...    # from the recipe and the build's state so far
        def run(self, b: Build) -> str: ...         # updates b (and its part of b.report), returns notes

A new stage is one class in its own module under deploy/stages/ and one line in PLAN.
"""

from __future__ import annotations

from typing import Protocol

from ..stages.data import Data
from ..stages.describe import Describe
from ..stages.distill import Distill
from ..stages.engine import Engine
from ..stages.export_onnx import ExportONNX, ImportONNX
from ..stages.fold_bn import FoldBN
from ..stages.int8.adaround import AdaRound
from ..stages.int8.bias_correction import BiasCorrection
from ..stages.int8.equalize import Equalize
from ..stages.int8.mixed_precision import MixedPrecision
from ..stages.int8.pad_channels import PadDepthwise
from ..stages.int8.qat import QAT
from ..stages.int8.quantize import Quantize
from ..stages.int8.sensitivity import Sensitivity
from ..stages.load import Load
from ..stages.prune import Prune
from ..stages.verify import Verify
from .context import Build


class Stage(Protocol):
    name: str

    def applies(self, b: Build) -> bool: ...

    def run(self, b: Build) -> str: ...


# load -> data -> [import_onnx | prune -> distill -> fold_bn -> export_onnx] -> [equalize] -> pad_depthwise ->
# quantize -> [adaround] -> bias_correction -> [qat] -> [mixed_precision] -> sensitivity -> [engine] -> verify -> describe
PLAN: list[Stage] = [
    Load(), Data(), ImportONNX(), Prune(), Distill(), FoldBN(), ExportONNX(),
    Equalize(), PadDepthwise(), Quantize(), AdaRound(), BiasCorrection(), QAT(), MixedPrecision(), Sensitivity(),
    Engine(), Verify(), Describe(),
]  # fmt: skip
