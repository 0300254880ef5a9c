import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from deploy import data, models, recipe
from deploy.errors import DeployError
from deploy.stages.export_onnx import export
from deploy.stages.fold_bn import fold_batchnorm
from deploy.stages.int8.quantize import quantize


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory):
    r = recipe.override(recipe.load("mobilenet_v3_small"), {"preprocess.resize": 110, "preprocess.input_size": 96})
    torch.manual_seed(0)
    model, _ = fold_batchnorm(models.architecture(r.model).eval())
    path = tmp_path_factory.mktemp("q") / "m.onnx"
    export(model, path, r.export, 96)
    calib = data.calibration_data(None, data.Preprocessor(r.preprocess), 16, 0, 0).calib.inputs[:24]
    return r, path, calib


def _quantize(fp32_model, tmp_path, **cfg):
    r, path, calib = fp32_model
    q = recipe.override(r, {"quantize.enabled": True, **{f"quantize.{k}": v for k, v in cfg.items()}}).quantize
    out = tmp_path / "int8.onnx"
    info = quantize(path, out, calib, q, tmp_path / "cache", None)
    return onnx.load(str(out)), info


def _params(model):
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return inits, [n for n in model.graph.node if n.op_type == "QuantizeLinear"], [
        n for n in model.graph.node if n.op_type == "DequantizeLinear"
    ]


def _weight_dqs(model, inits):
    """DequantizeLinear nodes whose input is a constant int8 weight of a Conv/Gemm."""
    consumers = {i: n for n in model.graph.node for i in n.input}
    return [
        n for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim > 1
        and consumers[n.output[0]].op_type in ("Conv", "Gemm") and consumers[n.output[0]].input[1] == n.output[0]
    ]  # fmt: skip


def _axis(node):
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def test_tensorrt_form_is_symmetric_int8_with_per_channel_weights_on_axis_0(fp32_model, tmp_path):
    model, info = _quantize(fp32_model, tmp_path, target="tensorrt")
    inits, qs, dqs = _params(model)
    assert qs and info["target"] == "tensorrt"
    for q in qs:  # every activation quantizer: int8, zero-point 0
        zp = inits[q.input[2]]
        assert zp.dtype == np.int8 and np.all(zp == 0), q.name
    weights = _weight_dqs(model, inits)
    assert len(weights) == sum(n.op_type in ("Conv", "Gemm") for n in model.graph.node)
    for dq in weights:
        w, scale, zp = inits[dq.input[0]], inits[dq.input[1]], inits[dq.input[2]]
        assert w.dtype == np.int8 and np.all(zp == 0)
        assert _axis(dq) == 0 and scale.shape == (w.shape[0],), dq.name
        assert np.all(scale > 0)
    # biases stay float: TensorRT's parser refuses a DequantizeLinear of int32 (onnx-tensorrt operators.md)
    assert info["bias"] == "float" and all(inits[dq.input[0]].dtype != np.int32 for dq in dqs if dq.input[0] in inits)
    ref = onnx.load(str(fp32_model[1])).graph
    ref_inits = {i.name: numpy_helper.to_array(i) for i in ref.initializer}
    ref_bias = {n.name: ref_inits[n.input[2]] for n in ref.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 2}
    biased = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 2]
    assert len(biased) == len(ref_bias) and all(np.array_equal(inits[n.input[2]], ref_bias[n.name]) for n in biased)


def test_ort_cpu_form_is_u8_activations_and_s8_per_channel_weights(fp32_model, tmp_path):
    model, info = _quantize(fp32_model, tmp_path, target="ort-cpu")
    inits, qs, dqs = _params(model)
    assert all(inits[q.input[2]].dtype == np.uint8 for q in qs)
    assert info["bias"].startswith("int32")
    assert any(inits[dq.input[0]].dtype == np.int32 for dq in dqs if dq.input[0] in inits)
    for dq in _weight_dqs(model, inits):
        assert inits[dq.input[0]].dtype == np.int8 and inits[dq.input[1]].shape == (inits[dq.input[0]].shape[0],)
    assert "HardSwish" in {n.op_type for n in model.graph.node}  # not split into HardSigmoid + Mul


def test_openvino_form_quantizes_conv_and_add_inputs_with_u8_activations_and_int32_biases(fp32_model, tmp_path):
    model, info = _quantize(fp32_model, tmp_path, target="openvino")
    inits, qs, dqs = _params(model)
    assert qs and all(inits[q.input[2]].dtype == np.uint8 for q in qs)  # asymmetric: the zero-point is free
    assert info["bias"].startswith("int32") and any(inits[dq.input[0]].dtype == np.int32 for dq in dqs
                                                    if dq.input[0] in inits)  # fmt: skip
    assert len(_weight_dqs(model, inits)) == sum(n.op_type in ("Conv", "Gemm") for n in model.graph.node)
    # the tensorrt placement: every dequantized activation feeds a Conv, Gemm or Add, none comes out of a Q
    # placed after a Conv's activation, so OpenVINO fuses each Conv with what follows it
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    activation_dqs = [dq for dq in dqs if dq.input[0] not in inits]
    assert activation_dqs and {t for dq in activation_dqs for t in consumers[dq.output[0]]} <= {"Conv", "Gemm", "Add"}
    assert "HardSwish" in {n.op_type for n in model.graph.node} and info["placement"]["int8_hard_activations"] == {}


def test_reduce_range_gives_7_bit_weights(fp32_model, tmp_path):
    model, info = _quantize(fp32_model, tmp_path, reduce_range=True)
    inits, _, _ = _params(model)
    assert info["weights"].startswith("int7")
    assert max(np.abs(inits[dq.input[0]].astype(int)).max() for dq in _weight_dqs(model, inits)) <= 64


def test_calibration_ranges_are_cached_and_reused_only_for_the_same_data(fp32_model, tmp_path):
    r, path, calib = fp32_model
    q = recipe.override(r, {"quantize.enabled": True}).quantize
    first = quantize(path, tmp_path / "a.onnx", calib, q, tmp_path / "c1", None)
    again = quantize(path, tmp_path / "b.onnx", calib, q, tmp_path / "c2", tmp_path / "c1")
    assert not first["calibration"]["cache_reused"] and again["calibration"]["cache_reused"]
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    other = quantize(path, tmp_path / "c.onnx", calib[:-1], q, tmp_path / "c3", tmp_path / "c1")
    assert not other["calibration"]["cache_reused"]
    assert {p.name for p in (tmp_path / "c3").iterdir()}.isdisjoint(p.name for p in (tmp_path / "c1").iterdir())


def test_exclude_keeps_matching_nodes_in_float_and_rejects_unknown_patterns(fp32_model, tmp_path):
    model, info = _quantize(fp32_model, tmp_path, exclude=["/classifier/*"])
    assert info["excluded_nodes"] and all(n.startswith("/classifier/") for n in info["excluded_nodes"])
    inits, _, _ = _params(model)
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert gemm.input[1] in inits and inits[gemm.input[1]].dtype == np.float32
    with pytest.raises(DeployError, match="matches no node"):
        _quantize(fp32_model, tmp_path, exclude=["no_such_node*"])
