"""Export to ONNX: named input/output, dynamic batch, simplified (onnxslim or onnxsim), checked by onnx.checker."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from ..core.context import Build
from ..errors import DeployError
from ..recipe import ExportConfig
from ..runtimes.ort import OrtCpu

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
    proto = simplify(onnx.load(str(path)), cfg.simplifier)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return proto


def simplify(proto: onnx.ModelProto, simplifier: str) -> onnx.ModelProto:
    """`proto` simplified by onnxslim or onnxsim (export.simplifier), or as it is for "none"."""
    if simplifier == "onnxslim":
        import onnxslim

        return onnxslim.slim(proto)
    if simplifier == "onnxsim":
        try:
            import onnxsim
        except ImportError:
            raise DeployError("export.simplifier onnxsim is not installed: pip install 'edge-deploy[onnxsim]' "
                              "(or onnxsim), or use onnxslim") from None  # fmt: skip
        simplified, ok = onnxsim.simplify(proto)
        if not ok:
            raise DeployError("onnxsim could not check its simplified model; use export.simplifier onnxslim or none")
        return simplified
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


class ExportONNX:
    name = "export_onnx"

    def applies(self, b: Build) -> bool:
        return b.model is not None

    def run(self, b: Build) -> str:
        import numpy as np

        r = b.recipe
        probe = torch.from_numpy(b.calibration.calib.inputs[:8])
        b.fp32_onnx = b.source = b.workdir / "model.fp32.onnx"
        proto = export(b.model, b.fp32_onnx, r.export, r.preprocess.input_size)
        with torch.no_grad():
            ref = b.model(probe).numpy()
        got = OrtCpu(b.fp32_onnx, b.threads).infer(probe.numpy())
        diff = float(np.abs(ref - got).max())
        rel = diff / max(float(np.abs(ref).max()), 1e-12)
        b.report["export"] = {"opset": r.export.opset, "exporter": r.export.exporter, "nodes": len(proto.graph.node),
                              "parity": {"max_abs_logit_diff": diff, "relative": rel, "images": len(probe)}}  # fmt: skip
        if rel > r.export.tolerance:
            raise DeployError(f"ONNX Runtime output differs from PyTorch by {rel:.2e} (relative) > {r.export.tolerance}")
        return f"opset {r.export.opset}, {len(proto.graph.node)} nodes, PyTorch vs ORT max |diff| {diff:.2e}"


class ImportONNX:
    name = "import_onnx"

    def applies(self, b: Build) -> bool:
        return b.recipe.model.source == "onnx"

    def run(self, b: Build) -> str:
        b.fp32_onnx = b.source = b.workdir / "model.fp32.onnx"
        notes = import_onnx(Path(b.recipe.model.weights), b.fp32_onnx)
        b.report["export"] = {"source": b.recipe.model.weights, "note": notes}
        return notes
