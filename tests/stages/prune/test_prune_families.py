"""Pruning across HarDNet's harmonic concatenations and ShuffleNet v1's channel shuffle is exact: the pruned model
computes what the unpruned one does with the removed channels silenced."""

import copy

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from deploy.errors import DeployError
from deploy.hardnet import HarDNet
from deploy.recipe import PruneConfig
from deploy.shufflenet_v1 import ShuffleNetV1
from deploy.stages.prune import prune
from deploy.stages.prune.groups import protected_layers

SIZE = 64


def _distinct_scales(model):
    """Every BN with zero shift (a silenced channel is then exactly 0) and distinct scales (they tell which
    channels survived)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.zero_()
                m.bias.zero_()
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model.eval()


def _silenced(model, pruned):
    """`model` with the channels that pruning removed (the BN scales missing from `pruned`) set to zero."""
    out = copy.deepcopy(model)
    kept = dict(pruned.named_modules())
    with torch.no_grad():
        for name, m in out.named_modules():
            if isinstance(m, _BatchNorm):
                m.weight[~torch.isin(m.weight, kept[name].weight)] = 0
    return out


@pytest.mark.parametrize("make", [lambda: HarDNet("hardnet39ds"), lambda: ShuffleNetV1(3, 1.0), lambda: ShuffleNetV1(8, 0.5)],
                         ids=["hardnet39ds", "shufflenet_v1_g3", "shufflenet_v1_g8_x0_5"])  # fmt: skip
@pytest.mark.parametrize("importance", ["l2", "bn_scale"])
def test_pruning_is_exact_across_concatenations_and_the_shuffle(make, importance):
    model = _distinct_scales(make())
    cfg = PruneConfig(enabled=True, ratio=0.3, by="channels", scope="uniform", importance=importance)
    pruned, rec = prune(model, cfg, SIZE)
    assert rec["after"]["macs"] < 0.8 * rec["before"]["macs"]
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        got, ref = pruned(x), _silenced(model, pruned)(x)
    # measured: <= 3e-8 of logits ~0.2; Torch-Pruning alone (the shuffle seen as identity) is off by 30-50%
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))


def test_shufflenet_v1_trunk_is_protected():
    model = ShuffleNetV1(3, 1.0)
    protected = set(protected_layers(model, PruneConfig(protect_stem=False)))
    assert {"stem.0", "features.0.gconv2.0", "features.15.gconv2.0"} <= protected
    assert not any(name.endswith(("gconv1.0", "dwconv.0")) for name in protected)


@pytest.mark.parametrize("updates", [{"mode": "latency"}, {"importance": "taylor"}])
def test_shufflenet_v1_refuses_what_cannot_follow_the_shuffle(updates):
    with pytest.raises(DeployError, match="ShuffleNet v1 prunes with prune.mode ratio"):
        prune(ShuffleNetV1(3, 1.0).eval(), PruneConfig(enabled=True, **updates), SIZE)
