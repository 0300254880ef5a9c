"""The int8 stages of `deploy build` (deploy/int8.py): graph preparation, the mixed-precision fallback, the
per-layer sensitivity section and the recommended model."""

import json

import pytest
from helpers import BAD, bad_layer_onnx

from deploy import build
from deploy import recipe as recipes
from deploy.cli import main
from deploy.core.context import PREPARED
from deploy.serving.predictor import pick_model


@pytest.mark.parametrize("target", ["ort-cpu", "tensorrt"])
def test_mixed_precision_meets_a_threshold_that_plain_ptq_misses(tmp_path, target):
    r = recipes.load(str(bad_layer_onnx(tmp_path / "bad.onnx")))
    r = recipes.override(r, {
        "quantize.enabled": True, "quantize.target": target, "quantize.float_stem": False, "quantize.calibration.samples": 32,
        "verify.heldout": 32, "verify.max_top1_drop": None, "verify.min_sqnr_db": 28.0, "verify.latency.runs": 5,
        "quantize.mixed_precision.enabled": True, "quantize.mixed_precision.max_float_layers": 3,
    })  # fmt: skip
    out = tmp_path / "out"
    report = build(r, out=out).report
    mp = report["mixed_precision"]
    assert mp["int8"]["missed"] and mp["met"] and BAD in mp["float_layers"]
    assert mp["steps"][-1]["sqnr_db"] >= 28.0
    # verify measures the written model again, on ORT's kernels for ort-cpu: the layer kept in float must not be
    # re-quantized by ORT's optimizer (qdq_placement.float_inputs)
    assert report["passed"] and report["accuracy"]["sqnr_db"] >= 28.0
    assert "mixed_precision" in [s["name"] for s in report["stages"]]
    assert "Mixed precision: " in (out / "report.md").read_text()


def test_mixed_precision_that_cannot_meet_the_threshold_fails_the_build_with_its_record(tmp_path):
    r = recipes.load(str(bad_layer_onnx(tmp_path / "bad.onnx")))
    r = recipes.override(r, {
        "quantize.enabled": True, "quantize.target": "tensorrt", "quantize.calibration.samples": 16,
        "verify.heldout": 16, "verify.max_top1_drop": None, "verify.min_sqnr_db": 80.0, "verify.latency.runs": 5,
        "quantize.mixed_precision.enabled": True, "quantize.mixed_precision.max_float_layers": 1,
    })  # fmt: skip
    result = build(r, out=tmp_path / "out")
    assert not result.passed and "min_sqnr_db 80.0" in result.failures[0]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert result.report == report and result.recommended == tmp_path / "out" / "model.fp32.onnx"
    assert "max_float_layers 1" in report["mixed_precision"]["error"] and not report["mixed_precision"]["met"]
    assert report["recommended"]["precision"] == "fp32" and "min_sqnr_db" in report["recommended"]["reason"]
    assert pick_model(tmp_path / "out").name == "model.fp32.onnx"


def test_graph_preparation_in_the_build_and_diagnose_after(tmp_path, small_recipe, capsys):
    data = small_recipe.model_dump(mode="json")
    data["verify"].update(max_top1_drop=None)
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(data))
    out = tmp_path / "out"
    assert main(["build", str(path), "--int8", "--equalize", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    names = [s["name"] for s in report["stages"]]
    assert names[names.index("equalize"):] == ["equalize", "pad_depthwise", "quantize", "bias_correction",
                                               "sensitivity", "verify", "describe"]  # fmt: skip
    pad = report["pad_depthwise"]  # mobilenet_v3_small's 72, 88 and 120 channels, after equalization
    assert sorted(pad["convs"].values()) == [80, 96, 128] and pad["max_abs_logit_diff"] < 1e-4
    eq = report["equalize"]
    assert eq["pairs"] > 0 and eq["max_abs_logit_diff"] < 1e-4
    assert eq["range_spread"]["conv1_out"]["after"] < eq["range_spread"]["conv1_out"]["before"]
    assert report["bias_correction"]["layers"] > 0
    assert report["quantize"]["source"] == PREPARED and (out / PREPARED).is_file()
    assert report["sensitivity"]["layers"] and "## Layer sensitivity" in (out / "report.md").read_text()
    assert pick_model(out).name == report["recommended"]["model"]
    # diagnose re-quantizes from the equalized model with the build's cached ranges
    assert main(["diagnose", str(out), "--images", "0", "--out", str(tmp_path / "diag")]) == 0
    assert json.loads((tmp_path / "diag" / "diagnose.json").read_text())["layers"]
