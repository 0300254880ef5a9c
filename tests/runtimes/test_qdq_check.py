"""TensorRT's Q/DQ rules on a hand-built graph (good, then broken one rule at a time) and on real quantized models."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from deploy.runtimes.tensorrt import qdq_check
from deploy import recipe as recipes
from deploy.cli import main


def _graph(*, act_zp=np.int8(0), no_zp=False, w1_scale=None, w1_axis=0, act_scale=None, opset=17,
           fusion_break=False, residual_from="DQ_in", extra_nodes=(), int32_bias=False):  # fmt: skip
    """x -> Q/DQ -> Conv1 -> Relu -> Q/DQ -> Conv2 -> Q/DQ -> Add(residual) -> y, 4 channels, 8x8; Conv1 has a float
    bias, or with `int32_bias` one quantized as onnxruntime's QuantizeBias does (int32 behind a DequantizeLinear)."""
    rng = np.random.default_rng(0)
    c = 4
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "s_act"),
        numpy_helper.from_array(np.array(0.05, np.float32) if act_scale is None else act_scale, "s_in"),
        numpy_helper.from_array(np.array(act_zp), "zp_act"),
        numpy_helper.from_array(np.array(0, np.int8), "zp0"),
        numpy_helper.from_array(rng.integers(-127, 128, (c, c, 3, 3)).astype(np.int8), "w1_q"),
        numpy_helper.from_array(rng.integers(-127, 128, (c, c, 3, 3)).astype(np.int8), "w2_q"),
        numpy_helper.from_array(np.full(c, 0.01, np.float32) if w1_scale is None else w1_scale, "s_w1"),
        numpy_helper.from_array(np.full(c, 0.01, np.float32), "s_w2"),
        numpy_helper.from_array(np.zeros(c, np.int8), "zp_w"),
        numpy_helper.from_array(np.full(c, 0.1, np.float32), "b1"),
        numpy_helper.from_array(np.full(c, 200, np.int32), "b1_q"),
        numpy_helper.from_array(np.full(c, 0.05 * 0.01, np.float32), "s_b1"),
    ]
    zp = [] if no_zp else ["zp_act"]
    conv1_out = "c1"
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s_in", *zp], ["x_q"], name="Q_in"),
        helper.make_node("DequantizeLinear", ["x_q", "s_in", *zp], ["x_dq"], name="DQ_in"),
        helper.make_node("DequantizeLinear", ["w1_q", "s_w1", "zp_w"], ["w1"], name="DQ_w1", axis=w1_axis),
        helper.make_node("DequantizeLinear", ["w2_q", "s_w2", "zp_w"], ["w2"], name="DQ_w2", axis=0),
        helper.make_node("Conv", ["x_dq", "w1", "b1_dq" if int32_bias else "b1"], [conv1_out], name="Conv1",
                         pads=[1, 1, 1, 1]),
    ]
    if int32_bias:
        nodes.insert(0, helper.make_node("DequantizeLinear", ["b1_q", "s_b1"], ["b1_dq"], name="DQ_b1", axis=0))
    if fusion_break:
        nodes += [helper.make_node("QuantizeLinear", ["c1", "s_act", "zp0"], ["c1_q"], name="Q_c1"),
                  helper.make_node("DequantizeLinear", ["c1_q", "s_act", "zp0"], ["c1_dq"], name="DQ_c1")]  # fmt: skip
        conv1_out = "c1_dq"
    nodes += [
        helper.make_node("Relu", [conv1_out], ["r1"], name="Relu1"),
        helper.make_node("QuantizeLinear", ["r1", "s_act", "zp0"], ["r1_q"], name="Q_r1"),
        helper.make_node("DequantizeLinear", ["r1_q", "s_act", "zp0"], ["r1_dq"], name="DQ_r1"),
        helper.make_node("Conv", ["r1_dq", "w2"], ["c2"], name="Conv2", pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["c2", "s_act", "zp0"], ["c2_q"], name="Q_c2"),
        helper.make_node("DequantizeLinear", ["c2_q", "s_act", "zp0"], ["c2_dq"], name="DQ_c2"),
        helper.make_node("Add", ["c2_dq", {"DQ_in": "x_dq", "Relu1": "r1"}[residual_from]], ["y"], name="ResidualAdd"),
        *extra_nodes,
    ]
    shape = [1, c, 8, 8]
    used = {i for n in nodes for i in n.input}
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
                          [i for i in inits if i.name in used])  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _rules(model) -> set[tuple[str, str]]:
    return {(v.rule, v.node) for v in qdq_check.check(model)}


def test_good_graph_passes_and_is_a_valid_model():
    model = _graph()
    onnx.checker.check_model(model, full_check=True)
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": np.ones((1, 4, 8, 8), np.float32)})[0].shape == (1, 4, 8, 8)
    assert qdq_check.check(model) == []
    assert qdq_check.summary(model, [])["passed"]


