"""`deploy build model.onnx`: start from an fp32 ONNX file, skipping the PyTorch-only stages."""

import json

import numpy as np
import onnx
import pytest

from deploy import models, recipe
from deploy.cli import main
from deploy.errors import DeployError
from deploy.runtimes.ort import OrtCpu
from deploy.stages.export_onnx import export


@pytest.fixture
def onnx_file(tmp_path, small_recipe):
    path = tmp_path / "mine.onnx"
    export(models.build(small_recipe.model), path, small_recipe.export, 64)
    return path


def test_build_from_onnx_quantizes_and_verifies(tmp_path, onnx_file):
    r = recipe.load(str(onnx_file))
    assert (r.model.source, r.model.num_classes, r.preprocess.input_size) == ("onnx", 3, 64)
    out = tmp_path / "out"
    assert main(["build", str(onnx_file), "--int8", "--samples", "16", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    padded = ["pad_depthwise"] if "pad_depthwise" in report else []  # channels not a multiple of 16 (pad_channels.py)
    assert [s["name"] for s in report["stages"]] == ["data", "import_onnx", *padded, "quantize", "bias_correction",
                                                     "sensitivity", "verify", "describe"]
    assert "skipped" in report["stages"][1]["notes"]
    # random weights, 8 held-out photos: measured 22.4 dB; a broken quantization (wrong scales, lost layers) is < 10
    assert report["accuracy"]["sqnr_db"] > 15
    x = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
    assert np.array_equal(OrtCpu(out / "model.fp32.onnx").infer(x), OrtCpu(onnx_file).infer(x))  # the input, copied


def test_fixed_batch_and_invalid_files_are_refused(tmp_path, onnx_file, capsys):
    proto = onnx.load(str(onnx_file))
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    fixed = tmp_path / "fixed.onnx"
    onnx.save(proto, str(fixed))
    assert main(["build", str(fixed), "--out", str(tmp_path / "a")]) == 2
    assert "batch dimension is fixed" in capsys.readouterr().err
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx")
    with pytest.raises(DeployError, match="not an ONNX model"):
        recipe.load(str(junk))
    with pytest.raises(DeployError, match="prune, distill and qat need a PyTorch model"):
        recipe.override(recipe.load(str(onnx_file)), {"prune.enabled": True})
    with pytest.raises(DeployError, match="is an ONNX file"):
        models.architecture(recipe.load(str(onnx_file)).model)
