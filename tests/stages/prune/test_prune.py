"""Structured pruning: every registered model stays runnable and exportable, widths are SIMD-friendly,
MACs fall by the requested amount, pruned checkpoints reload, and pruning nothing changes nothing."""

import pytest
import torch
from torch import nn

from deploy import macs, models, recipe
from deploy.recipe import PruneConfig
from deploy.stages.prune import prune
from deploy.stages.prune.groups import head_layers, pruned_checkpoint
from helpers import assert_runs_and_exports

SIZE = 64


def _model(name):
    torch.manual_seed(0)
    return models.architecture(recipe.load(name).model).eval()


@pytest.mark.parametrize("name", recipe.available())
def test_pruned_model_runs_exports_and_keeps_round_widths(name, tmp_path):
    model = _model(name)
    pruned, rec = prune(model, PruneConfig(enabled=True, ratio=0.3, by="channels"), SIZE)
    assert rec["after"]["macs"] < 0.9 * rec["before"]["macs"] and rec["after"]["params"] < rec["before"]["params"]
    old = dict(model.named_modules())
    changed = 0
    for n, m in pruned.named_modules():
        if isinstance(m, nn.Conv2d) and m.out_channels != old[n].out_channels:
            changed += 1
            assert m.out_channels % 8 == 0, f"{n}: {m.out_channels} channels"
    assert changed > 0
    for head in head_layers(model):  # classifier outputs are the classes: never pruned (SqueezeNet's is a conv)
        w_old, w_new = old[head].weight, dict(pruned.named_modules())[head].weight
        assert w_new.shape[0] == w_old.shape[0] == 1000
    assert_runs_and_exports(pruned, tmp_path)


def test_macs_target_is_met_and_pruned_checkpoint_reloads(tmp_path):
    model = _model("mobilenet_v3_small")
    pruned, rec = prune(model, PruneConfig(enabled=True, ratio=0.3, by="macs", scope="uniform"), SIZE)
    after = macs.count(pruned, SIZE)
    assert after == rec["after"]
    # channel counts move in steps of round_to=8, so the achievable MACs are discrete: within 5 points
    assert rec["macs_reduction"] == pytest.approx(0.3, abs=0.05)
    assert rec["params_reduction"] > 0.1
    path = tmp_path / "pruned.pth"
    torch.save(pruned_checkpoint(pruned), path)
    spec = recipe.load("mobilenet_v3_small").model.model_copy(update={"weights": str(path)})
    again = models.build(spec)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(pruned(x), again(x))
    assert macs.count(again, SIZE) == after


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "shufflenet_v2_x1_0"])
def test_ratio_zero_is_exact(name):
    model = _model(name)
    pruned, rec = prune(model, PruneConfig(enabled=True, ratio=0.0), SIZE)
    assert rec["after"] == rec["before"]
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(model(x), pruned(x))


@pytest.mark.parametrize("importance", ["l1", "l2"])
def test_zero_importance_channels_are_pruned_without_changing_the_output(importance):
    """Channels whose every weight is zero carry nothing: pruning exactly them must leave the logits as they were."""
    model = _model("mobilenet_v2")
    block = model.features[2].conv  # expand 1x1 (96 ch) -> BN -> ReLU6 -> dw 3x3 -> BN -> ReLU6 -> project 1x1
    dead = torch.arange(0, 96, 2)  # half of the expanded channels
    with torch.no_grad():
        for layer in (block[0][0], block[0][1], block[1][0], block[1][1]):
            for name in ("weight", "bias"):
                t = getattr(layer, name, None)
                if t is not None:
                    t[dead] = 0
        block[2].weight[:, dead] = 0
    group = ("features.2.conv.0.0", "features.2.conv.1.0")  # the expand conv and the depthwise conv it feeds
    protect = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in group]
    cfg = PruneConfig(enabled=True, ratio=0.5, by="channels", importance=importance, protect=protect)
    pruned, _ = prune(model, cfg, SIZE)
    assert pruned.features[2].conv[0][0].out_channels == 48
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("importance, removed", [("l1", "small weights"), ("bn_scale", "small gammas")])
def test_each_importance_removes_the_channels_it_should(importance, removed):
    """In one group of mobilenet_v2 (expand conv -> BN -> depthwise conv -> BN -> project), a quarter of the
    channels get 1000x smaller weights and another quarter 1000x smaller BN scales (gammas): magnitude importance
    must remove the first quarter, BN-scale importance the second."""
    model = _model("mobilenet_v2")
    block = model.features[2].conv
    conv, bn, dw, dbn, proj = block[0][0], block[0][1], block[1][0], block[1][1], block[2]
    c = torch.arange(96)
    chosen = {"small weights": c[c % 4 == 0], "small gammas": c[c % 4 == 1]}
    with torch.no_grad():
        for norm in (bn, dbn):
            norm.weight[:] = 1 + c / 1000  # distinct values: they tell which channels survived
            norm.weight[chosen["small gammas"]] *= 1e-3
        for w in (conv.weight, dw.weight):
            w[chosen["small weights"]] *= 1e-3
        proj.weight[:, chosen["small weights"]] *= 1e-3
    gammas = bn.weight.detach().clone()
    group = ("features.2.conv.0.0", "features.2.conv.1.0")
    protect = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in group]
    cfg = PruneConfig(enabled=True, ratio=0.25, by="channels", importance=importance, protect=protect)
    pruned, _ = prune(model, cfg, SIZE)
    kept = pruned.features[2].conv[0][1].weight.detach()
    survivors = {int(i) for i in c if torch.isclose(kept, gammas[i], rtol=0, atol=1e-9).any()}
    assert len(survivors) == 72 and set(range(96)) - survivors == set(chosen[removed].tolist())


def test_taylor_importance_prunes_with_calibration_images():
    model = _model("mobilenet_v3_small")
    data = torch.randn(4, 3, SIZE, SIZE).numpy()
    pruned, rec = prune(model, PruneConfig(enabled=True, ratio=0.3, by="channels", importance="taylor"), SIZE, data)
    assert rec["after"]["macs"] < 0.9 * rec["before"]["macs"]
    assert pruned(torch.randn(1, 3, SIZE, SIZE)).shape == (1, 1000)
