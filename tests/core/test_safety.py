"""A user's files survive: --force replaces only earlier builds, one build per folder at a time, a killed build
leaves nothing that is not recovered, training never overwrites a checkpoint unasked, pickles do not run, and
bad environments get one line and exit 2."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from deploy.core import output
from deploy.cli import main
from deploy.errors import DeployError


def _recipe_file(tmp_path: Path, recipe) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    return str(path)


def _last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: "), err
    return err


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _fake_build(path: Path, content: str = "old") -> Path:
    path.mkdir(parents=True)
    (path / output.MARKER).write_text("")
    (path / "report.json").write_text(json.dumps({"tool": {"name": "edge-deploy"}, "content": content}))
    return path


@pytest.mark.parametrize("where", ["named", "cwd"])
def test_force_never_replaces_a_folder_that_is_not_a_build(tmp_path, small_recipe, capsys, monkeypatch, where):
    project = tmp_path / "p"
    (project / "sub").mkdir(parents=True)
    (project / "thesis.txt").write_text("x")
    (project / "sub" / "data.csv").write_text("1,2")
    recipe = _recipe_file(tmp_path, small_recipe)
    if where == "cwd":
        monkeypatch.chdir(project)
    before = _tree(project)
    assert main(["build", recipe, "--out", "." if where == "cwd" else str(project), "--force"]) == 2
    assert "refusing to replace" in _last_error(capsys)
    assert _tree(project) == before and sorted(p.name for p in project.iterdir()) == ["sub", "thesis.txt"]


def test_force_replaces_an_earlier_build_and_marks_it(tmp_path, small_recipe):
    out = tmp_path / "out"
    args = ["build", _recipe_file(tmp_path, small_recipe), "--out", str(out)]
    assert main(args) == 0 and output.is_build(out)
    (out / "report.json").write_text("{}")  # a build whose report is damaged is still recognised by its marker
    assert main([*args, "--force"]) == 0
    assert json.loads((out / "report.json").read_text())["tool"]["name"] == "edge-deploy"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []
    assert output.MARKER not in json.loads((out / "report.json").read_text())["files"]


def test_a_failed_replacement_keeps_the_old_build_byte_for_byte(tmp_path):
    out = _fake_build(tmp_path / "out")
    before = _tree(out)
    with pytest.raises(KeyboardInterrupt), output.replacing(out, force=True) as tmp:
        (tmp / "model.fp32.onnx").write_bytes(b"half")
        raise KeyboardInterrupt
    assert _tree(out) == before and [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("atomic", [True, False])
def test_swap_replaces_the_build(tmp_path, monkeypatch, atomic):
    if not atomic:  # a file system without renameat2(RENAME_EXCHANGE): the two-rename fallback
        monkeypatch.setattr(output, "_exchange", lambda a, b: False)
    out = _fake_build(tmp_path / "out")
    with output.replacing(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert (out / "new.txt").read_text() == "new" and not (out / "report.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_leftovers_of_a_killed_swap_are_restored_or_removed(tmp_path):
    out = tmp_path / "out"
    _fake_build(tmp_path / ".out.old-4242", "the previous build")  # killed between the two renames
    _fake_build(tmp_path / ".out.tmp-4243", "a killed build")
    (tmp_path / ".out.tmp-77").mkdir()  # not ours (no marker): kept
    with pytest.raises(DeployError, match="exists; pass --force"), output.replacing(out, force=False):
        pass
    assert json.loads((out / "report.json").read_text())["content"] == "the previous build"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp-77", "out"]


def test_second_build_of_a_folder_is_refused_and_a_killed_one_is_cleaned(tmp_path, small_recipe, capsys):
    out = tmp_path / "out"
    recipe = _recipe_file(tmp_path, small_recipe)
    first = subprocess.Popen([sys.executable, "-m", "deploy", "build", recipe, "--int8", "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".out.tmp-*/model.fp32.onnx")):  # well inside the build
            assert first.poll() is None and time.monotonic() < deadline, "the first build ended too soon"
            time.sleep(0.05)
        assert main(["build", recipe, "--out", str(out), "--force"]) == 2
        assert f"another build is writing {out} (pid {first.pid}" in _last_error(capsys)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert list(tmp_path.glob(".out.tmp-*")) and not out.exists()  # what SIGKILL leaves
    with output.replacing(out, force=False) as tmp:
        (tmp / "x").write_text("")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipe.yaml", "w.pth"]


def test_train_refuses_to_overwrite_a_checkpoint(tmp_path, small_val, capsys):
    ckpt = tmp_path / "w.pth"
    ckpt.write_bytes(b"15 epochs of training")
    assert main(["train", "mobilenet_v3_small", "--train", str(small_val), "--num-classes", "3", "--out", str(ckpt)]) == 2
    assert "exists; pass --force" in _last_error(capsys)
    assert ckpt.read_bytes() == b"15 epochs of training"


class _Planted:
    """A pickle that runs code when loaded unsafely: it would create `flag`."""

    def __init__(self, flag: Path):
        self.flag = flag

    def __reduce__(self):
        return (Path.touch, (self.flag,))


def _planted_file(path: Path, flag: Path) -> Path:
    torch.save({"model": _Planted(flag), "epoch": 1}, path)
    return path


def test_resume_does_not_run_a_planted_pickle(tmp_path, small_val, capsys):
    ckpt, flag = tmp_path / "w.pth", tmp_path / "pwned"
    _planted_file(tmp_path / "w.pth.train-state", flag)
    args = ["train", "mobilenet_v3_small", "--train", str(small_val), "--num-classes", "3", "--out", str(ckpt),
            "--resume", "--epochs", "1", "--workers", "0"]  # fmt: skip
    assert main(args) == 2
    assert "cannot resume from" in _last_error(capsys) and not flag.exists()


def test_weights_do_not_run_a_planted_pickle(tmp_path, capsys):
    flag = tmp_path / "pwned"
    weights = _planted_file(tmp_path / "w.pth", flag)
    assert main(["build", "mobilenet_v3_small", "--weights", str(weights), "--out", str(tmp_path / "o")]) == 2
    assert "cannot read checkpoint" in _last_error(capsys) and not flag.exists()


def test_no_unsafe_loader_in_the_package():
    package = Path(__file__).parents[2] / "deploy"
    unsafe = ("weights_only=False", "pickle.load", "yaml.load(", "yaml.unsafe_load", "allow_pickle=True")
    found = [f"{p.name}: {u}" for p in package.rglob("*.py") for u in unsafe if u in p.read_text()]
    assert not found


def test_unwritable_outputs_are_one_line(tmp_path, small_recipe, capsys):
    recipe = _recipe_file(tmp_path, small_recipe)
    assert main(["build", recipe, "--out", "/proc/x"]) == 2
    assert "build of /proc/x failed" in _last_error(capsys)


@pytest.fixture
def tmpfs(tmp_path):
    """A 2 MB tmpfs (root only): small enough that a build fills it."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:  # fmt: skip
        pytest.skip("mounting a tmpfs needs root")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_full_and_read_only_file_systems_are_one_line(tmp_path, small_recipe, capsys, tmpfs):
    recipe = _recipe_file(tmp_path, small_recipe)
    assert main(["build", recipe, "--out", str(tmpfs / "out")]) == 2
    assert "No space left on device" in _last_error(capsys)
    assert list(tmpfs.iterdir()) == []  # nothing half-written
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    assert main(["build", recipe, "--out", str(tmpfs / "out")]) == 2
    assert "Read-only file system" in _last_error(capsys)


