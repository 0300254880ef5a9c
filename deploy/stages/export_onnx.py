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


def import_onnx(src: Path, dst: Path) -> str:
    """Check a user's fp32 ONNX file and copy it to `dst`, for builds that start from ONNX; returns notes."""
    try:
        proto = onnx.load(str(src))
        onnx.checker.check_model(proto, full_check=True)
    except Exception as err:  # noqa: BLE001 - protobuf and checker errors have many types
        raise DeployError(f"{src} is not a valid ONNX model: {str(err).splitlines()[0][:200]}") from None
    if len(proto.graph.input) != 1 or len(proto.graph.input[0].type.tensor_type.shape.dim) != 4:
        raise DeployError(f"{src}: expected one NCHW image input, found {len(proto.graph.input)} inputs")
    elem = proto.graph.input[0].type.tensor_type.elem_type
    if elem != onnx.TensorProto.FLOAT:
        raise DeployError(f"{src}: the input is {onnx.TensorProto.DataType.Name(elem).lower()}, expected float "
                          "(export the model with the normalization inside or a float input)")  # fmt: skip
    if proto.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value"):
        raise DeployError(f"{src}: the batch dimension is fixed; export it with a dynamic batch axis")
    onnx.save(proto, str(dst))
    opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return f"ONNX input (opset {opset}, {len(proto.graph.node)} nodes): load, fold_bn and export skipped"
