"""The `deploy` command end to end: outputs, report content, thresholds and every error path."""

import json
import subprocess
import sys

import pytest
import yaml

from deploy import recipe as recipes
from deploy.cli import main


def _recipe_file(tmp_path, recipe, **verify):
    data = recipe.model_dump(mode="json")
    data["verify"].update(verify)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ")
    return err


def test_build_writes_models_and_reports(tmp_path, small_recipe, small_val, capsys):
    out = tmp_path / "out"
    fast = recipes.override(small_recipe, {"quantize.adaround.iterations": 100})  # the default 1000 take ~25 s here
    rc = main(["build", _recipe_file(tmp_path, fast, max_top1_drop=None), "--int8", "--target", "tensorrt",
               "--adaround", "on", "--val", str(small_val), "--out", str(out)])  # fmt: skip
    assert rc == 0
    assert {p.name for p in out.iterdir()} >= {"model.fp32.onnx", "model.int8.onnx", "report.json", "report.md",
                                                "latency.png", "calibration.json"}  # fmt: skip
    r = json.loads((out / "report.json").read_text())
    assert r["model"] == "mobilenet_v3_small" and r["target"] == "tensorrt" and r["passed"]
    assert r["recommended"]["model"] == "model.int8.onnx"  # tensorrt target, no threshold missed
    assert [s["name"] for s in r["stages"]] == ["load", "data", "fold_bn", "export_onnx", "quantize", "adaround",
                                                "bias_correction", "sensitivity", "verify", "describe"]
    assert r["adaround"]["layers"] > 30 and "- AdaRound: " in (out / "report.md").read_text()
    assert set(r) >= {"schema", "tool", "model", "target", "int8", "created", "recipe", "stages", "warnings",
                      "failures", "calibration", "validation", "export", "fold_bn", "quantize", "accuracy", "latency",
                      "recommended", "environment", "size_bytes", "passed", "files"}  # fmt: skip
    ran = recipes.validate(r["recipe"], "report.json")  # the recipe it ran, with the options applied
    assert ran.quantize.enabled and ran.quantize.target == "tensorrt" and ran.model == small_recipe.model
    acc = r["accuracy"]
    for p in ("fp32", "int8"):
        assert set(acc[p]) == {"top1", "top5", "n"} and acc[p]["n"] == 5
    assert acc["top1_drop"] == pytest.approx(acc["fp32"]["top1"] - acc["int8"]["top1"])
    assert acc["sqnr_db"] > 12  # random weights, 5 photos, tensorrt form: measured 17-20 dB; broken int8 < 10
    for p in ("fp32", "int8"):
        assert set(r["latency"][p]) >= {"p50_ms", "p90_ms", "p99_ms", "throughput_ips", "batch"}
    assert r["size_bytes"]["int8"] < 0.35 * r["size_bytes"]["fp32"]
    assert r["environment"]["threads"] >= 1 and r["environment"]["packages"]["onnxruntime"]
    # tighter than the build's own 1e-4 gates: folding and export are exact up to float rounding
    assert r["fold_bn"]["relative"] < 1e-5 and r["export"]["parity"]["relative"] < 1e-5
    md = (out / "report.md").read_text()
    assert "built-in sample photos" in md and "![latency](latency.png)" in md
    assert "built-in sample photos" in capsys.readouterr().err  # said loudly on the terminal too
    assert not list(tmp_path.glob(".out.*"))  # no temporary folders left behind


def test_missed_threshold_fails_but_writes_the_report(tmp_path, small_recipe, capsys):
    out = tmp_path / "out"
    rc = main(["build", _recipe_file(tmp_path, small_recipe, min_sqnr_db=200.0), "--int8", "--out", str(out)])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("build failed: int8 logit SQNR") and "min_sqnr_db 200.0" in err
    r = json.loads((out / "report.json").read_text())
    assert not r["passed"] and r["failures"] and "Threshold missed" in (out / "report.md").read_text()
    # no --val: the recipe's max_top1_drop cannot be checked, and the report says so instead of passing it silently
    assert any("verify.max_top1_drop (1.0) needs labeled validation images" in w for w in r["warnings"])


def test_existing_output_needs_force_and_force_reuses_calibration(tmp_path, small_recipe, capsys):
    out = tmp_path / "out"
    args = ["build", _recipe_file(tmp_path, small_recipe), "--int8", "--out", str(out)]
    assert main(args) == 0
    assert main(args) == 2
    assert "exists; pass --force" in _one_line_error(capsys)
    assert main([*args, "--force"]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["quantize"]["calibration"]["cache_reused"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--calib", "/no/such/dir"], "calibration directory not found"),
        (["--val", "/no/such/dir"], "validation directory not found"),
        (["--num-classes", "7"], "pass --num-classes 3"),
    ],
)
def test_bad_input_is_one_line_and_leaves_no_output(tmp_path, small_recipe, capsys, extra, message):
    out = tmp_path / "out"
    assert main(["build", _recipe_file(tmp_path, small_recipe), "--int8", "--out", str(out), *extra]) == 2
    assert message in _one_line_error(capsys)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_unknown_model_and_bad_recipe_from_the_shell(tmp_path):
    run = subprocess.run([sys.executable, "-m", "deploy", "build", "mobilenet_v3_smal"], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip() == (
        "error: unknown model 'mobilenet_v3_smal'; did you mean mobilenet_v3_small, mobilenet_v3_large, mobilenet_v2?"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nmodel: {name: mobilenet_v2, source: torchvision}\nquantise: {}\n")
    run = subprocess.run([sys.executable, "-m", "deploy", "build", str(bad)], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.strip() == f"error: {bad}: unknown key 'quantise'"


def test_list_shows_every_recipe(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "efficientnet_lite0" in out and "mobilenet_v3_small" in out and "squeezenet1_1" in out
