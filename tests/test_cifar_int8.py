"""Real data: the committed CIFAR-10 checkpoints through `deploy build --int8` for every target, evaluated on the
whole CIFAR-10 test set (10,000 images): int8 within 0.3 top-1 point of fp32 (MISSES: 0.5), on ORT's kernels for
ort-cpu (exact on VNNI/AMX CPUs), exact Q/DQ arithmetic for tensorrt and openvino (three models, OPENVINO), and for
openvino on OpenVINO too (skipped where it is not installed). The build gets training images, so QAT runs
when post-training quantization misses: it must not for the models that quantize well, and must for
EfficientNet-B0 (its SiLU activations are heavy-tailed: per-tensor int8 with its recipe's entropy calibration
loses 2.2 points on ort-cpu, 1.6 on tensorrt)."""

from pathlib import Path

import pytest

from deploy import recipe as recipes
from deploy import build
from deploy.runtimes.ort import exact_int8_kernels

ROOT = Path(__file__).resolve().parents[1]
# model -> fp32 top-1 floor on the test set (the checkpoint's measured accuracy, rounded down; checkpoints/README.md)
MODELS = {"mobilenet_v3_small": 80.0, "mobilenet_v2": 81.0, "shufflenet_v2_x1_0": 78.0, "efficientnet_b0": 64.0,
          "hardnet39ds": 67.0, "shufflenet_v1": 64.0}
NEEDS_QAT = {"efficientnet_b0"}  # 2 epochs of 10,000 images: ~11 min a target on 2 cores, so marked slow
# The target is 0.3; the build's threshold stays 0.5 (what sends a model to QAT). Misses, measured: ShuffleNet
# v1's openvino form on OpenVINO (0.31; 0.22 with exact arithmetic: its stage-4 depthwise outputs are heavy-tailed
# across images, see docs/int8.md)
DROP, MISSES = 0.3, {("shufflenet_v1", "openvino"): 0.5}
# The openvino form on three families (h-swish and squeeze-excite, channel shuffle, grouped 1x1 convs): each takes
# ~35 s here, verified on OpenVINO too; all five post-training checkpoints measured in docs/int8.md
OPENVINO = {"mobilenet_v3_small", "shufflenet_v2_x1_0", "shufflenet_v1"}
CASES = [pytest.param(n, t, marks=[pytest.mark.slow] if n in NEEDS_QAT else [])
         for n in MODELS for t in ("ort-cpu", "tensorrt", "openvino") if t != "openvino" or n in OPENVINO]  # fmt: skip
pytestmark = pytest.mark.data


@pytest.mark.parametrize("name, target", CASES)
def test_cifar10_int8_keeps_top1(cifar10, tmp_path, name, target):
    if target == "openvino":
        pytest.importorskip("openvino")
    r = recipes.load(str(ROOT / "recipes" / "cifar10" / f"{name}.yaml"))
    checkpoint = ROOT / "checkpoints" / f"{r.model.name}_cifar10.pth"
    if not checkpoint.is_file():
        pytest.skip(f"checkpoints/{checkpoint.name} not present")
    r = recipes.override(r, {"model.weights": str(checkpoint), "quantize.enabled": True, "quantize.target": target,
                             "verify.max_top1_drop": 0.5, "verify.latency.runs": 20,
                             "quantize.sensitivity_images": 0})  # fmt: skip
    report = build(r, calib=cifar10 / "train", val=cifar10 / "test", train=cifar10 / "train", out=tmp_path / "b").report
    acc = report["accuracy"]
    exact = acc.get("reference", acc)  # ort-cpu on a CPU without VNNI: see the README
    qat = report.get("qat")
    print(f"\n{name} {target}: fp32 {acc['fp32']['top1']:.2f}%, int8 {acc['int8']['top1']:.2f}%, exact drop "
          f"{exact['top1_drop']:.2f}, agreement {exact['agreement']:.2f}%, kernels exact: {exact_int8_kernels()}"
          + (f", post-training int8 {qat['ptq']}" if qat else ""))
    assert acc["fp32"]["n"] == 10000 and acc["fp32"]["top1"] >= MODELS[name]
    assert exact["top1_drop"] <= MISSES.get((name, target), DROP)
    if target == "openvino":  # and on OpenVINO itself (its float layers in bf16 on CPUs that have it)
        on = report["runtime"]["accuracy"]
        print(f"on {report['runtime']['runtime']}: drop {on['top1_drop']:.2f}, agreement {on['agreement']:.2f}%")
        assert on["top1_drop"] <= MISSES.get((name, target), DROP)
    assert report["passed"] == (acc["top1_drop"] <= 0.5)
    if exact_int8_kernels() or target != "ort-cpu":  # QAT is judged on the figures of ORT's kernels
        assert (qat is not None and "kept" not in qat) == (name in NEEDS_QAT)


def test_shufflenet_v1_with_more_calibration_images_stays_close(cifar10, tmp_path):
    """1,024 calibration images instead of the recipe's 256: a few of them have stage-4 activations int8 clips hard,
    and bias correction's plain mean over its 64 images let one such image set every image's correction (agreement
    69.7% on half of the test images; bias_correction.TRIM)."""
    r = recipes.load(str(ROOT / "recipes" / "cifar10" / "shufflenet_v1.yaml"))
    checkpoint = ROOT / "checkpoints" / f"{r.model.name}_cifar10.pth"
    if not checkpoint.is_file():
        pytest.skip(f"checkpoints/{checkpoint.name} not present")
    r = recipes.override(r, {"model.weights": str(checkpoint), "quantize.enabled": True, "quantize.target": "tensorrt",
                             "quantize.calibration.samples": 1024, "verify.max_top1_drop": 0.5,
                             "verify.latency.runs": 20, "quantize.sensitivity_images": 0})  # fmt: skip
    acc = build(r, calib=cifar10 / "train", val=cifar10 / "test", out=tmp_path / "b").report["accuracy"]
    print(f"\nshufflenet_v1 tensorrt, 1024 calibration images: drop {acc['top1_drop']:.2f}, agreement "
          f"{acc['agreement']:.2f}%")
    assert acc["agreement"] >= 94.0 and acc["top1_drop"] <= 0.5
