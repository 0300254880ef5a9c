"""The verify stage's decisions as tables: which thresholds a result misses, which model the build recommends."""

import pytest

from deploy.metrics import missed_thresholds
from deploy.recipe import VerifyConfig
from deploy.stages.verify import SLOWER, recommend

LAT = {"runtime": "onnxruntime-cpu"}


@pytest.mark.parametrize("target, missed, speedup, precision, reason", [
    ("ort-cpu", [], 1.30, "int8", "1.30x the speed of fp32"),
    ("ort-cpu", [], SLOWER, "int8", "0.95x"),  # at the bar: not slower
    ("ort-cpu", [], SLOWER - 0.01, "fp32", "int8 is slower than fp32"),
    ("ort-cpu", [], 0.60, "fp32", "(0.60x"),
    ("ort-cpu", ["int8 top-1 drop 2.00 points > max_top1_drop 1.0"], 2.0, "fp32", "int8 misses int8 top-1 drop"),
    ("tensorrt", [], 0.25, "int8", "made for TensorRT"),  # slow on ORT CPU by design: speed does not count
    ("tensorrt", ["accuracy 0.5 < min 0.9"], 0.25, "fp32", "int8 misses accuracy 0.5"),
    ("openvino", [], 1.40, "int8", "1.40x the speed of fp32 at batch 1 on openvino-cpu"),  # its fastest int8 row's
    ("openvino", [], 0.75, "fp32", "int8 is slower than fp32 on openvino-cpu"),
])  # fmt: skip
def test_recommendation(target, missed, speedup, precision, reason):
    fastest = {"int8_runtime": "openvino-cpu"} if target == "openvino" else {}
    got = recommend(target, missed, {**LAT, **fastest, "int8_speedup_interleaved": speedup})
    assert got["precision"] == precision and got["model"] == f"model.{precision}.onnx"
    assert reason in got["reason"]


@pytest.mark.parametrize("thresholds, figures, missed", [
    ({"max_top1_drop": 1.0}, {"top1_drop": 1.5, "agreement": 99.0, "sqnr_db": 30.0}, ["max_top1_drop 1.0"]),
    ({"max_top1_drop": 1.0}, {"top1_drop": 1.0, "agreement": 99.0, "sqnr_db": 30.0}, []),
    ({"max_top1_drop": 1.0}, {"agreement": 50.0, "sqnr_db": 3.0}, []),  # no labels: the drop is not checked
    ({"max_top1_drop": None, "min_agreement": 98.0}, {"agreement": 97.9, "sqnr_db": 30.0}, ["min_agreement 98.0%"]),
    ({"max_top1_drop": None, "min_agreement": 98.0}, {"agreement": 98.0, "sqnr_db": 30.0}, []),
    ({"max_top1_drop": None, "min_sqnr_db": 20.0}, {"agreement": 99.0, "sqnr_db": 19.9}, ["min_sqnr_db 20.0 dB"]),
    ({"max_top1_drop": 0.1, "min_agreement": 99.5, "min_sqnr_db": 40.0},
     {"top1_drop": 0.5, "agreement": 99.0, "sqnr_db": 30.0}, ["max_top1_drop", "min_agreement", "min_sqnr_db"]),
])  # fmt: skip
def test_missed_thresholds(thresholds, figures, missed):
    got = missed_thresholds(VerifyConfig(**thresholds), figures)
    assert len(got) == len(missed) and all(m in line for m, line in zip(missed, got))
