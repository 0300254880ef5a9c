"""TensorRT: the version-dependent build plan, engine sidecars, fp16 graphs and the CLI on the CPU;
engine builds, parity with ORT fp32 and latency on a GPU (`-m gpu`, skipped without TensorRT/CUDA)."""

import json
import shutil

import numpy as np
import pytest
import torch

from deploy import recipe as recipes
from deploy.cli import main
from deploy.errors import DeployError
from deploy.recipe import TensorRTConfig
from deploy.runtimes.tensorrt import unavailable
from deploy.stages import build_trt
from deploy.stages.verify import sqnr_db

DIMS = ["batch", 3, 64, 64]


def _plan(version, precision="int8", quantized=None, dims=DIMS, **cfg):
    quantized = precision == "int8" if quantized is None else quantized
    return build_trt.plan(version, TensorRTConfig(**cfg), precision, "input", dims, quantized)


@pytest.mark.parametrize("version", ["10.3.0", "10.8.0.43", "10.13.3.9"])
def test_tensorrt_10_is_weakly_typed_with_precision_flags(version):
    assert _plan(version, "int8").flags == ("INT8",)
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
    f = build_trt.timing_cache_file("~/c/tensorrt.timing-cache", "10.3.0", "8.7")
    assert f.name == "tensorrt-trt10.3.0-sm87.timing-cache" and "~" not in str(f)
    assert json.loads(json.dumps(p.to_dict()))["profile"][2] == [16, 3, 64, 64]


def test_dla_only_on_tensorrt_10_with_reduced_precision():
    p = _plan("10.3.0", "int8", dla_core=1)
    assert p.dla_core == 1 and p.flags == ("INT8", "GPU_FALLBACK")
    assert _plan("10.3.0", "fp16", dla_core=0, gpu_fallback=False).flags == ("FP16",)
    with pytest.raises(DeployError, match="DLA runs only fp16 or int8"):
        _plan("10.3.0", "fp32", dla_core=0)
    with pytest.raises(DeployError, match="DLA needs TensorRT 10.x"):
        _plan("11.0.0", "int8", dla_core=0)


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
    assert build_trt.incompatibility(side, dict(side)) is None
    for here in ({**side, "tensorrt": "10.8.0"}, {**side, "gpu": "NVIDIA H100", "compute_capability": "9.0"}):
        msg = build_trt.incompatibility(side, here)
        assert "\n" not in msg and "TensorRT 10.3.0 on Orin (sm 8.7)" in msg and "not portable" in msg
        assert f"TensorRT {here['tensorrt']} on {here['gpu']}" in msg and "deploy engine model.int8.onnx" in msg


def test_missing_sidecar_is_an_error(tmp_path):
    (tmp_path / "model.int8.engine").write_bytes(b"x")
    with pytest.raises(DeployError, match="model.int8.engine.json is missing"):
        build_trt.read_sidecar(tmp_path / "model.int8.engine")


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
    from deploy.pipeline import BuildOptions, build

    r = recipes.override(small_recipe, {"quantize.enabled": True, "quantize.target": "tensorrt"})
    report = build(r, BuildOptions(out=tmp_path / "out"))
    c = report["qdq_check"]
    assert c["passed"] and c["errors"] == [] and c["quantize_linear"] > 50
    # Q/DQ only on Conv/Gemm/Add inputs (conv_inputs_only): nothing between a Conv and its activation
    assert c["warnings"] == [] and not any("cost TensorRT a fusion" in w for w in report["warnings"])
    assert "## TensorRT Q/DQ rules" in (tmp_path / "out" / "report.md").read_text()


# ---------------------------------------------------------------- GPU: TensorRT and CUDA needed


gpu = pytest.mark.skipif(unavailable() is not None, reason=f"needs TensorRT and a CUDA GPU: {unavailable()}")


