"""AdaRound learns int8 weight rounding that lowers each layer's output error, and changes nothing else."""

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from deploy import data, metrics, models, recipe
from deploy.runtimes.ort import OrtCpu
from deploy.stages.export_onnx import export
from deploy.stages.fold_bn import fold_batchnorm
from deploy.stages.int8 import adaround as ar
from deploy.stages.int8.quantize import quantize


def _conv(group: int, stride: int, pad: int) -> ar._Layer:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 8 // group, 3, 3)).astype(np.float32)
    scale = (np.abs(w).reshape(8, -1).max(1) / 127).reshape(8, 1, 1, 1).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], group=group, strides=[stride] * 2, pads=[pad] * 4)
    return ar._Layer(node, numpy_helper.from_array(np.rint(w / scale).astype(np.int8), "w"), scale, w, "x")


@pytest.mark.parametrize("group,stride,pad", [(1, 1, 1), (2, 2, 1), (8, 1, 0)])
def test_the_quadratic_form_is_the_output_error(group, stride, pad):
    """q A q - 2 q.Bw + c from the input moments equals the mean squared output difference computed by conv2d."""
    layer = _conv(group, stride, pad)
    rng = np.random.default_rng(1)
    xf = rng.normal(size=(5, 8, 9, 9)).astype(np.float32)
    xq = (xf + rng.normal(scale=0.05, size=xf.shape)).astype(np.float32)
    w = torch.from_numpy(layer.weight)
    q = torch.from_numpy(np.rint(layer.weight / layer.scale) * layer.scale).float()
    a, bw, c = ar._moments(layer, xq, xf, w.reshape(group, 8 // group, -1), chunk=2)
    form = float(ar._error(q.reshape(group, 8 // group, -1).double(), a, bw, c))
    conv = lambda x, k: F.conv2d(torch.from_numpy(x), k, None, stride, pad, 1, group)  # noqa: E731
    direct = float((conv(xq, q) - conv(xf, w)).double().pow(2).sum(1).mean())
    assert form == pytest.approx(direct, rel=1e-4)


@pytest.mark.parametrize("images", [5, 40])
def test_the_quadratic_form_of_a_classifier(images):
    """Gemm with fewer images than inputs (A kept as its factor) and with more (A itself)."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(4, 16)).astype(np.float32)
    scale = (np.abs(w).max(1, keepdims=True) / 127).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
    layer = ar._Layer(node, numpy_helper.from_array(np.rint(w / scale).astype(np.int8), "w"), scale, w, "x")
    xf = rng.normal(size=(images, 16)).astype(np.float32)
    xq = (xf + rng.normal(scale=0.05, size=xf.shape)).astype(np.float32)
    a, bw, c = ar._moments(layer, xq, xf, torch.from_numpy(w)[None], chunk=3)
    assert a.shape == ((1, 16, 5) if images == 5 else (1, 16, 16))
    q = np.rint(w / scale) * scale
    direct = float(((xq @ q.T - xf @ w.T).astype(np.float64) ** 2).sum(1).mean())
    assert float(ar._error(torch.from_numpy(q).double()[None], a, bw, c)) == pytest.approx(direct, rel=1e-4)


@pytest.mark.parametrize("beta", [None, 7.0])
def test_the_hand_written_gradient_is_autograds(beta):
    torch.manual_seed(0)
    a = torch.randn(2, 5, 5, dtype=torch.float64)
    a = a @ a.transpose(1, 2)
    bw, scale = torch.randn(2, 3, 5, dtype=torch.float64), torch.rand(2, 3, 5, dtype=torch.float64) + 0.1
    base = torch.randint(-5, 5, (2, 3, 5)).double()
    base[0, 0, 0] = 127  # clipped by the int8 range: no gradient through q
    v = (torch.randn(2, 3, 5, dtype=torch.float64) * 3).requires_grad_(True)
    h = ar._h(v)
    loss = ar._error(scale * torch.clamp(base + h, -127, 127), a, bw, 0.0)
    if beta is not None:
        loss = loss + 0.01 * (1 - (2 * h - 1).abs().pow(beta)).sum()
    loss.backward()
    grad, free = ar._gradient(v.detach(), a, bw, base, scale, beta, 0.01)
    assert torch.allclose(grad, v.grad, atol=1e-12) and free.any() and not free.all()


def test_the_stepper_returns_a_tensor_an_earlier_call_made():
    """A layer's input computed on the way to an earlier layer's (ShuffleNet's branches): returned as it is."""
    from deploy.stages.int8.bias_correction import _Stepper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["n"]),
         helper.make_node("Add", ["n", "r"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])])  # fmt: skip
    x = np.array([[-1, 2, -3], [4, -5, 6]], np.float32)
    stepper = _Stepper(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), x)
    assert np.array_equal(stepper.run_to("n"), -np.maximum(x, 0))
    assert np.array_equal(stepper.run_to("r"), np.maximum(x, 0))


def _correlated(rng: np.random.Generator, mix: np.ndarray, n: int) -> np.ndarray:
    """Inputs whose channels mix 3 latent ones, as activations do (on white inputs nearest rounding is optimal)."""
    z = rng.normal(size=(n, mix.shape[1], 9, 9))
    return (np.einsum("cz,nzhw->nchw", mix, z) + 0.1 * rng.normal(size=(n, 8, 9, 9))).astype(np.float32)


def test_learned_rounding_beats_nearest_on_unseen_inputs():
    layer = _conv(1, 1, 1)
    rng = np.random.default_rng(2)
    mix = rng.normal(size=(8, 3))
    x = _correlated(rng, mix, 48)
    q, rec = ar.optimize(layer, x, x, recipe.AdaRoundConfig(iterations=300))
    assert rec["error_adaround"] < 0.7 * rec["error_nearest"]
    nearest = np.rint(layer.weight / layer.scale)
    assert np.abs(q - nearest).max() == 1 and 0 < rec["flipped"] < 0.5  # each weight rounds up or down, no further
    fresh = torch.from_numpy(_correlated(rng, mix, 16))
    w, s = torch.from_numpy(layer.weight), torch.from_numpy(layer.scale)
    ref = F.conv2d(fresh, w, padding=1)
    err = [float((F.conv2d(fresh, torch.from_numpy(k).float() * s, padding=1) - ref).pow(2).mean())
           for k in (nearest, q)]  # fmt: skip
    assert err[1] < 0.7 * err[0]


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    """EfficientNet-Lite0 (real weights) at 64x64, int8 for tensorrt, calibrated on the built-in photos; the
    built-in held-out photos are images AdaRound never sees."""
    tmp = tmp_path_factory.mktemp("adaround")
    r = recipe.override(recipe.load("efficientnet_lite0"), {
        "preprocess.resize": 73, "preprocess.input_size": 64, "quantize.enabled": True, "quantize.target": "tensorrt",
    })  # fmt: skip
    model, _ = fold_batchnorm(models.build(r.model).eval())
    export(model, tmp / "fp32.onnx", r.export, 64)
    images = data.calibration_data(None, data.Preprocessor(r.preprocess), 96, 0, 1)
    quantize(tmp / "fp32.onnx", tmp / "int8.onnx", images.calib.inputs, r.quantize, tmp / "cache", None)
    cfg = r.quantize.adaround.model_copy(update={"iterations": 200})
    rec = ar.adaround(tmp / "fp32.onnx", tmp / "int8.onnx", images.calib.inputs, tmp / "ada.onnx", cfg)
    return tmp, rec, images.heldout.inputs


def test_adaround_raises_logit_sqnr_on_held_out_images(lite0):
    tmp, rec, heldout = lite0
    assert rec["layers"] >= 40 and rec["images"] == 96 and rec["error_ratio"]["median"] < 1
    ref = metrics.logits(OrtCpu(tmp / "fp32.onnx"), heldout, 32, "fp32")
    sqnr = [metrics.sqnr_db(ref, metrics.logits(OrtCpu(tmp / f, reference=True), heldout, 32, f))
            for f in ("int8.onnx", "ada.onnx")]  # fmt: skip
    print(f"\nheld-out logit SQNR: nearest {sqnr[0]:.2f} dB, AdaRound {sqnr[1]:.2f} dB")
    assert sqnr[1] > sqnr[0] + 0.3


def test_only_int8_weights_change_by_one_step_at_most(lite0):
    tmp = lite0[0]
    a, b = onnx.load(str(tmp / "int8.onnx")), onnx.load(str(tmp / "ada.onnx"))
    assert [(n.op_type, list(n.input)) for n in a.graph.node] == [(n.op_type, list(n.input)) for n in b.graph.node]
    changed = 0
    for x, y in zip(a.graph.initializer, b.graph.initializer):
        u, v = numpy_helper.to_array(x), numpy_helper.to_array(y)
        if u.dtype != np.int8:
            assert np.array_equal(u, v), x.name  # scales, zero-points, biases
        else:
            assert np.abs(u.astype(int) - v).max() <= 1
            changed += not np.array_equal(u, v)
    assert changed >= 40
