"""Real data: the committed CIFAR-10 mobilenet_v3_small through `deploy build --int8` for both targets, evaluated on
the whole CIFAR-10 test set (10,000 images): int8 within 0.5 top-1 point of fp32 with post-training quantization
alone (ORT's kernels for ort-cpu, which are exact on VNNI/AMX CPUs; exact Q/DQ arithmetic for tensorrt)."""

from pathlib import Path

import pytest

from deploy import recipe as recipes
from deploy.pipeline import BuildOptions, build
from deploy.runtimes.ort import exact_int8_kernels

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "mobilenet_v3_small_cifar10.pth"

pytestmark = [
    pytest.mark.data,
    pytest.mark.skipif(not CHECKPOINT.is_file(), reason="checkpoints/mobilenet_v3_small_cifar10.pth not present"),
]


@pytest.mark.parametrize("target", ["ort-cpu", "tensorrt"])
def test_cifar10_mobilenet_v3_small_int8_keeps_top1(cifar10, tmp_path, target):
    r = recipes.load(str(ROOT / "recipes" / "cifar10" / "mobilenet_v3_small.yaml"))
    r = recipes.override(r, {"model.weights": str(CHECKPOINT), "quantize.enabled": True, "quantize.target": target,
                             "verify.max_top1_drop": 0.5, "verify.latency.runs": 50})  # fmt: skip
    report = build(r, BuildOptions(calib=cifar10 / "train", val=cifar10 / "test", out=tmp_path / "b"))
    acc = report["accuracy"]
    exact = acc["reference"] if "reference" in acc else acc  # ort-cpu on a CPU without VNNI: see the README
    print(f"\n{target}: fp32 {acc['fp32']['top1']:.2f}%, int8 {acc['int8']['top1']:.2f}%, exact drop "
          f"{exact['top1_drop']:.2f}, agreement {exact['agreement']:.2f}%, kernels exact: {exact_int8_kernels()}")
    assert acc["fp32"]["n"] == 10000 and acc["fp32"]["top1"] >= 80.0
    assert exact["top1_drop"] <= 0.5
    assert report["passed"] == (acc["top1_drop"] <= 0.5)
