import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torchvision.ops import SqueezeExcitation

from deploy.runtimes.tensorrt import qdq_check
from deploy.recipe import ExportConfig, QuantizeConfig
from deploy.stages.int8 import qdq_placement
from deploy.stages.export_onnx import export
from deploy.stages.int8.quantize import quantize


def _session(model: onnx.ModelProto, optimized: bool, dump=None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if dump:
        opts.optimized_model_filepath = str(dump)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _run(model: onnx.ModelProto, x: np.ndarray, optimized: bool = False) -> np.ndarray:
    return _session(model, optimized).run(None, {model.graph.input[0].name: x})[0]


def _optimized_ops(model: onnx.ModelProto, tmp_path) -> list[str]:
    """The op types ORT's CPU provider runs after its graph optimizations."""
    _session(model, True, tmp_path / "optimized.onnx")
    return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


def _qdq_graph(middle: list, inputs: dict, out_scale: float, out_zp: int, shape: list[int]) -> onnx.ModelProto:
    """x -> Q(u8) -> DQ -> `middle` (reads "x_dq", writes "y") -> Q(out_scale, out_zp) -> DQ -> output."""
    consts = {"sx": np.array(0.05, np.float32), "zx": np.array(100, np.uint8),
              "sy": np.array(out_scale, np.float32), "zy": np.array(out_zp, np.uint8), **inputs}  # fmt: skip
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["x_q"], name="q_x"),
             helper.make_node("DequantizeLinear", ["x_q", "sx", "zx"], ["x_dq"], name="dq_x"), *middle,
             helper.make_node("QuantizeLinear", ["y", "sy", "zy"], ["y_q"], name="q_y"),
             helper.make_node("DequantizeLinear", ["y_q", "sy", "zy"], ["out"], name="dq_y")]  # fmt: skip
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape[:1] + [None] * (len(shape) - 1))],
        [numpy_helper.from_array(v, k) for k, v in consts.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_hardswish_rewrite_keeps_the_qdq_result_and_runs_as_int8_add_mul(tmp_path):
    # every uint8 code of x (scale 0.05, zero-point 100: x in [-5, 7.75]); h-swish output on [-0.375, 7.75]
    model = _qdq_graph([helper.make_node("HardSwish", ["x_dq"], ["y"], name="hs")], {}, 8.125 / 255, 12, [1, 256])
    x = ((np.arange(256, dtype=np.float32) - 100) * 0.05)[None]
    before = _run(model, x)
    assert qdq_placement.hardswish_to_add_mul(model) == 1
    onnx.checker.check_model(model, full_check=True)
    assert "HardSwish" not in {n.op_type for n in model.graph.node}
    step = 8.125 / 255
    assert np.abs(_run(model, x) - before).max() <= step + 1e-6  # one rounding of the gate, at most one step
    assert np.abs(_run(model, x, optimized=True) - before).max() <= step + 1e-6
    ops = _optimized_ops(model, tmp_path)
    assert {"QLinearAdd", "QLinearMul"} <= set(ops) and not {"HardSwish", "HardSigmoid", "Mul", "Add"} & set(ops)


def _se_gate(bias_scale_factor: float = 1.0) -> onnx.ModelProto:
    """x -> QDQ 1x1 Conv (int8 per-channel weights, int32 bias) -> Q -> DQ -> HardSigmoid -> Q -> DQ."""
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (4, 4, 1, 1)).astype(np.int8)
    sw = np.full(4, 0.01, np.float32)
    bias_scale = (0.05 * sw * bias_scale_factor).astype(np.float32)
    consts = {"w": w, "sw": sw, "zw": np.zeros(4, np.int8), "b": rng.integers(-500, 500, 4).astype(np.int32),
              "sb": bias_scale, "zb": np.zeros(4, np.int32), "sz": np.array(0.08, np.float32),
              "zz": np.array(128, np.uint8)}  # fmt: skip
    middle = [
        helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["w_dq"], axis=0),
        helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["b_dq"], axis=0),
        helper.make_node("Conv", ["x_dq", "w_dq", "b_dq"], ["z"], name="fc2"),
        helper.make_node("QuantizeLinear", ["z", "sz", "zz"], ["z_q"]),
        helper.make_node("DequantizeLinear", ["z_q", "sz", "zz"], ["z_dq"]),
        helper.make_node("HardSigmoid", ["z_dq"], ["y"], name="gate", alpha=1 / 6, beta=0.5),
    ]
    return _qdq_graph(middle, consts, 0.9 / 255, 0, [None, 4, 1, 1])  # gate calibrated on [0, 0.9]


