"""`deploy explore`: measured MACs follow the MobileNetV1 closed form; every variant is timed."""

import json

import pytest

from deploy.cli import main
from deploy.explore import explore
from deploy.mobilenet_v1 import paper_macs
from helpers import is_plot


def test_mobilenet_v1_grid_matches_the_closed_form_and_is_timed(tmp_path, capsys):
    out = tmp_path / "x"
    args = ["explore", "mobilenet_v1", "--width", "0.5,1", "--resolution", "64,96", "--runs", "3", "--samples", "8",
            "--threads", "1", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    variants = json.loads((out / "explore.json").read_text())["variants"]
    assert [(v["width"], v["resolution"]) for v in variants] == [(0.5, 64), (0.5, 96), (1.0, 64), (1.0, 96)]
    for v in variants:
        assert v["macs"] == pytest.approx(paper_macs(v["width"], v["resolution"]), rel=0.02)
        assert v["fp32_ms"] > 0 and v["int8_ms"] > 0
    # α scales the params about quadratically; ρ leaves them unchanged and scales MACs by ρ²
    assert variants[0]["params"] == variants[1]["params"] < variants[2]["params"] / 3
    assert variants[3]["macs"] / variants[2]["macs"] == pytest.approx((96 / 64) ** 2, rel=0.02)
    assert is_plot(out / "explore.png") and "closed-form" in (out / "explore.md").read_text().lower()
    assert "deviation" in capsys.readouterr().out


def test_other_families_build_at_other_widths():
    r = explore("mobilenet_v3_small", [0.5], [64], int8=False, runs=2, threads=1)["variants"][0]
    assert r["macs"] > 0 and r["fp32_ms"] > 0 and "closed_form_macs" not in r


def test_a_family_without_width_multiplier_is_a_one_line_error(capsys):
    assert main(["explore", "squeezenet1_1", "--no-int8"]) == 2
    assert "has no width multiplier" in capsys.readouterr().err


def test_accuracy_columns_with_per_width_checkpoints(tmp_path, small_val):
    import torch

    from deploy import data, recipe
    from deploy.mobilenet_v1 import MobileNetV1
    from deploy import metrics

    torch.manual_seed(1)
    model = MobileNetV1(num_classes=3, width=0.5).eval()
    torch.save(model.state_dict(), tmp_path / "w0.5.pth")
    v = explore("mobilenet_v1", [0.5], [64], runs=2, samples=8, num_classes=3, threads=1,
                weights=str(tmp_path / "w{width}.pth"), val=small_val)["variants"][0]  # fmt: skip
    pre = data.Preprocessor(recipe.load("mobilenet_v1").preprocess.model_copy(update={"input_size": 64, "resize": 73}))
    x, y = data.labeled_set(small_val, pre, 3).load()
    with torch.no_grad():
        expected = metrics.accuracy(model(torch.from_numpy(x)).numpy(), y)["top1"]
    assert v["fp32_top1"] == pytest.approx(expected)  # the checkpoint was loaded and evaluated on --val
    assert 0 <= v["int8_top1"] <= 100


def test_accuracy_needs_a_width_pattern(tmp_path, small_val, capsys):
    args = ["explore", "mobilenet_v1", "--weights", str(tmp_path / "w.pth"), "--val", str(small_val)]
    assert main(args) == 2
    assert "--weights must contain {width}" in capsys.readouterr().err