def test_too_few_calibration_images_without_val(tmp_path, small_recipe, skimage_photos, capsys):
    calib = tmp_path / "calib"
    calib.mkdir()
    for name in ("astronaut.png", "coffee.png", "rocket.jpg"):
        shutil.copy(skimage_photos / name, calib / name)
    out = tmp_path / "out"
    assert main(["build", _recipe_file(tmp_path, small_recipe), "--calib", str(calib), "--out", str(out)]) == 2
    assert "has 3 images: too few to hold any out" in _last_error(capsys) and not out.exists()


def test_onnx_with_an_integer_input_is_refused(tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["input"], ["x"], to=TensorProto.FLOAT), helper.make_node("Relu", ["x"], ["logits"])],
        "g", [helper.make_tensor_value_info("input", TensorProto.UINT8, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, 8, 8])],
    )  # fmt: skip
    path = tmp_path / "u8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert main(["build", str(path), "--int8", "--out", str(tmp_path / "o")]) == 2
    assert "the input is uint8, expected float" in _last_error(capsys)


@pytest.mark.data
def test_misnamed_class_folders_warn_below_chance(tmp_path, cifar10):
    """Ten folders whose names are rotated by one (airplane photos in 'automobile', ...): fp32 is below chance."""
    root = Path(__file__).parents[2]
    classes = sorted(p.name for p in (cifar10 / "test").iterdir())
    val = tmp_path / "val"
    for i, cls in enumerate(classes):
        (val / classes[(i + 1) % len(classes)]).mkdir(parents=True)
        for f in sorted((cifar10 / "test" / cls).iterdir())[:10]:
            shutil.copy(f, val / classes[(i + 1) % len(classes)] / f.name)
    out = tmp_path / "out"
    assert main(["build", str(root / "recipes/cifar10/mobilenet_v3_small.yaml"), "--weights",
                 str(root / "checkpoints/mobilenet_v3_small_cifar10.pth"), "--val", str(val), "--out", str(out)]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["accuracy"]["fp32"]["top1"] < 10
    assert r["validation"]["class_mapping"].startswith("10 folders numbered in sorted order: airplane=0, automobile=1")
    assert any("below chance (10.00%)" in w and "airplane=0" in w for w in r["warnings"])