def test_se_gate_folds_into_the_conv_and_keeps_the_qdq_result(tmp_path):
    model = _se_gate()
    x = np.random.default_rng(1).uniform(-5, 7.7, (512, 4, 1, 1)).astype(np.float32)
    before = _run(model, x)
    assert qdq_placement.fold_hardsigmoid_into_conv(model) == 1
    onnx.checker.check_model(model, full_check=True)
    assert "HardSigmoid" not in {n.op_type for n in model.graph.node}
    # the original rounds the Conv output to its own grid (0.08) before the gate; the fold skips that rounding
    tolerance = 0.08 / 6 / 2 + 0.9 / 255
    assert np.abs(_run(model, x) - before).max() <= tolerance
    assert np.abs(_run(model, x, optimized=True) - before).max() <= tolerance
    assert before.max() == pytest.approx(0.9) and before.min() == 0  # the test reaches both clips
    assert _optimized_ops(model, tmp_path).count("QLinearConv") == 1
    assert "HardSigmoid" not in _optimized_ops(model, tmp_path)


def test_se_gate_is_left_alone_when_int32_cannot_hold_the_shift():
    model = _se_gate(bias_scale_factor=1e-9)
    assert qdq_placement.fold_hardsigmoid_into_conv(model) == 0
    assert "HardSigmoid" in {n.op_type for n in model.graph.node}


