"""Export to ONNX: named input/output, dynamic batch, simplified with onnxslim, checked by onnx.checker."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from ..errors import DeployError
from ..recipe import ExportConfig

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def export(model: nn.Module, path: Path, cfg: ExportConfig, input_size: int) -> onnx.ModelProto:
    """Write `model` to `path` as an fp32 ONNX graph and return it."""
    example = torch.randn(2, 3, input_size, input_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        try:
            if cfg.exporter == "dynamo":
                batch = torch.export.Dim("batch", min=1, max=4096)
                torch.onnx.export(
                    model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    opset_version=cfg.opset, dynamo=True, dynamic_shapes=({0: batch},), verbose=False,
                )  # fmt: skip
            else:
                torch.onnx.export(
                    model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    opset_version=cfg.opset, dynamo=False,
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                )  # fmt: skip
        except Exception as err:  # noqa: BLE001 - exporter failures come in many types
            raise DeployError(f"ONNX export failed ({cfg.exporter}): {str(err).splitlines()[0][:300]}") from None
    proto = onnx.load(str(path))
    if cfg.simplify:
        import onnxslim

        proto = onnxslim.slim(proto)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return proto
