"""Zero-padding depthwise channels keeps the fp32 function and pads only regions it can close."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploy import models, recipe
from deploy.runtimes.ort import OrtCpu
from deploy.stages.export_onnx import export
from deploy.stages.fold_bn import fold_batchnorm
from deploy.stages.int8.pad_channels import pad_depthwise

ROOT = Path(__file__).resolve().parents[3]


def _export(name: str, path: Path) -> onnx.ModelProto:
    r = recipe.load(name)
    torch_model, _ = fold_batchnorm(models.architecture(r.model).eval())
    return export(torch_model, path, r.export, 64)


def _depthwise_channels(model: onnx.ModelProto) -> dict[str, int]:
    inits = {i.name: i for i in model.graph.initializer}
    return {n.name: inits[n.input[1]].dims[0] for n in model.graph.node if n.op_type == "Conv"
            and next((a.i for a in n.attribute if a.name == "group"), 1) > 1}  # fmt: skip


def _logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return OrtCpu(model.SerializeToString(), threads=1).infer(x)


@pytest.mark.parametrize(
    "name, padded",
    [
        # 72, 88 and 120 channels (one block with squeeze-excite) -> 80, 96, 128
        ("mobilenet_v3_small", {80, 96, 128}),
        # 58/116/232-channel branches fed by a conv; the stride-2 branches read the block input (a Concat/Split
        # of the shuffle), a region left alone
        ("shufflenet_v2_x1_0", {64, 128, 240}),
    ],
)
def test_padding_keeps_the_function(tmp_path, name, padded):
    before = _export(name, tmp_path / "m.onnx")
    after = onnx.load(str(tmp_path / "m.onnx"))
    done = pad_depthwise(after)
    onnx.checker.check_model(after, full_check=True)
    assert set(done.values()) == padded
    channels = _depthwise_channels(after)
    assert all(channels[n] == c for n, c in done.items())
    untouched = {n: c for n, c in _depthwise_channels(before).items() if n not in done}
    assert all(channels[n] == c for n, c in untouched.items())
    x = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
    ya, yb = _logits(before, x), _logits(after, x)
    assert np.abs(ya - yb).max() <= 1e-5 * np.abs(ya).max()


def _dw_on_input(channels: int) -> onnx.ModelProto:
    """input -> depthwise conv -> Relu -> 1x1 conv: the region starts at the graph input, which cannot grow."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((channels, 1, 3, 3)).astype(np.float32), "w")
    pw = numpy_helper.from_array(rng.standard_normal((8, channels, 1, 1)).astype(np.float32), "pw")
    nodes = [helper.make_node("Conv", ["x", "w"], ["d"], name="dw", group=channels, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["d"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "pw"], ["y"], name="pw")]  # fmt: skip
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, pw])  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_region_reaching_the_graph_input_is_left_alone():
    model = _dw_on_input(24)
    assert pad_depthwise(model) == {}
    assert _depthwise_channels(model) == {"dw": 24}
