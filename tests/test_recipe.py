import pytest
import yaml

from deploy import recipe
from deploy.errors import DeployError


@pytest.mark.parametrize("name", recipe.available())
def test_every_builtin_recipe_validates_and_names_its_model(name):
    r = recipe.load(name)
    assert r.model.name == name and r.version == 1


def test_the_required_models_are_registered():
    required = {"mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "shufflenet_v2_x1_0",
                "squeezenet1_1", "mnasnet1_0", "efficientnet_b0", "efficientnet_lite0"}  # fmt: skip
    assert required <= set(recipe.available())


@pytest.mark.parametrize("name", [n for n in recipe.available() if recipe.load(n).model.source == "torchvision"])
def test_torchvision_recipes_preprocess_like_their_pretrained_weights(name):
    import torchvision

    t = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    p = recipe.load(name).preprocess
    assert (p.resize, p.input_size, p.interpolation) == (t.resize_size[0], t.crop_size[0], t.interpolation.value)
    assert list(p.mean) == pytest.approx(t.mean) and list(p.std) == pytest.approx(t.std)


def test_efficientnet_lite0_uses_half_mean_and_std():
    p = recipe.load("efficientnet_lite0").preprocess
    assert p.mean == p.std == (0.5, 0.5, 0.5)


def test_unknown_key_is_a_one_line_error(tmp_path):
    data = recipe.load("mobilenet_v2").model_dump()
    data["quantize"]["calibraton"] = {}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(DeployError, match=r"unknown key 'quantize.calibraton'") as err:
        recipe.load(str(path))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "updates, message",
    [
        ({"quantize.target": "tflite"}, "quantize.target"),
        ({"export.opset": 13}, "export.opset"),
        ({"quantize.calibration.samples": 0}, "samples"),
        ({"quantize.target": "tensorrt", "quantize.reduce_range": True}, "reduce_range is for the ort-cpu target"),
        ({"quantize.target": "openvino", "verify.runtime": "tensorrt"}, "verified on OpenVINO, not verify.runtime"),
    ],
)
def test_invalid_values_are_rejected(updates, message):
    with pytest.raises(DeployError, match=message):
        recipe.override(recipe.load("mobilenet_v2"), updates)


def test_overrides_replace_nested_fields():
    r = recipe.override(recipe.load("mobilenet_v2"), {"quantize.target": "tensorrt", "verify.max_top1_drop": None})
    assert r.quantize.target == "tensorrt" and r.verify.max_top1_drop is None


def test_the_command_line_offers_every_target():
    from typing import get_args

    from deploy.cli.build import TARGETS

    assert TARGETS == list(get_args(recipe.Target))


def test_a_model_made_for_openvino_is_verified_there():
    r = recipe.override(recipe.load("mobilenet_v2"), {"quantize.target": "openvino"})
    assert r.verify.runtime == "openvino"  # from the default, ort
    assert recipe.override(r, {"verify.max_top1_drop": None}).verify.runtime == "openvino"
    assert recipe.override(recipe.load("mobilenet_v2"), {"quantize.target": "tensorrt"}).verify.runtime == "ort"


def test_unknown_model_suggests_close_names():
    with pytest.raises(DeployError, match="did you mean mobilenet_v3_small"):
        recipe.load("mobilenet_v3_smal")


@pytest.mark.parametrize("name, size, resize, interpolation", [
    ("inception_v3", 299, 342, "bilinear"), ("resnext50_32x4d", 224, 232, "bilinear"), ("googlenet", 224, 256, "bilinear"),
])  # fmt: skip
def test_torchvision_names_take_preprocessing_from_their_weights(name, size, resize, interpolation):
    r = recipe.load(f"torchvision:{name}")
    assert (r.model.name, r.model.source) == (name, "torchvision")
    p = r.preprocess
    assert (p.input_size, p.resize, p.interpolation) == (size, resize, interpolation)
    assert p.mean == pytest.approx((0.485, 0.456, 0.406)) and p.std == pytest.approx((0.229, 0.224, 0.225))


@pytest.mark.parametrize("name, message", [
    ("torchvision:googlenett", "did you mean googlenet"),
    ("torchvision:fasterrcnn_resnet50_fpn", "classification models only"),
])  # fmt: skip
def test_unknown_torchvision_classifier_is_a_one_line_error(name, message):
    with pytest.raises(DeployError, match=message):
        recipe.load(name)


def test_simplify_false_means_no_simplifier():
    assert recipe.ExportConfig(simplify=False).simplifier == "none"
    assert recipe.ExportConfig.model_validate({"simplify": True}).simplifier == "onnxslim"
    assert recipe.ExportConfig().simplifier == "onnxslim"
    with pytest.raises(DeployError, match="export: Value error, simplify"):
        recipe.override(recipe.load("mobilenet_v2"), {"export.simplify": "yes"})
    with pytest.raises(DeployError, match="export.simplifier"):
        recipe.override(recipe.load("mobilenet_v2"), {"export.simplifier": "polygraphy"})