@pytest.mark.parametrize(
    "broken, expected",
    [
        ({"act_zp": np.uint8(128)}, {("int8", "Q_in"), ("zero-point", "Q_in"), ("int8", "DQ_in"), ("zero-point", "DQ_in")}),
        ({"act_zp": np.int8(3)}, {("zero-point", "Q_in"), ("zero-point", "DQ_in")}),
        ({"no_zp": True}, {("int8", "Q_in"), ("int8", "DQ_in")}),
        ({"w1_scale": np.array([0.01, -0.02, 0.01, 0.0], np.float32)}, {("scale", "DQ_w1")}),
        ({"w1_axis": 1}, {("weight-axis", "DQ_w1")}),
        ({"act_scale": np.full(4, 0.05, np.float32)}, {("per-tensor-activations", "Q_in"),
                                                        ("per-tensor-activations", "DQ_in")}),
        ({"opset": 11}, {("opset", "(model)")}),
        ({"fusion_break": True}, {("fusion", "Q_c1")}),
        ({"residual_from": "Relu1"}, {("residual-add", "ResidualAdd")}),
        ({"extra_nodes": [helper.make_node("QLinearConv", ["x_q", "s_act", "zp0", "w1_q", "s_w1", "zp_w", "s_act", "zp0"],
                                           ["qc"], name="QConv")]}, {("qoperator", "QConv")}),  # fmt: skip
    ],
    ids=["uint8", "nonzero-zp", "no-zp", "negative-scale", "weight-axis-1", "per-channel-act", "opset-11",
         "fusion-break", "residual-unquantized", "qoperator"],  # fmt: skip
)
def test_each_broken_rule_is_reported_with_its_node(broken, expected):
    assert _rules(_graph(**broken)) == expected


def test_int32_bias_dequantize_is_the_one_error():
    """TensorRT's parser takes only INT8/FP8/INT4 into DequantizeLinear (onnx-tensorrt operators.md; onnxruntime
    #14229): an int32 bias fails the parse, while the graph is valid ONNX that onnxruntime runs."""
    model = _graph(int32_bias=True)
    onnx.checker.check_model(model, full_check=True)
    errors = [v for v in qdq_check.check(model) if v.severity == "error"]
    assert [(v.rule, v.node) for v in errors] == [("op-type", "DQ_b1")]
    assert "DequantizeLinear input 0 ('b1_q') is INT32; TensorRT takes INT8, FP8, INT4" in errors[0].message
    assert qdq_check.operators(_graph()) == []


@pytest.mark.parametrize(
    "node, expected",
    [
        (helper.make_node("MaxPool", ["y"], ["p", "idx"], kernel_shape=[2, 2], name="Pool"),
         [("op-restriction", "Pool", "MaxPool `Indices` output is unsupported")]),
        (helper.make_node("AveragePool", ["y"], ["p"], kernel_shape=[2, 2], dilations=[2, 2], name="Pool"),
         [("op-restriction", "Pool", "AveragePool `dilations` must be empty or all ones")]),
        (helper.make_node("Resize", ["y", "", "scales"], ["p"], mode="cubic", name="Up"),
         [("op-restriction", "Up", "Resize mode 'cubic' is unsupported")]),
        (helper.make_node("Gelu", ["y"], ["p"], domain="com.microsoft", name="G"),
         [("unknown-op", "G", "com.microsoft.Gelu is not in the operator table")]),
        (helper.make_node("Cast", ["y"], ["y64"], to=TensorProto.DOUBLE, name="C"), []),
    ],
    ids=["maxpool-indices", "pool-dilations", "resize-cubic", "unknown-op", "cast-is-supported"],
)
def test_operator_table_restrictions(node, expected):
    scales = helper.make_node("Constant", [], ["scales"], value=numpy_helper.from_array(np.ones(4, np.float32)))
    model = _graph(extra_nodes=[scales, node])
    got = [(v.rule, v.node, v.message) for v in qdq_check.operators(model)]
    assert [(r, n) for r, n, _ in got] == [(r, n) for r, n, _ in expected]
    assert all(m.startswith(e) for (_, _, m), (_, _, e) in zip(got, expected))


def test_operator_table_checks_input_types():
    nodes = [helper.make_node("Cast", ["y"], ["y64"], to=TensorProto.DOUBLE, name="C"),
             helper.make_node("Sigmoid", ["y64"], ["s"], name="S")]  # fmt: skip
    (v,) = qdq_check.operators(_graph(extra_nodes=nodes))
    assert (v.rule, v.node, v.severity) == ("op-type", "S", "error") and "is DOUBLE; TensorRT takes FP32" in v.message


def test_severity_performance_rules_warn_the_rest_fail():
    fusion = qdq_check.check(_graph(fusion_break=True))
    assert [v.severity for v in fusion] == ["warning"]
    assert qdq_check.summary(_graph(fusion_break=True), fusion)["passed"]
    bad = _graph(act_zp=np.int8(3))
    s = qdq_check.summary(bad, qdq_check.check(bad))
    assert not s["passed"] and len(s["errors"]) == 2 and all("zero-point 3 != 0" in e for e in s["errors"])


