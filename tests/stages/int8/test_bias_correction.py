"""Empirical bias correction removes the mean output shift that int8 quantization gives each layer."""

from pathlib import Path

import numpy as np
import onnx
import pytest

from deploy import data, models, recipe
from deploy.stages.int8.bias_correction import correct_bias, image_means, quantized_layers
from deploy.stages.export_onnx import export
from deploy.stages.fold_bn import fold_batchnorm
from deploy.stages.int8.quantize import quantize


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """EfficientNet-Lite0 (real weights) at 64x64, int8 for ort-cpu, calibrated on the built-in photos; the
    built-in held-out photos are images the correction never sees."""
    tmp = tmp_path_factory.mktemp("bc")
    r = recipe.override(recipe.load("efficientnet_lite0"), {"preprocess.resize": 73, "preprocess.input_size": 64,
                                                            "quantize.enabled": True})  # fmt: skip
    model, _ = fold_batchnorm(models.build(r.model).eval())
    export(model, tmp / "fp32.onnx", r.export, 64)
    images = data.calibration_data(None, data.Preprocessor(r.preprocess), 96, 0, 1)
    quantize(tmp / "fp32.onnx", tmp / "int8.onnx", images.calib.inputs, r.quantize, tmp / "cache", None)
    trt = r.quantize.model_copy(update={"target": "tensorrt"})
    quantize(tmp / "fp32.onnx", tmp / "trt.onnx", images.calib.inputs, trt, tmp / "cache-trt", None)
    return tmp, images.calib.inputs, images.heldout.inputs


def _mean_shifts(fp32: Path, int8: Path, corrected: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per quantized layer, before and after correction: RMS over output channels of the int8-minus-fp32 mean
    output on `images` (exact Q/DQ arithmetic)."""
    fmodel = onnx.load(str(fp32))
    layers, _ = quantized_layers(onnx.load(str(int8)), fmodel)
    ref = image_means(fmodel, [layer.ref for layer in layers], images, 16, exact=False)
    shifts = []
    for path in (int8, corrected):
        got = image_means(onnx.load(str(path)), [layer.output for layer in layers], images, 16)
        shifts.append(np.array([np.sqrt(np.mean((got[la.output] - ref[la.ref]).mean(axis=0) ** 2)) for la in layers]))
    return shifts[0], shifts[1]


def test_bias_correction_reduces_the_mean_output_error_on_held_out_images(quantized):
    tmp, calib, heldout = quantized
    rec = correct_bias(tmp / "fp32.onnx", tmp / "int8.onnx", calib, tmp / "corrected.onnx", images=len(calib))
    assert rec["layers"] >= 45 and rec["images"] == len(calib)
    before, after = _mean_shifts(tmp / "fp32.onnx", tmp / "int8.onnx", tmp / "corrected.onnx", heldout)
    ratio = after / before
    print(f"\nheld-out mean-shift ratio after/before: median {np.median(ratio):.2f}, worst {ratio.max():.2f}")
    assert np.median(ratio) < 0.7
    assert after.sum() < 0.7 * before.sum()


def test_only_the_biases_change(quantized):
    tmp, calib, _ = quantized
    correct_bias(tmp / "fp32.onnx", tmp / "int8.onnx", calib, tmp / "c.onnx", images=8)
    a, b = onnx.load(str(tmp / "int8.onnx")), onnx.load(str(tmp / "c.onnx"))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    changed = {x.name for x, y in zip(a.graph.initializer, b.graph.initializer) if x.SerializeToString() != y.SerializeToString()}
    assert changed and all(name.endswith("bias_quantized") for name in changed)


def test_float_biases_of_the_tensorrt_form_are_corrected(quantized):
    """The tensorrt form keeps biases float (no int32 bias DequantizeLinear, which TensorRT refuses): they are
    corrected in place, unrounded, and the held-out mean shift falls as for the int32 form."""
    from onnx import numpy_helper

    tmp, calib, heldout = quantized
    rec = correct_bias(tmp / "fp32.onnx", tmp / "trt.onnx", calib, tmp / "trt-corrected.onnx", images=len(calib))
    assert rec["layers"] >= 45
    a, b = onnx.load(str(tmp / "trt.onnx")), onnx.load(str(tmp / "trt-corrected.onnx"))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    before = {i.name: numpy_helper.to_array(i) for i in a.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in b.graph.initializer}
    biases = {n.input[2] for n in b.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 2}
    changed = {k for k in after if k not in before or not np.array_equal(after[k], before[k])}
    assert changed and changed <= biases and all(after[k].dtype == np.float32 for k in changed)
    assert not any(n.op_type == "DequantizeLinear" and after.get(n.input[0], np.zeros(0, np.int8)).dtype == np.int32
                   for n in b.graph.node)  # fmt: skip
    shift_before, shift_after = _mean_shifts(tmp / "fp32.onnx", tmp / "trt.onnx", tmp / "trt-corrected.onnx", heldout)
    ratio = shift_after / shift_before
    print(f"\ntensorrt form, held-out mean-shift ratio: median {np.median(ratio):.2f}, worst {ratio.max():.2f}")
    assert np.median(ratio) < 0.7 and shift_after.sum() < 0.7 * shift_before.sum()

