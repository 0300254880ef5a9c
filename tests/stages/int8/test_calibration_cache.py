"""The calibration cache key: everything the ranges depend on changes it, nothing else does."""

import numpy as np
import pytest

from deploy.recipe import QuantizeConfig
from deploy.stages.int8.quantize import cache_key


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"model bytes")
    return path


CALIB = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
BASE = QuantizeConfig(conv_inputs_only=False)  # both targets then quantize the same op types


@pytest.mark.parametrize("change", [
    {"calibration": {"method": "entropy"}},
    {"calibration": {"percentile": 99.99}},
    {"target": "tensorrt"},  # symmetric activations: other ranges from the same histograms
    {"target": "tensorrt", "conv_inputs_only": True},  # fewer tensors calibrated
])  # fmt: skip
def test_what_the_ranges_depend_on_prevents_reuse(model, change):
    cfg = QuantizeConfig.model_validate({**BASE.model_dump(), **change})
    assert cache_key(model, CALIB, cfg) != cache_key(model, CALIB, BASE)


def test_model_and_images_prevent_reuse(model, tmp_path):
    other = tmp_path / "other.onnx"
    other.write_bytes(b"model bytez")
    assert cache_key(other, CALIB, BASE) != cache_key(model, CALIB, BASE)
    assert cache_key(model, CALIB[:3], BASE) != cache_key(model, CALIB, BASE)
    assert cache_key(model, CALIB + 1e-3, BASE) != cache_key(model, CALIB, BASE)


@pytest.mark.parametrize("change", [
    {"per_channel": False}, {"bias_correction": False}, {"sensitivity_images": 0}, {"exclude": ["x*"]},
    {"calibration": {"samples": 8, "seed": 3}},  # these pick the images; the key hashes the images themselves
    {"mixed_precision": {"enabled": True}}, {"qat": {"mode": "off"}}, {"equalize": {"enabled": True}},
])  # fmt: skip
def test_settings_applied_after_calibration_keep_the_cache(model, change):
    cfg = QuantizeConfig.model_validate({**BASE.model_dump(), **change})
    assert cache_key(model, CALIB, cfg) == cache_key(model, CALIB, BASE)
