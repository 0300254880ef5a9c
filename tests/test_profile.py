"""`deploy profile`: totals equal the model's own counts, time is attributed to the layers that run."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from deploy import mobilenet_v1, models, profile, recipe
from deploy.cli import main
from deploy.stages import fold_bn


@pytest.fixture(scope="module")
def v3_small():
    return profile.profile_target("mobilenet_v3_small", 64, runs=3, threads=1)


def test_totals_equal_the_models_own_counts(v3_small):
    model, _ = fold_bn.fold_batchnorm(models.architecture(recipe.load("mobilenet_v3_small").model))
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.zeros(1, 3, 64, 64))
    t = v3_small["totals"]
    assert t["params"] == sum(p.numel() for p in model.parameters())
    assert t["macs"] == pytest.approx(fc.get_total_flops() / 2, rel=0.01)
    assert sum(r["mac_share"] for r in v3_small["layers"]) == pytest.approx(1)
    assert sum(r["time_share"] for r in v3_small["layers"]) == pytest.approx(1)


def test_every_convolution_and_linear_layer_is_timed_and_counted(v3_small):
    convs = [r for r in v3_small["layers"] if r["type"].startswith(("Conv2d", "Linear"))]
    # MobileNetV3-Small: stem, 4 in block 1, 3 in blocks 2-3, 5 in blocks 4-11 (with SE), last conv; 2 linear
    assert len(convs) == 1 + 4 + 2 * 3 + 8 * 5 + 1 + 2
    assert all(r["time_share"] > 0 and r["macs"] > 0 and r["params"] > 0 for r in convs)
    dw = next(r for r in convs if r["type"] == "Conv2d dw 3x3")
    c = dw["output_shape"][1]
    assert dw["memory_access_bytes"] == 4 * (c * 32 * 32 + dw["activation_bytes"] // 4 + dw["params"])
    assert {c["category"] for c in v3_small["categories"]} >= {"depthwise conv", "pointwise conv", "linear"}


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["profile", "mobilenet_v1", "--input-size", "64", "--runs", "2", "--threads", "1", "--out", str(out)]) == 0
    prof = json.loads((out / "profile.json").read_text())
    assert prof["model"] == "mobilenet_v1" and prof["totals"]["macs"] == mobilenet_v1.paper_macs(1.0, 64)
    md = (out / "profile.md").read_text()
    assert "top by time" in md and "top by MACs" in md and "depthwise conv" in md
    assert "top by time" in capsys.readouterr().out


def test_a_folder_that_is_not_a_build_is_a_one_line_error(tmp_path, capsys):
    assert main(["profile", str(tmp_path)]) == 2
    assert "is not a build folder" in capsys.readouterr().err
