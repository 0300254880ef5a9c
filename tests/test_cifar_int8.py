"""Real data: the committed CIFAR-10 checkpoints through `deploy build --int8` for both targets, evaluated on the
whole CIFAR-10 test set (10,000 images): int8 within 0.5 top-1 point of fp32 with post-training quantization
alone (ORT's kernels for ort-cpu, which are exact on VNNI/AMX CPUs; exact Q/DQ arithmetic for tensorrt)."""

from pathlib import Path

import pytest

from deploy import recipe as recipes
from deploy.pipeline import BuildOptions, build
from deploy.runtimes.ort import exact_int8_kernels

ROOT = Path(__file__).resolve().parents[1]
# model -> fp32 top-1 floor on the test set (the checkpoint's measured accuracy, rounded down; checkpoints/README.md)
MODELS = {"mobilenet_v3_small": 80.0, "mobilenet_v2": 81.0, "shufflenet_v2_x1_0": 78.0}

pytestmark = pytest.mark.data


@pytest.mark.parametrize("target", ["ort-cpu", "tensorrt"])
@pytest.mark.parametrize("name", list(MODELS))
def test_cifar10_int8_keeps_top1(cifar10, tmp_path, name, target):
    checkpoint = ROOT / "checkpoints" / f"{name}_cifar10.pth"
    if not checkpoint.is_file():
        pytest.skip(f"checkpoints/{checkpoint.name} not present")
    r = recipes.load(str(ROOT / "recipes" / "cifar10" / f"{name}.yaml"))
    r = recipes.override(r, {"model.weights": str(checkpoint), "quantize.enabled": True, "quantize.target": target,
                             "verify.max_top1_drop": 0.5, "verify.latency.runs": 20,
                             "quantize.sensitivity_images": 0})  # fmt: skip
    report = build(r, BuildOptions(calib=cifar10 / "train", val=cifar10 / "test", out=tmp_path / "b"))
    acc = report["accuracy"]
    exact = acc.get("reference", acc)  # ort-cpu on a CPU without VNNI: see the README
    print(f"\n{name} {target}: fp32 {acc['fp32']['top1']:.2f}%, int8 {acc['int8']['top1']:.2f}%, exact drop "
          f"{exact['top1_drop']:.2f}, agreement {exact['agreement']:.2f}%, kernels exact: {exact_int8_kernels()}")
    assert acc["fp32"]["n"] == 10000 and acc["fp32"]["top1"] >= MODELS[name]
    assert exact["top1_drop"] <= 0.5
    assert report["passed"] == (acc["top1_drop"] <= 0.5)
