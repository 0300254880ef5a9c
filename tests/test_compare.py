"""`deploy compare`: the Pareto front of made-up build reports, and the figures of a real one."""

import json

import pytest

from deploy.cli import main
from deploy.compare import load_points
from helpers import is_plot


def _report(root, name, fp32, int8=None):
    """A minimal build report: (top-1 or None, p50 ms, size MB) per precision."""
    r = {"model": name, "latency": {}, "accuracy": {}, "size_bytes": {}}
    for p, figures in (("fp32", fp32), ("int8", int8)):
        if figures:
            top1, ms, mb = figures
            r["latency"][p] = {"p50_ms": ms}
            r["size_bytes"][p] = int(mb * 1e6)
            if top1 is not None:
                r["accuracy"][p] = {"top1": top1}
    (root / name).mkdir()
    (root / name / "report.json").write_text(json.dumps(r))
    return root / name


def test_pareto_front_on_made_up_reports(tmp_path, capsys):
    builds = [
        _report(tmp_path, "big", (80.0, 10.0, 20.0), (79.5, 6.0, 5.0)),  # fp32: most accurate; int8: on both fronts
        _report(tmp_path, "small", (70.0, 3.0, 10.0), (60.0, 3.5, 2.5)),  # fp32 on latency front; int8 on size front
        _report(tmp_path, "bad", (65.0, 8.0, 30.0)),  # dominated by small fp32 everywhere
        _report(tmp_path, "noval", (None, 1.0, 1.0)),  # no labeled accuracy: never on a front
    ]
    (tmp_path / "compare").mkdir()  # a folder without report.json among build/* is skipped
    points = {(p["build"], p["precision"]): p for p in load_points([*builds, tmp_path / "compare"])}
    assert {k for k, p in points.items() if p["pareto_latency_ms"]} == {("big", "fp32"), ("big", "int8"), ("small", "fp32")}
    assert {k for k, p in points.items() if p["pareto_size_mb"]} == {("big", "fp32"), ("big", "int8"), ("small", "int8")}

    out = tmp_path / "out"
    assert main(["compare", *map(str, builds), "--out", str(out)]) == 0
    md = (out / "compare.md").read_text()
    assert is_plot(out / "compare.png") and "![accuracy vs latency and size](compare.png)" in md
    assert "not on the plot: noval" in md
    assert md.count("**yes**") == 6
    assert "| bad | bad | fp32 | 65.00 | 8.000 | 30.00 |  |  |" in md


def test_no_reports_is_a_one_line_error(tmp_path, capsys):
    assert main(["compare", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "no build reports" in capsys.readouterr().err


def test_points_from_real_build_reports(tmp_path, small_recipe, small_val):
    """A real `deploy build` report.json: compare reads its figures as they are (names and keys included)."""
    import yaml

    recipe = tmp_path / "recipe.yaml"
    data = small_recipe.model_dump(mode="json")
    data["verify"]["max_top1_drop"] = None
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "b"
    assert main(["build", str(recipe), "--int8", "--val", str(small_val), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    points = {p["precision"]: p for p in load_points([out])}
    assert set(points) == {"fp32", "int8"}
    for precision, p in points.items():
        assert p["top1"] == report["accuracy"][precision]["top1"]
        assert p["latency_ms"] == report["latency"][precision]["p50_ms"] and p["model"] == "mobilenet_v3_small"
        assert p["size_mb"] == pytest.approx(report["size_bytes"][precision] / 1e6)