@pytest.mark.gpu
@pytest.mark.data
@gpu
@pytest.mark.parametrize("precision, min_agreement", [("fp16", 99.0), ("int8", 97.0)])
def test_mobilenet_v3_small_engine_matches_ort_fp32(tmp_path, imagenet_sample, precision, min_agreement):
    from deploy.pipeline import BuildOptions, build

    r = recipes.override(recipes.load("mobilenet_v3_small"), {
        "quantize.enabled": precision == "int8", "quantize.target": "tensorrt", "verify.runtime": "tensorrt",
        "tensorrt.precision": precision, "tensorrt.timing_cache": str(tmp_path / "tc" / "t.cache"),
        "verify.max_top1_drop": None})  # fmt: skip
    out = tmp_path / "b"
    report = build(r, BuildOptions(calib=imagenet_sample / "calib", val=imagenet_sample / "val", out=out))
    engine = out / f"model.{precision}.engine"
    side = json.loads((out / f"model.{precision}.engine.json").read_text())
    assert engine.stat().st_size > 0 and side["precision"] == precision and side["profile"]["max"][0] == 32
    assert side["tensorrt"] and side["gpu"] and side["compute_capability"]
    rt = report["runtime"]
    print(f"\n{precision} on {rt['runtime']}: agreement {rt['accuracy']['agreement']:.2f}% vs ORT fp32, "
          f"top-1 {rt['accuracy']['int8']['top1']:.2f}% (ORT fp32 {rt['accuracy']['fp32']['top1']:.2f}%), "
          f"p50 {rt['latency']['p50_ms']:.3f} ms, p99 {rt['latency']['p99_ms']:.3f} ms, "
          f"{rt['latency']['throughput_ips']:.0f} img/s at batch {rt['latency']['batch']}")  # fmt: skip
    assert rt["accuracy"]["fp32"]["n"] == 800
    assert rt["accuracy"]["agreement"] >= min_agreement
    assert 0 < rt["latency"]["p50_ms"] <= rt["latency"]["p99_ms"]

    # The timing cache is reused by the next build, and a copied engine with another sidecar is refused.
    again = build_trt.build_engine(out / ("model.int8.onnx" if precision == "int8" else "model.fp32.onnx"),
                                   tmp_path, r.tensorrt, precision)  # fmt: skip
    assert again["timing_cache"]["reused"]
    from deploy.runtimes.tensorrt import TensorRTEngine

    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(engine, moved / engine.name)
    (moved / f"{engine.name}.json").write_text(json.dumps({**side, "tensorrt": "10.0.0", "gpu": "Other"}))
    with pytest.raises(DeployError, match="not portable"):
        TensorRTEngine(moved / engine.name)


@pytest.mark.gpu
@gpu
def test_engine_cli_builds_fp16_and_runs_batches_across_the_profile(fp32_onnx, tmp_path, capsys):
    from deploy.runtimes.ort import OrtCpu
    from deploy.runtimes.tensorrt import TensorRTEngine

    shutil.copy(fp32_onnx, tmp_path / "model.fp32.onnx")
    assert main(["engine", str(tmp_path / "model.fp32.onnx"), "--precision", "fp16"]) == 0
    assert "model.fp16.engine" in capsys.readouterr().out
    rt = TensorRTEngine(tmp_path / "model.fp16.engine")
    x = np.random.default_rng(0).standard_normal((40, 3, 64, 64)).astype(np.float32)  # > profile max 32: chunked
    got, ref = rt.infer(x), OrtCpu(fp32_onnx).infer(x)
    assert got.shape == (40, 10) and sqnr_db(ref, got) > 30
    lat = rt.benchmark((3, 64, 64), 8, 10, 50)
    print(f"\nfp16 engine: p50 {lat.p50_ms:.3f} ms, p99 {lat.p99_ms:.3f} ms, {lat.throughput_ips:.0f} img/s at batch 8")
    assert 0 < lat.p50_ms <= lat.p99_ms
