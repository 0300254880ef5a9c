"""Cross-layer equalization keeps the fp32 function and evens out per-channel weight ranges."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from deploy import models, recipe
from deploy.errors import DeployError
from deploy.runtimes.ort import OrtCpu
from deploy.stages.int8.equalize import equalize
from deploy.stages.export_onnx import export
from deploy.stages.fold_bn import fold_batchnorm

ROOT = Path(__file__).resolve().parents[3]


def _export(r: recipe.Recipe, path: Path) -> onnx.ModelProto:
    model, _ = fold_batchnorm(models.build(r.model).eval())
    return export(model, path, r.export, 64)


@pytest.fixture(scope="module")
def lite0(tmp_path_factory) -> onnx.ModelProto:
    """EfficientNet-Lite0 with its real ImageNet weights (uneven channel ranges; ReLU6 everywhere), 64x64."""
    return _export(recipe.load("efficientnet_lite0"), tmp_path_factory.mktemp("eq") / "lite0.onnx")


@pytest.fixture(scope="module")
def v3_cifar(tmp_path_factory) -> onnx.ModelProto:
    """The committed CIFAR-10 mobilenet_v3_small: ReLU, h-swish and squeeze-excite blocks."""
    r = recipe.override(recipe.load(str(ROOT / "recipes/cifar10/mobilenet_v3_small.yaml")),
                        {"model.weights": str(ROOT / "checkpoints/mobilenet_v3_small_cifar10.pth")})  # fmt: skip
    return _export(r, tmp_path_factory.mktemp("eq") / "v3.onnx")


def _max_relative_difference(a: onnx.ModelProto, b: onnx.ModelProto) -> float:
    x = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
    ya, yb = (OrtCpu(m.SerializeToString(), threads=1).infer(x) for m in (a, b))
    return float(np.abs(ya - yb).max() / np.abs(ya).max())


def _changed_weights(a: onnx.ModelProto, b: onnx.ModelProto) -> int:
    before = {i.name: numpy_helper.to_array(i) for i in a.graph.initializer}
    weights = {n.input[1] for n in b.graph.node if n.op_type == "Conv"}
    return sum(1 for i in b.graph.initializer if i.name in weights
               and not (i.name in before and np.array_equal(before[i.name], numpy_helper.to_array(i))))  # fmt: skip


@pytest.mark.parametrize("pairs", ["depthwise", "all"])
def test_relu6_pairs_equalized_exactly_with_a_per_channel_bound(lite0, pairs):
    out, rec = equalize(lite0, relu6="exact", pairs=pairs)
    assert _max_relative_difference(lite0, out) <= 1e-4
    assert rec["kinds"]["dw->pw"] == 16 and rec["per_channel_min"] >= 16
    spread = rec["range_spread"]["conv1_out"]
    assert spread["after"] < 0.7 * spread["before"]  # depthwise output channels: 7.3 -> 3.1 (largest/median)
    assert _changed_weights(lite0, out) >= rec["pairs"]
    assert sum(n.op_type == "Min" for n in out.graph.node) == rec["per_channel_min"]


def test_relu6_pairs_are_skipped_by_default_and_the_model_is_untouched(lite0):
    out, rec = equalize(lite0)
    assert rec["pairs"] == 0 and rec["skipped"] == {"dw: ReLU6 (relu6: skip)": 16}
    assert out.SerializeToString() == lite0.SerializeToString()


def test_relu_and_squeeze_excite_pairs_equalized_hswish_pairs_skipped(v3_cifar):
    out, rec = equalize(v3_cifar)
    assert rec["kinds"] == {"dw->pw": 3}  # blocks 1-3; block 1's depthwise output also feeds the SE fc1
    assert rec["skipped"] == {"dw: HardSwish after the conv": 8}
    assert _max_relative_difference(v3_cifar, out) <= 1e-4
    spread = rec["range_spread"]["conv1_out"]
    assert spread["after"] < spread["before"]
    assert not any(n.op_type == "Min" for n in out.graph.node)


def test_bad_options_are_rejected(v3_cifar):
    with pytest.raises(DeployError, match="relu6"):
        equalize(v3_cifar, relu6="relax")
