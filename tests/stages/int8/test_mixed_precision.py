"""Mixed precision: the fallback keeps the badly quantizing layer in float, and fails clearly when it cannot."""

import numpy as np
import pytest
from helpers import BAD, bad_layer_onnx, images

from deploy.errors import DeployError
from deploy.evalset import EvalSet
from deploy.stages.int8.mixed_precision import MixedPrecisionFailed, fallback
from deploy.recipe import MixedPrecisionConfig, QuantizeConfig, VerifyConfig
from deploy.runtimes.ort import OrtCpu
from deploy.stages.int8.sensitivity import evaluate
from deploy import metrics
from deploy.stages.int8 import quantize


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    fp32 = bad_layer_onnx(root / "fp32.onnx")
    calib, x = images(32, 0), images(48, 1)
    labels = OrtCpu(fp32).infer(x).argmax(1)  # fp32 is right on every image: top-1 drop = what int8 loses
    return root, fp32, calib, x, labels


def _cfg(target: str, max_float_layers: int) -> QuantizeConfig:
    mp = MixedPrecisionConfig(enabled=True, max_float_layers=max_float_layers, images=16)
    return QuantizeConfig(enabled=True, target=target, float_stem=False, mixed_precision=mp)


@pytest.mark.parametrize("target", ["ort-cpu", "tensorrt"])
def test_fallback_keeps_the_bad_layer_in_float_and_meets_the_target(setup, target):
    root, fp32, calib, x, labels = setup
    cfg, cache = _cfg(target, 3), root / f"cache-{target}"
    ptq = root / f"ptq-{target}.onnx"
    quantize.quantize(fp32, ptq, calib, cfg, cache, None)
    thresholds = VerifyConfig(max_top1_drop=5.0)
    ref = OrtCpu(fp32).infer(x)
    assert metrics.missed_thresholds(thresholds, evaluate(ptq, x, ref, labels))  # plain PTQ misses

    out = root / f"mixed-{target}.onnx"
    record = fallback(fp32, calib, EvalSet.arrays(x, labels), cfg, thresholds, out, cache)
    assert record["met"] and record["float_layers"] == [BAD]
    assert record["ranking"]["layers"][0]["node"] == BAD and record["ranking"]["images"] == 16
    assert record["int8"]["missed"] and not record["steps"][0]["missed"] and record["steps"][0]["added"] == BAD
    assert record["latency"]["p50_ms"] > 0 and record["steps"][0]["ms"] > 0
    got = evaluate(out, x, ref, labels)
    assert got["top1_drop"] <= 5.0 and got == {k: record["steps"][0][k] for k in got}


def test_fallback_fails_clearly_when_max_float_layers_cannot_meet_the_target(setup):
    root, fp32, calib, x, labels = setup
    cfg, cache = _cfg("tensorrt", 1), root / "cache-fail"
    quantize.quantize(fp32, root / "ptq-fail.onnx", calib, cfg, cache, None)
    with pytest.raises(MixedPrecisionFailed, match=r"1 layers in float \(quantize.mixed_precision.max_float_layers 1\), "
                                                  r"still int8 logit SQNR .* dB < min_sqnr_db 80") as err:  # fmt: skip
        fallback(fp32, calib, EvalSet.arrays(x), cfg, VerifyConfig(max_top1_drop=None, min_sqnr_db=80), root / "m.onnx", cache)
    assert [s["added"] for s in err.value.record["steps"]] == [BAD] and not err.value.record["met"]
    assert not (root / "m.onnx").exists()


def test_fallback_needs_a_threshold_that_applies(setup):
    root, fp32, calib, x, _ = setup
    with pytest.raises(DeployError, match="needs a threshold"):  # max_top1_drop without labels does not apply
        fallback(fp32, calib, EvalSet.arrays(x), _cfg("tensorrt", 2), VerifyConfig(max_top1_drop=1.0), root / "m.onnx", root)


def test_already_good_int8_keeps_everything_in_int8(setup):
    root, fp32, calib, x, labels = setup
    cfg, cache = _cfg("tensorrt", 2), root / "cache-ok"
    quantize.quantize(fp32, root / "ptq-ok.onnx", calib, cfg, cache, None)
    record = fallback(fp32, calib, EvalSet.arrays(x, labels), cfg, VerifyConfig(max_top1_drop=100.0), root / "ok.onnx", cache)
    assert record["met"] and record["float_layers"] == [] and (root / "ok.onnx").is_file()
    assert np.isfinite(record["int8"]["top1_drop"])
