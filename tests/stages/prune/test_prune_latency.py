"""Latency-aware (NetAdapt-style) pruning: the measured latency reaches the budget, widths stay multiples of
round_to, the result runs, exports and reloads from its checkpoint; bad budgets and missing images are refused."""

import pytest
import torch
from helpers import assert_runs_and_exports
from torch import nn

from deploy import macs, models, recipe
from deploy.errors import DeployError
from deploy.recipe import PruneConfig
from deploy.stages.prune import prune
from deploy.stages.prune.groups import pruned_checkpoint

SIZE = 64


def _model():
    torch.manual_seed(0)
    return models.architecture(recipe.load("mobilenet_v3_small").model).eval()


def _images(n=64):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)).numpy()


@pytest.mark.parametrize("table", [True, False], ids=["look-up table", "whole models"])
def test_budget_is_reached_as_measured_and_the_result_runs_exports_and_reloads(tmp_path, table):
    model = _model()
    # blocks 1-9 protected to keep the test short: the first step times every remaining group (an ONNX export each)
    cfg = PruneConfig(enabled=True, mode="latency", latency_budget=0.9, latency_step=0.25, protect=["features.[1-9].*"],
                      latency_table=str(tmp_path / "table.json") if table else None)  # fmt: skip
    pruned, rec = prune(model, cfg, SIZE, _images())
    if table:  # predicted from the table, each step confirmed by timing the model whole
        t = rec["table"]
        assert t["timed_this_run"] == t["layers"] > 0 and (tmp_path / "table.json").is_file() and t["scale"] > 0
        assert all(0 < s["predicted_ratio"] < 1 for s in rec["steps"])
        for what in ("", "_from_unpruned"):
            predicted = t["predicted_after_ms" if not what else "predicted_from_unpruned_ms"]
            assert t[f"prediction_error{what}"] == pytest.approx(predicted / rec["latency_after_ms"] - 1, abs=1e-3)
    else:
        assert "table" not in rec and "predicted_ratio" not in rec["steps"][0]
    assert rec["mode"] == "latency" and rec["latency_budget"] == 0.9
    assert rec["latency_after_ms"] <= 0.9 * rec["latency_before_ms"]
    assert rec["latency_ratio"] == pytest.approx(rec["latency_after_ms"] / rec["latency_before_ms"], abs=1e-3)
    assert rec["steps"] and all(s["ms_saved"] > 0 and s["channels"][1] < s["channels"][0] for s in rec["steps"])
    assert rec["steps"][-1]["latency_ratio"] == rec["latency_ratio"]
    assert rec["after"] == macs.count(pruned, SIZE) and rec["after"]["macs"] < rec["before"]["macs"]

    old = {n: m.weight.shape[0] for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    new = {n: m.weight.shape[0] for n, m in pruned.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    changed = {n: c for n, c in new.items() if c != old[n]}
    assert set(changed) >= {layer for s in rec["steps"] for layer in s["layers"]}
    assert all(c % 8 == 0 for c in changed.values()), changed
    assert rec["widths"]["features.0.0"] == {"in_channels": 3, "out_channels": 16, "groups": 1}  # stem protected

    x, y = assert_runs_and_exports(pruned, tmp_path)

    torch.save(pruned_checkpoint(pruned), tmp_path / "pruned.pth")
    spec = recipe.load("mobilenet_v3_small").model.model_copy(update={"weights": str(tmp_path / "pruned.pth")})
    again = models.build(spec)
    with torch.no_grad():
        assert torch.equal(again(x), y)


def test_an_unreachable_budget_fails_with_the_latency_reached():
    model = _model()
    keep = "features.11.block.2.fc1"  # one squeeze-excite layer left prunable: it cannot save 90% of the latency
    protect = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n != keep]
    cfg = PruneConfig(enabled=True, mode="latency", latency_budget=0.1, protect=protect, latency_table=None)
    with pytest.raises(DeployError, match=r"latency budget 0.1 not reached: [01]\.\d\d of the unpruned latency"):
        prune(model, cfg, SIZE, _images(16))


def test_latency_mode_needs_images():
    with pytest.raises(DeployError, match="calibration images"):
        prune(_model(), PruneConfig(enabled=True, mode="latency"), SIZE, None)


BAD = [("latency_budget", 0), ("latency_budget", 1.0), ("latency_budget", -0.2), ("latency_budget", "fast"),
       ("latency_step", 1), ("mode", "speed")]


@pytest.mark.parametrize(("key", "value"), BAD)
def test_invalid_latency_settings_are_rejected(key, value):
    data = recipe.load("mobilenet_v3_small").model_dump()
    data["prune"].update({"enabled": True, "mode": "latency", key: value})
    with pytest.raises(DeployError, match=rf"^test: prune\.{key}: "):
        recipe.validate(data, "test")
