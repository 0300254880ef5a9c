"""HarDNet and ShuffleNet v1 (deploy/hardnet.py, deploy/shufflenet_v1.py): the papers' structure and complexity."""

import pytest
import torch

from deploy import macs, models, recipe
from deploy.hardnet import HarDBlock, HarDNet, links, widths
from deploy.shufflenet_v1 import ShuffleNetV1, stage_widths

# (params, MACs) at 224 px as published. HarDNet: the paper's Table 3 / the authors' README (rounded to 0.1M params
# and 2 digits of GMACs). ShuffleNet v1: the paper's Table 2 gives 140 (1x) and 38 (0.5x) MFLOPs (= MACs) for every g,
# with channels rounded per g; Megvii's reference code (ShuffleNet-Series) publishes the exact widths' figures, used here.
PAPER = {
    ("hardnet68", None): (17.6e6, 4.3e9),
    ("hardnet39ds", None): (3.5e6, 0.44e9),
    (3, 1.0): (1.9e6, 138e6),
    (8, 1.0): (2.4e6, 138e6),
    (3, 0.5): (0.7e6, 38e6),
    (8, 0.5): (1.0e6, 40e6),
}


@pytest.mark.parametrize("key", PAPER, ids=lambda k: str(k))
def test_params_and_macs_match_the_published_figures(key):
    """Params within the published rounding (0.05M); MACs within 3% (measured: HarDNet-68 -1.3%, HarDNet-39DS -2.4%,
    ShuffleNet v1 within 1.3%; the HarDNet paper does not say what its count includes beyond the convolutions)."""
    arch, width = key
    model = HarDNet(arch) if width is None else ShuffleNetV1(arch, width)
    got = macs.count(model, 224)
    params, mac = PAPER[key]
    assert got["params"] == pytest.approx(params, abs=0.05e6)
    assert got["macs"] == pytest.approx(mac, rel=0.03)


def test_harmonic_links_and_widths_follow_the_k_m_rule():
    assert [links(n) for n in (1, 2, 3, 4, 6, 8)] == [[0], [1, 0], [2], [3, 2, 0], [5, 4], [7, 6, 4, 0]]
    # HarDNet-68's first block: k = 14, m = 1.7; layer n has k·m^(len(links) - 1) channels, rounded to even
    assert widths(64, 14, 1.7, 8) == [64, 14, 24, 14, 40, 14, 24, 14, 68]
    block = HarDBlock(64, 14, 1.7, 8)
    assert block.layers[7].conv.in_channels == 14 + 24 + 40 + 64  # layer 8 reads layers 7, 6, 4 and the input
    out = block(torch.randn(1, 64, 8, 8))
    assert out.shape[1] == block.out_channels == 4 * 14 + 68  # the odd layers and the last one


def test_hardnet_uses_the_authors_module_names():
    """Their torch hub files (hardnet.WEIGHTS) are plain state_dicts of these names."""
    assert {"base.3.layers.7.conv.weight", "base.16.3.weight"} <= HarDNet("hardnet68").state_dict().keys()
    ds = HarDNet("hardnet39ds").state_dict()
    assert {"base.2.dwconv.weight", "base.3.layers.0.layer1.conv.weight", "base.3.layers.0.layer2.dwconv.weight"} <= ds.keys()


def test_shufflenet_v1_widths_and_torchvisions_shuffle(monkeypatch):
    assert stage_widths(3, 1.0) == (24, [240, 480, 960]) and stage_widths(8, 1.0) == (24, [384, 768, 1536])
    assert stage_widths(3, 0.5) == (12, [120, 240, 480]) and stage_widths(8, 0.5) == (16, [192, 384, 768])
    model = ShuffleNetV1(3, 1.0).eval()
    assert model.features[0].gconv1[0].groups == 1 and model.features[1].gconv1[0].groups == 3  # stage 2's first
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        from torchvision.models import shufflenetv2

        monkeypatch.setattr(shufflenetv2, "channel_shuffle", lambda t, groups: t)
        assert not torch.allclose(model(x), ref)  # the units shuffle through torchvision's channel_shuffle


@pytest.mark.parametrize("spec, message", [
    ({"name": "shufflenet_v1_g5", "width": 1.0}, "no architecture 'shufflenet_v1_g5'"),
    ({"name": "hardnet68", "width": 0.5}, "hardnet68 has no width multiplier"),
])  # fmt: skip
def test_bad_architectures_are_one_line_errors(spec, message):
    from deploy.errors import DeployError

    with pytest.raises(DeployError, match=message):
        models.architecture(recipe.ModelSpec(source="deploy", **spec))