class Tiny(nn.Module):
    """A MobileNetV3-like network: h-swish stem, depthwise block with squeeze-excite, inverted residual."""

    def __init__(self, stem_residual=False):
        super().__init__()
        self.stem_residual = stem_residual
        dw_stride = 1 if stem_residual else 2
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.Hardswish())
        se = SqueezeExcitation(16, 8, scale_activation=nn.Hardsigmoid)
        self.block1 = nn.Sequential(nn.Conv2d(16, 16, 3, dw_stride, 1, groups=16), nn.ReLU(), se, nn.Conv2d(16, 16, 1))
        self.block2 = nn.Sequential(nn.Conv2d(16, 32, 1), nn.Hardswish(), nn.Conv2d(32, 32, 3, 1, 1, groups=32),
                                    nn.Hardswish(), SqueezeExcitation(32, 8, scale_activation=nn.Hardsigmoid),
                                    nn.Conv2d(32, 16, 1))  # fmt: skip
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        stem = self.stem(x)
        x = self.block1(stem) + (stem if self.stem_residual else 0)
        return self.head(x + self.block2(x))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """fp32 ONNX exports of Tiny variants at 32x32, random calibration and test inputs."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    paths = {}
    for name, kwargs in {"v3": {}, "stem_residual": {"stem_residual": True}}.items():
        paths[name] = root / f"{name}.onnx"
        export(Tiny(**kwargs).eval(), paths[name], ExportConfig(), 32)
    x = np.random.default_rng(0).standard_normal((48, 3, 32, 32)).astype(np.float32)
    return paths, x[:32], x[32:]


def _quantized(tiny, tmp_path, name="v3", **cfg):
    paths, calib, _ = tiny
    out = tmp_path / f"{name}-{'-'.join(f'{k}{v}' for k, v in cfg.items())}.int8.onnx"
    info = quantize(paths[name], out, calib, QuantizeConfig(enabled=True, **cfg), tmp_path / "cache", None)
    return onnx.load(str(out)), info


def _sqnr(ref, got) -> float:
    return float(10 * np.log10((ref**2).sum() / ((ref - got) ** 2).sum()))


def test_ort_cpu_form_runs_hardswish_and_se_in_int8(tiny, tmp_path):
    paths, _, x = tiny
    model, info = _quantized(tiny, tmp_path, float_stem=False)
    assert info["placement"]["int8_hard_activations"] == {"hardswish": 3, "hardsigmoid": 2}
    ops = _optimized_ops(model, tmp_path)
    # float only at the graph's edges: the input's Q and the logits' DQ
    assert not {"HardSwish", "HardSigmoid", "Mul", "Add", "Conv"} & set(ops)
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1
    fp32 = _run(onnx.load(str(paths["v3"])), x)
    plain, _ = _quantized(tiny, tmp_path, float_stem=False, int8_hard_activations=False)
    # exact Q/DQ arithmetic: the rewrites cost at most a little signal against fp32
    assert _sqnr(fp32, _run(model, x)) > _sqnr(fp32, _run(plain, x)) - 1.0 > 15


def test_float_stem_rule_and_form(tiny, tmp_path):
    paths, _, x = tiny
    models = {name: onnx.load(str(p)) for name, p in paths.items()}
    stem = qdq_placement.stem_nodes(models["v3"])
    # the stem conv, its h-swish, the depthwise conv, its ReLU and the squeeze-excite: up to the pointwise conv
    assert [n.split("/")[-1] for n in stem][:4] == ["Conv", "HardSwish", "Conv", "Relu"] and stem[-1].endswith("Mul")
    assert qdq_placement.float_stem_pays(models["v3"], stem)  # it leaves through one tensor, the SE's Mul
    residual = qdq_placement.stem_nodes(models["stem_residual"])  # the stem also feeds the residual Add
    assert len(residual) == len(stem) and not qdq_placement.float_stem_pays(models["stem_residual"], residual)

    model, info = _quantized(tiny, tmp_path)  # float_stem None: the rule decides
    assert info["placement"]["float_stem"] == stem
    inits = {i.name for i in model.graph.initializer}
    first = next(n for n in model.graph.node if n.op_type == "Conv")
    assert first.input[0] == model.graph.input[0].name
    assert first.input[1] in inits  # float weights, no DequantizeLinear
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits)
    assert q.input[0].endswith("Mul_output_0")  # the first quantizer sits after the squeeze-excite multiply
    fp32 = _run(models["v3"], x)
    all_int8, _ = _quantized(tiny, tmp_path, float_stem=False)
    assert _sqnr(fp32, _run(model, x)) > _sqnr(fp32, _run(all_int8, x)) - 1.0 > 15


def test_float_nodes_get_their_own_copy_of_shared_constants(tmp_path):
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 4, 1, 1)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.full(4, 0.5, np.float32), "b")  # shared by both convs, as exporters dedupe it
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y1"], name="c1"),
         helper.make_node("Conv", ["y1", "w", "b"], ["y2"], name="c2")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 8, 8])],
        [helper.make_tensor_value_info("y2", TensorProto.FLOAT, [None, 4, 8, 8])], [w, b],
    )  # fmt: skip
    fp32 = tmp_path / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(fp32))
    calib = np.random.default_rng(1).standard_normal((8, 4, 8, 8)).astype(np.float32)
    cfg = QuantizeConfig(enabled=True, exclude=["c1"], float_stem=False, int8_hard_activations=False)
    quantize(fp32, tmp_path / "q.onnx", calib, cfg, tmp_path / "c", None)
    model = onnx.load(str(tmp_path / "q.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    c1, c2 = (next(n for n in model.graph.node if n.name == c) for c in ("c1", "c2"))
    assert c1.input[1] in inits and c1.input[2] in inits  # float weight and bias, not a DequantizeLinear output
    np.testing.assert_array_equal(inits[c1.input[2]], np.full(4, 0.5, np.float32))
    assert c2.input[1] not in inits and c2.input[2] not in inits  # the quantized conv reads its int8 copies


def test_tensorrt_form_has_qdq_only_on_conv_inputs(tiny, tmp_path):
    model, info = _quantized(tiny, tmp_path, target="tensorrt")
    assert qdq_check.check(model) == []  # no errors and, unlike ORT's default placement, no lost fusions
    producer = {o: n for n in model.graph.node for o in n.output}
    users = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm"):
            assert producer[n.input[0]].op_type == "DequantizeLinear", n.name
        if n.op_type == "QuantizeLinear" and n.input[0] in producer and producer[n.input[0]].op_type == "Conv":
            # a Conv output is quantized only as a residual Add's input (and then for the next Conv too),
            # never before its activation
            assert "Add" in {u.op_type for dq in users[n.output[0]] for u in users[dq.output[0]]} <= {"Add", "Conv"}
    assert {"HardSwish", "HardSigmoid"} <= {n.op_type for n in model.graph.node}  # left for TensorRT to fuse
    default, _ = _quantized(tiny, tmp_path, target="tensorrt", conv_inputs_only=False)
    assert {v.rule for v in qdq_check.check(default)} == {"fusion"}
    fp32 = _run(onnx.load(str(tiny[0]["v3"])), tiny[2])
    assert _sqnr(fp32, _run(model, tiny[2])) > 15
