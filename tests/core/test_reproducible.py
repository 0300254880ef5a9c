"""Two builds with the same inputs write the same ONNX bytes, and a --force rebuild reuses the calibration cache
(mobilenet_v3_small on ort-cpu pads its depthwise convs: the graph rewrite must not depend on set order)."""

import json
import os
import subprocess
import sys

import yaml

from deploy.cli import main


def test_builds_are_byte_identical_across_processes_and_reuse_the_cache(tmp_path, small_recipe, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(small_recipe.model_dump(mode="json")))
    for seed in ("1", "2"):  # Python's hash seed changes set iteration order between processes
        run = subprocess.run([sys.executable, "-m", "deploy", "build", str(recipe), "--int8", "--out",
                              str(tmp_path / seed)], env={**os.environ, "PYTHONHASHSEED": seed},
                             capture_output=True, text=True)  # fmt: skip
        assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "1" / "report.json").read_text())
    assert report["pad_depthwise"]["convs"]  # the rewrite this is about ran
    for name in ("model.fp32.onnx", "model.fp32.prepared.onnx", "model.int8.onnx"):
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes(), name

    cache = next((tmp_path / "1" / "calibration-cache").glob("ranges-*.json"))
    assert main(["build", str(recipe), "--int8", "--out", str(tmp_path / "1"), "--force"]) == 0
    assert json.loads((tmp_path / "1" / "report.json").read_text())["quantize"]["calibration"]["cache_reused"]

    cache = next((tmp_path / "1" / "calibration-cache").glob("ranges-*.json"))
    cache.write_text(cache.read_text()[:100])  # truncated, as a killed or full-disk build may leave it
    assert main(["build", str(recipe), "--int8", "--out", str(tmp_path / "1"), "--force"]) == 0
    r = json.loads((tmp_path / "1" / "report.json").read_text())
    assert not r["quantize"]["calibration"]["cache_reused"]  # recalibrated
    assert (tmp_path / "1" / "model.int8.onnx").read_bytes() == (tmp_path / "2" / "model.int8.onnx").read_bytes()
