"""Per-layer int8 sensitivity: a model built with one badly quantizing layer is diagnosed correctly."""

import json

import pytest

from deploy.evalset import EvalSet
from deploy.stages.int8 import sensitivity
from deploy.cli import main
from deploy.recipe import QuantizeConfig
from deploy.stages.int8 import quantize
from helpers import BAD, bad_layer_onnx, images, is_plot

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The fp32 model, its int8 models for both targets (stem quantized too) and their calibration caches."""
    root = tmp_path_factory.mktemp("bad_layer")
    fp32 = bad_layer_onnx(root / "fp32.onnx")
    calib = images(32, 0)
    out = {}
    for target in ("ort-cpu", "tensorrt"):
        cfg = QuantizeConfig(enabled=True, target=target, float_stem=False)
        int8 = root / f"{target}.onnx"
        quantize.quantize(fp32, int8, calib, cfg, root / f"cache-{target}", None)
        out[target] = (int8, cfg, root / f"cache-{target}")
    return fp32, calib, out


@pytest.mark.parametrize("target", ["ort-cpu", "tensorrt"])
def test_one_pass_sqnr_ranks_the_bad_layer_worst(built, target):
    fp32, calib, models = built
    rows = sensitivity.layer_sqnr(fp32, models[target][0], calib[:16])
    by_node = {r["node"]: r for r in rows}
    assert {"/c1/Conv", BAD, "/c3/Conv", "/c4/Conv", "/fc/Gemm"} <= set(by_node)
    assert sensitivity.worst(rows, 1)[0]["node"] == BAD  # by lost_db: what the node itself adds
    assert by_node[BAD]["lost_db"] > 20 and by_node[BAD]["sqnr_db"] < 10
    assert by_node["/c1/Conv"]["sqnr_db"] > 30 and by_node["/c1/Conv"]["weight_sqnr_db"] > 40
    assert all(r["lost_db"] < 5 for r in rows if r["node"] != BAD and r["lost_db"] is not None)


def test_output_quantization_error_accounts_for_the_relu_the_quantizer_removed(built, tmp_path):
    """ort-cpu: onnxruntime folds each ReLU into the Q after its Conv and gives the Conv the ReLU's output name.
    qdq_loss_debug then compares the unclipped Conv output with the quantized one and reports a huge error;
    layer_sqnr applies the ReLU first."""
    from onnxruntime.quantization import qdq_loss_debug as dbg

    fp32, calib, models = built
    int8 = models["ort-cpu"][0]
    ours = {r["node"]: r for r in sensitivity.layer_sqnr(fp32, int8, calib[:8])}["/c1/Conv"]["output_qdq_sqnr_db"]
    aug = tmp_path / "aug.onnx"
    dbg.modify_model_output_intermediate_tensors(str(int8), str(aug))
    acts = dbg.collect_activations(str(aug), iter([{"input": calib[:8]}]))
    relu_out = next(n.output[0] for n in __import__("onnx").load(str(fp32)).graph.node if n.name == "/Relu")
    match = dbg.create_activation_matching(acts)[relu_out]  # what compute_activation_error's qdq_err compares
    theirs = dbg.compute_signal_to_quantization_noice_ratio(match["pre_qdq"], match["post_qdq"])
    assert ours > 35 and theirs < 15


def test_variants_find_the_layer_whose_float_copy_restores_the_logits(built):
    fp32, calib, models = built
    int8, cfg, cache = models["tensorrt"]
    result = sensitivity.analyze(fp32, int8, calib, EvalSet.arrays(images(16, 1)), cfg, cache, sqnr_images=8, variant_images=16)
    assert result["ranking"] == "excluded_gain_db" and result["base"]["sqnr_db"] < 10
    by_node = {r["node"]: r for r in result["layers"]}
    assert sensitivity.worst(result["layers"], 1, "excluded_gain_db")[0]["node"] == BAD
    assert by_node[BAD]["excluded_gain_db"] > 20 and by_node[BAD]["excluded"]["agreement"] > 90
    assert by_node[BAD]["alone"]["sqnr_db"] < 10 < by_node["/c1/Conv"]["alone"]["sqnr_db"]


def test_diagnose_cli_writes_json_markdown_and_plot(tmp_path, capsys):
    model = bad_layer_onnx(tmp_path / "bad.onnx")
    out = tmp_path / "diag"
    args = ["diagnose", str(model), "--target", "tensorrt", "--out", str(out), "--sqnr-images", "8", "--images", "8",
            "--no-alone", "--threads", "1"]  # fmt: skip
    assert main(args) == 0
    result = json.loads((out / "diagnose.json").read_text())
    assert (out / "diagnose.md").is_file() and is_plot(out / "diagnose.png")
    assert (out / "build" / "model.int8.onnx").is_file()
    layers = {r["node"]: r for r in result["layers"]}
    assert {"/c1/Conv", BAD, "/fc/Gemm"} <= set(layers) and all(r["sqnr_db"] is not None for r in layers.values())
    assert result["variant_images"] == 8 and "excluded_gain_db" in layers[BAD]
    assert BAD in capsys.readouterr().out and BAD in (out / "diagnose.md").read_text()


def test_diagnose_rejects_a_folder_that_is_not_a_build(tmp_path, capsys):
    assert main(["diagnose", str(tmp_path)]) == 2
    assert "is not an int8 build folder" in capsys.readouterr().err


def test_build_report_section_lists_the_worst_layers_with_a_plot(built, tmp_path):
    from deploy.core import report

    fp32, calib, models = built
    sens = sensitivity.one_pass(fp32, models["ort-cpu"][0], calib, images=8)
    assert sens["sqnr_images"] == 8 and sens["ranking"] == "lost_db"
    sens["plot"] = report.sensitivity_plot(sens, tmp_path / "sensitivity.png", "bad")
    md = report.sensitivity_markdown(sens, top=3)
    rows = [line for line in md if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 3 and BAD in rows[0]
    assert is_plot(tmp_path / "sensitivity.png") and "![layer sensitivity](sensitivity.png)" in md
