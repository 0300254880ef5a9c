"""The training loop: it learns, checkpoints every epoch atomically, resumes exactly, and `deploy build`
runs prune + distill with per-stage figures in the report."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from deploy import models
from deploy.cli import main
from deploy.train import state_path


@pytest.fixture
def tiny_folder(tmp_path, skimage_photos):
    """3 classes x 4 real photos (distinct per class), as an ImageFolder."""
    files = {"a": ["astronaut.png", "chelsea.png"], "b": ["coffee.png", "rocket.jpg"], "c": ["retina.jpg", "hubble_deep_field.jpg"]}
    root = tmp_path / "train"
    for cls, names in files.items():
        (root / cls).mkdir(parents=True)
        for i in range(2):
            for f in names:
                shutil.copy(skimage_photos / f, root / cls / f"{i}_{f}")
    return root


def _train(recipe_file, folder, out, *extra):
    return main(["train", recipe_file, "--train", str(folder), "--val", str(folder), "--out", str(out),
                 "--batch-size", "4", "--optimizer", "adamw", "--lr", "0.003", "--workers", "0", *extra])  # fmt: skip


@pytest.fixture
def recipe_file(tmp_path, small_recipe):
    import yaml

    path = tmp_path / "r.yaml"
    data = small_recipe.model_dump(mode="json")
    data["model"]["weights"] = None
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_train_learns_and_writes_a_loadable_checkpoint(tmp_path, recipe_file, tiny_folder):
    out = tmp_path / "trained.pth"
    assert _train(recipe_file, tiny_folder, out, "--epochs", "6", "--seed", "1") == 0
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["epoch"] == 6 and len(ckpt["history"]) == 6
    assert ckpt["history"][-1]["loss"] < ckpt["history"][0]["loss"]
    assert state_path(out).is_file() and not list(tmp_path.glob(".*tmp*"))
    from deploy import recipe as recipes

    spec = recipes.load(recipe_file).model.model_copy(update={"weights": str(out)})
    models.build(spec)  # a `deploy train` checkpoint is a valid --weights


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, small_recipe, tiny_folder):
    """Ctrl-C in epoch 3 leaves epoch 2's checkpoint valid; --resume then ends where an uninterrupted run does."""
    from deploy.recipe import TrainConfig
    from deploy.train import fit, image_folder, train_transform

    cfg = TrainConfig(epochs=3, batch_size=4, optimizer="sgd", lr=0.01, workers=0, seed=3)
    data = image_folder(tiny_folder, train_transform(small_recipe.preprocess, cfg.augment), 3, "training")
    ce = torch.nn.CrossEntropyLoss()
    steps = {"n": 0}

    def interrupting(logits, x, y):
        steps["n"] += 1
        if steps["n"] > 2 * 3:  # 3 steps per epoch: stop in the first step of epoch 3
            raise KeyboardInterrupt
        return ce(logits, y)

    def fresh():
        torch.manual_seed(0)
        return models.architecture(small_recipe.model)

    ref = fit(fresh(), data, cfg, lambda l, x, y: ce(l, y), out=tmp_path / "ref.pth")
    out = tmp_path / "trained.pth"
    with pytest.raises(KeyboardInterrupt):
        fit(fresh(), data, cfg, interrupting, out=out)
    assert torch.load(out, weights_only=True)["epoch"] == 2
    resumed = fit(fresh(), data, cfg, lambda l, x, y: ce(l, y), out=out, resume=True)
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in ref], rel=1e-5)
    a = torch.load(tmp_path / "ref.pth", weights_only=True)["state_dict"]
    b = torch.load(out, weights_only=True)["state_dict"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_resume_without_state_is_a_one_line_error(tmp_path, recipe_file, tiny_folder, capsys):
    assert _train(recipe_file, tiny_folder, tmp_path / "none.pth", "--resume") == 2
    assert "nothing to resume" in capsys.readouterr().err.strip().splitlines()[-1]


def test_build_with_prune_and_distill_reports_every_stage(tmp_path, small_recipe, tiny_folder):
    import yaml

    data = small_recipe.model_dump(mode="json")
    data["verify"]["max_top1_drop"] = None
    data["distill"].update({"epochs": 1, "batch_size": 4})
    data["train"]["workers"] = 0
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    rc = main(["build", str(path), "--prune", "0.3", "--distill", "--train", str(tiny_folder), "--val",
               str(tiny_folder), "--int8", "--out", str(out)])  # fmt: skip
    assert rc == 0
    r = json.loads((out / "report.json").read_text())
    names = [s["name"] for s in r["stages"]]
    assert names.index("prune") < names.index("distill") < names.index("fold_bn")
    rows = {x["stage"]: x for x in r["stages_summary"]}
    assert list(rows) == ["original", "prune", "distill", "fp32 onnx", "int8 onnx"]
    assert rows["prune"]["macs"] < rows["original"]["macs"] and rows["prune"]["params"] < rows["original"]["params"]
    assert rows["fp32 onnx"]["macs"] == rows["distill"]["macs"] == rows["prune"]["macs"]
    # the exported models' rows are verify's own figures, not a second measurement
    assert rows["fp32 onnx"]["top1"] == r["accuracy"]["fp32"]["top1"] and rows["int8 onnx"]["top1"] == r["accuracy"]["int8"]["top1"]
    assert rows["int8 onnx"]["p50_ms"] == r["latency"]["int8"]["p50_ms"]
    assert "## After each stage" in (out / "report.md").read_text()
    again = models.build(small_recipe.model.model_copy(update={"weights": str(out / "model.distilled.pth")}))
    assert sum(p.numel() for p in again.parameters()) == rows["distill"]["params"]


def test_build_with_latency_aware_pruning_reports_the_chosen_widths(tmp_path, small_recipe):
    import yaml

    data = small_recipe.model_dump(mode="json")
    data["verify"]["max_top1_drop"] = None
    # fewer groups to time keeps the test short; half of a group per step saves time well above the noise
    data["prune"].update(protect=["features.[1-7].*"], latency_step=0.5, latency_table=str(tmp_path / "table.json"))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert main(["build", str(path), "--latency-budget", "0.9", "--int8", "--out", str(out)]) == 0
    r = json.loads((out / "report.json").read_text())
    p = r["prune"]
    assert p["mode"] == "latency" and p["latency_ratio"] <= 0.9 and p["steps"]
    assert r["stages_summary"][1]["macs"] == p["after"]["macs"] < p["before"]["macs"]
    md = (out / "report.md").read_text()
    assert "## Latency-aware pruning" in md and f"`{p['steps'][0]['group']}`" in md


def _qat_build(tmp_path, small_recipe, tiny_folder, target: str, mode: str = "on", rc: int = 0, verify=None,
               **qat) -> tuple[Path, dict]:  # fmt: skip
    """`deploy build --int8 --qat MODE` of the small recipe (QAT 1 epoch of 8 images, plus `qat`): (out, report)."""
    import yaml

    data = small_recipe.model_dump(mode="json")
    data["verify"].update(max_top1_drop=None, **(verify or {}))
    data["quantize"]["qat"].update(epochs=1, images=8, batch_size=4, **qat)
    data["train"]["workers"] = 0
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    got = main(["build", str(path), "--int8", "--target", target, "--qat", mode, "--train", str(tiny_folder),
                "--val", str(tiny_folder), "--out", str(out)])  # fmt: skip
    assert got == rc
    return out, json.loads((out / "report.json").read_text())


def test_auto_qat_runs_when_post_training_int8_misses_and_keeps_the_better_model(tmp_path, small_recipe, tiny_folder):
    out, r = _qat_build(tmp_path, small_recipe, tiny_folder, "ort-cpu", mode="auto", rc=1, verify={"min_sqnr_db": 200.0})
    assert r["qat"]["mode"] == "auto" and r["qat"]["reason"].startswith("post-training int8 missed: int8 logit SQNR")
    qat_better = r["qat"]["int8"]["agreement"] >= r["qat"]["ptq"]["agreement"]  # both miss 200 dB: agreement decides
    assert r["qat"].get("kept", "qat") == ("qat" if qat_better else "post-training")
    assert r["accuracy"]["agreement"] == r["qat"]["int8" if qat_better else "ptq"]["agreement"]
    assert not r["passed"] and "min_sqnr_db 200.0" in r["failures"][0]


@pytest.mark.parametrize("target", ["ort-cpu", "tensorrt"])
def test_build_with_qat_quantizes_the_fine_tuned_model(tmp_path, small_recipe, tiny_folder, target):
    from deploy.core.context import PREPARED

    out, r = _qat_build(tmp_path, small_recipe, tiny_folder, target)
    names = [s["name"] for s in r["stages"]]
    assert names.index("quantize") < names.index("qat") < names.index("quantize_qat") < names.index("verify")
    # bias correction for the post-training model only: QAT learned its biases under fake quantization
    assert "bias_correction" in names[: names.index("qat")] and "bias_correction" not in names[names.index("qat") :]
    assert "bias_correction" not in r
    assert len(r["qat"]["history"]) == 1 and r["qat"]["reason"] == "quantize.qat: on"
    assert set(r["qat"]["ptq"]) >= {"agreement", "top1_drop"} and set(r["qat"]["int8"]) >= {"agreement", "top1_drop"}
    # the int8 model is the fine-tuned one: verify's figures are QAT's, against the original fp32 model
    assert r["accuracy"]["agreement"] == r["qat"]["int8"]["agreement"]
    assert r["quantize"]["source"] == PREPARED and (out / PREPARED).is_file()
    assert "- QAT (quantize.qat: on)" in (out / "report.md").read_text()


def test_build_keeps_post_training_int8_when_qat_makes_it_worse(tmp_path, small_recipe, tiny_folder):
    out, r = _qat_build(tmp_path, small_recipe, tiny_folder, "ort-cpu", lr=50.0)  # a step this size wrecks the weights
    assert r["qat"]["int8"]["agreement"] < r["qat"]["ptq"]["agreement"] and r["qat"]["kept"] == "post-training"
    assert r["accuracy"]["agreement"] == r["qat"]["ptq"]["agreement"]  # verify measured the restored model
    assert r["bias_correction"]["layers"] > 0  # the restored model's record
    assert r["quantize"]["source"] != "model.fp32.onnx" or not (out / "model.fp32.prepared.onnx").exists()
    assert any("QAT made int8 worse" in w for w in r["warnings"])
