"""`deploy export triton`: the repository entry of an int8 and an fp32 build, its config.pbtxt parsed by Triton's own
ModelConfig schema (tritonclient's model_config_pb2, which rejects unknown fields), the model and labels it names."""

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

from deploy import recipe as recipes
from deploy.cli import main

pb = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="pip install 'tritonclient[grpc]'")
text_format = pytest.importorskip("google.protobuf.text_format")


@pytest.fixture(scope="module", params=["int8", "fp32"])
def build(request, tmp_path_factory):
    """A real build of MobileNetV3-Small (3 classes, random weights, 64 px): int8, or fp32 only."""
    from deploy import models

    root = tmp_path_factory.mktemp(f"triton-{request.param}")
    torch.manual_seed(0)
    r = recipes.override(recipes.load("mobilenet_v3_small"), {
        "model.num_classes": 3, "preprocess.resize": 72, "preprocess.input_size": 64,
        "quantize.enabled": request.param == "int8", "quantize.calibration.samples": 16, "verify.heldout": 8,
        "verify.latency.runs": 3, "verify.latency.warmup": 1, "verify.latency.batch": 2,
        "verify.max_top1_drop": None, "tensorrt.batch.max": 16, "model.weights": str(root / "w.pth")})  # fmt: skip
    torch.save(models.architecture(r.model).state_dict(), root / "w.pth")
    (root / "recipe.yaml").write_text(yaml.safe_dump(r.model_dump(mode="json")))
    assert main(["build", str(root / "recipe.yaml"), "--out", str(root / "build")]) == 0
    return root / "build"


def _parse(path) -> "pb.ModelConfig":
    return text_format.Parse(path.read_text(), pb.ModelConfig())


def test_entry_is_a_valid_triton_model_config_for_the_recommended_model(build, tmp_path):
    serving = json.loads((build / "serving.json").read_text())
    assert main(["export", "triton", str(build), "--repo", str(tmp_path / "repo"), "--instances", "2"]) == 0
    entry = tmp_path / "repo" / "mobilenet_v3_small"
    assert sorted(p.relative_to(entry).as_posix() for p in entry.rglob("*")) == [
        "1", "1/model.onnx", "config.pbtxt", "labels.txt"]  # fmt: skip
    cfg = _parse(entry / "config.pbtxt")
    with pytest.raises(text_format.ParseError):  # the schema is strict: a field Triton does not know fails
        text_format.Parse((entry / "config.pbtxt").read_text() + "max_batch: 16\n", pb.ModelConfig())
    assert cfg.name == "mobilenet_v3_small" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 5000
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(2, pb.ModelInstanceGroup.KIND_CPU)]
    session = ort.InferenceSession(str(entry / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,), out = cfg.input, cfg.output[0]
    assert inp.name == session.get_inputs()[0].name and list(inp.dims) == [3, 64, 64]
    assert inp.data_type == out.data_type == pb.TYPE_FP32
    assert out.name == session.get_outputs()[0].name and list(out.dims) == [3] and out.label_filename == "labels.txt"
    assert (entry / "labels.txt").read_text().splitlines() == serving["classes"] == ["0", "1", "2"]
    assert (entry / "1" / "model.onnx").read_bytes() == (build / serving["model"]).read_bytes()
    # the recommended model: int8 unless this small random-weight net's int8 timed slower than fp32 on this CPU
    assert serving["precision"] == ("int8" if serving["model"] == "model.int8.onnx" else "fp32")
    x = np.zeros((2, 3, 64, 64), np.float32)  # Triton's batch: the model's dynamic first dimension
    assert session.run([out.name], {inp.name: x})[0].shape == (2, 3)


def test_an_existing_entry_is_kept_without_force_and_replaced_with_it(build, tmp_path):
    repo = tmp_path / "repo"
    assert main(["export", "triton", str(build), "--repo", str(repo), "--name", "cls"]) == 0
    config = repo / "cls" / "config.pbtxt"
    before = config.read_text()
    assert main(["export", "triton", str(build), "--repo", str(repo), "--name", "cls", "--kind", "gpu"]) == 2
    assert config.read_text() == before
    assert main(["export", "triton", str(build), "--repo", str(repo), "--name", "cls", "--kind", "gpu", "--force"]) == 0
    assert [g.kind for g in _parse(config).instance_group] == [pb.ModelInstanceGroup.KIND_GPU]
    assert sorted(p.name for p in repo.iterdir()) == ["cls"]  # no temporary or old folder left behind
    (repo / "notes").mkdir()
    assert main(["export", "triton", str(build), "--repo", str(repo), "--name", "notes", "--force"]) == 2
    assert list((repo / "notes").iterdir()) == []


def test_an_engine_becomes_a_tensorrt_plan_with_its_profile(build, tmp_path):
    """The folder's engine is served as model.plan; max_batch_size is its profile's maximum (from its sidecar)."""
    folder = tmp_path / "b"
    shutil.copytree(build, folder)
    precision = json.loads((folder / "serving.json").read_text())["precision"]
    (folder / f"model.{precision}.engine").write_bytes(b"serialized engine")  # never deserialized by the export
    (folder / f"model.{precision}.engine.json").write_text(
        json.dumps(
            {
                "onnx": f"model.{precision}.onnx",
                "profile": {"min": [1, 3, 64, 64], "opt": [4, 3, 64, 64], "max": [8, 3, 64, 64]},
            }
        )
    )
    assert main(["export", "triton", str(folder), "--repo", str(tmp_path / "repo")]) == 0
    entry = tmp_path / "repo" / "mobilenet_v3_small"
    cfg = _parse(entry / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 8
    assert [g.kind for g in cfg.instance_group] == [pb.ModelInstanceGroup.KIND_GPU]
    assert (entry / "1" / "model.plan").read_bytes() == b"serialized engine"


@pytest.mark.parametrize("args, message", [
    (["--name", "../x"], "use letters, digits"),
    (["--instances", "0"], "--instances must be positive"),
])  # fmt: skip
def test_bad_options_are_one_line(build, tmp_path, capsys, args, message):
    assert main(["export", "triton", str(build), "--repo", str(tmp_path / "repo"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "repo").exists()