def test_cli_exit_codes_and_messages(tmp_path, capsys):
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(_graph(), str(good))
    onnx.save(_graph(w1_axis=1), str(bad))
    assert main(["check-qdq", str(good)]) == 0
    assert "0 errors, 0 warnings" in capsys.readouterr().out
    assert main(["check-qdq", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "error: DQ_w1: [weight-axis] per-channel weight scales on axis 1" in out
    assert main(["check-qdq", str(tmp_path / "missing.onnx")]) == 2
    assert capsys.readouterr().err.strip() == f"error: ONNX file not found: {tmp_path / 'missing.onnx'}"
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert main(["check-qdq", str(tmp_path / "junk.onnx")]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err


@pytest.fixture(scope="module")
def real_models(tmp_path_factory):
    """MobileNetV3-Small (random weights, 64 px) quantized for both targets by the real quantize stage."""
    from deploy import models
    from deploy import recipe as recipes
    from deploy.stages import export_onnx
    from deploy.stages.int8 import quantize

    root = tmp_path_factory.mktemp("real")
    torch.manual_seed(0)
    r = recipes.override(recipes.load("mobilenet_v3_small"), {"model.num_classes": 3})
    model = models.architecture(r.model).eval()
    fp32 = root / "model.fp32.onnx"
    export_onnx.export(model, fp32, r.export, 64)
    calib = np.random.default_rng(0).standard_normal((8, 3, 64, 64)).astype(np.float32)
    out = {}
    for target in ("tensorrt", "ort-cpu"):
        # float_stem off: the input itself is quantized, the first thing the ort-cpu form gets wrong for TensorRT
        cfg = r.quantize.model_copy(update={"enabled": True, "target": target, "float_stem": False})
        out[target] = root / f"{target}.int8.onnx"
        quantize.quantize(fp32, out[target], calib, cfg, root / f"cache-{target}", None)
    return out


def test_real_models_tensorrt_target_passes_ort_cpu_target_fails(real_models):
    trt_model = onnx.load(str(real_models["tensorrt"]))
    trt = qdq_check.check(trt_model)
    assert [v for v in trt if v.severity == "error"] == []
    cpu_model = onnx.load(str(real_models["ort-cpu"]))
    cpu = qdq_check.check(cpu_model)
    rules = {(v.rule, v.node) for v in cpu}
    # uint8 asymmetric activations: the very first quantizer of the input already breaks the rules
    assert ("int8", "input_QuantizeLinear") in rules and ("zero-point", "input_QuantizeLinear") in rules
    assert all(v.rule in {"int8", "zero-point", "op-type"} for v in cpu if v.severity == "error")
    # the ort-cpu form keeps quantize_static's int32 biases (and uint8 constants), which TensorRT's parser refuses
    op_type = {n.name: n.op_type for n in cpu_model.graph.node}
    refused = [v for v in cpu if v.rule == "op-type"]
    assert {op_type[v.node] for v in refused} == {"DequantizeLinear"}
    assert any(v.node.endswith("bias_DequantizeLinear") and "is INT32" in v.message for v in refused)
    assert Path(real_models["tensorrt"]).stat().st_size > 0


@pytest.mark.parametrize("name", recipes.available())
def test_every_registered_model_passes_the_operator_table_fp32_and_int8(name, tmp_path):
    """The fp32 graph and the tensorrt-target int8 graph of each registered model (random weights, 64 px, BN folded
    as the pipeline does): nothing TensorRT's parser would refuse, and no int32 bias left."""
    from deploy import models
    from deploy.stages import export_onnx
    from deploy.stages.int8 import quantize
    from deploy.stages.fold_bn import fold_batchnorm

    r = recipes.override(recipes.load(name), {"model.weights": "random", "model.num_classes": 10,
                                              "quantize.enabled": True, "quantize.target": "tensorrt",
                                              "quantize.calibration.method": "minmax"})  # fmt: skip
    model, _ = fold_batchnorm(models.build(r.model))
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    export_onnx.export(model, fp32, r.export, 64)
    calib = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
    quantize.quantize(fp32, int8, calib, r.quantize, tmp_path / "cache", None)
    assert qdq_check.operators(onnx.load(str(fp32))) == []
    qmodel = onnx.load(str(int8))
    violations = qdq_check.check(qmodel)
    assert [str(v) for v in violations if v.severity == "error"] == []
    inits = {i.name: i.data_type for i in qmodel.graph.initializer}
    convs = [n for n in qmodel.graph.node if n.op_type == "Conv" and len(n.input) > 2]
    assert convs and all(inits.get(n.input[2]) == TensorProto.FLOAT for n in convs)  # float biases
