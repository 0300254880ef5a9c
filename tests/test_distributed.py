"""Training across processes with torchrun (deploy/distributed.py): two processes train like one on the same
global batch, only rank 0 writes, --resume continues exactly, a failing or missing rank ends the job within a
bounded time with a one-line error, and `deploy build` trains distill and QAT on both into one build folder.

The model is a tiny conv net without BatchNorm or dropout, on un-augmented images: then a 2-process step is
the 1-process step on the same global batch up to float summation order (DDP averages the gradients of two
half-batch means: the gradient of the whole batch's mean). Its activation is SiLU, smooth: with ReLU a unit
whose input lies within float error of 0 switched its gradient in one run and not the other, and the weights
parted by 2e-5 within a dozen steps. With SiLU they agree to 5e-8 after 12 steps; atol 1e-5 leaves room and
still catches a wrong gradient scale, a lost or repeated sample, or different batches (another shuffle of the
same data: 2.5e-2). With BatchNorm each process normalizes by its own share's statistics: a real difference,
documented in docs/distributed.md and not held to a tolerance here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import free_port

from deploy.cli import main
from deploy.train import state_path

TINYNET = '''
import torch
from torch import nn


def make(num_classes: int = 4, bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), norm(8), nn.SiLU(), nn.Conv2d(8, 16, 3, 2, 1), norm(16), nn.SiLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
'''

# Each process: a straight 3-epoch run, and one interrupted in the first step of epoch 3 then resumed.
RESUME_SCRIPT = '''
from pathlib import Path

import torch

from deploy import distributed, models
from deploy import recipe as recipes
from deploy.train import fit, image_folder, train_transform

r = recipes.load("r.yaml")
data = image_folder(Path("data"), train_transform(r.preprocess, r.train.augment), 4, "training")
ce = torch.nn.CrossEntropyLoss()
steps = {"n": 0}


def interrupting(logits, x, y):
    steps["n"] += 1
    if steps["n"] > 2 * 4:  # 4 steps per epoch
        raise KeyboardInterrupt
    return ce(logits, y)


with distributed.session(torch.device("cpu")):
    fit(models.architecture(r.model), data, r.train, lambda l, x, y: ce(l, y), out=Path("ref.pth"))
    try:
        fit(models.architecture(r.model), data, r.train, interrupting, out=Path("run.pth"))
    except KeyboardInterrupt:
        pass
    fit(models.architecture(r.model), data, r.train, lambda l, x, y: ce(l, y), out=Path("run.pth"), resume=True)
'''


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """A folder with the tiny net's factory, 64 PNGs (4 classes, 32 px, a colour per class plus noise) and its
    recipe (SGD, cosine, batch 16, 3 epochs, no augmentation); the current folder, for in-process runs."""
    from PIL import Image

    (tmp_path / "tinynet.py").write_text(TINYNET)
    rng = np.random.default_rng(0)
    for c, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True)
        for i in range(16):
            img = np.clip(np.array(colour) + rng.normal(0, 60, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / "data" / f"c{c}" / f"{i:02d}.png")
    recipe = {
        "model": {"name": "tinynet", "source": "python", "factory": "tinynet:make", "num_classes": 4},
        "preprocess": {"resize": 32, "input_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3},
        "train": {"epochs": 3, "batch_size": 16, "optimizer": "sgd", "lr": 0.05, "schedule": "cosine",
                  "augment": "none", "workers": 0, "seed": 0, "label_smoothing": 0.0},
    }  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def _torchrun(cwd: Path, *args: str, env: dict | None = None, timeout: float = 120) -> tuple[int, str, float]:
    """`torchrun --nproc-per-node 2 ARGS` (one thread per process): (exit code, stdout + stderr, seconds)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           *args]  # fmt: skip
    start = time.monotonic()
    p = subprocess.run(cmd, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, capture_output=True,
                       text=True, timeout=timeout)  # fmt: skip
    return p.returncode, p.stdout + p.stderr, time.monotonic() - start


def _one_process_group(monkeypatch) -> None:
    """torchrun's environment for one process (world size 1): the sampler and batches of a torchrun job."""
    for var, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():  # fmt: skip
        monkeypatch.setenv(var, value)


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = (torch.load(p, weights_only=True)["state_dict"] for p in (a, b))
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def test_two_processes_train_like_one_and_only_rank_0_writes(work, capsys):
    """Full-batch steps (the whole 64 images): the same steps as plain one-process `deploy train`, whose
    shuffling (a different sampler) then does not matter."""
    args = ["train", "r.yaml", "--train", "data", "--val", "data", "--batch-size", "64", "--epochs", "4"]
    rc, log, _ = _torchrun(work, "-m", "deploy", *args, "--out", "two.pth")
    assert rc == 0, log
    assert sorted(p.name for p in work.iterdir()) == ["data", "r.yaml", "tinynet.py", "two.pth", "two.pth.train-state"]
    assert log.count("two.pth: 4 epochs") == 1 and log.count(" s, 2 processes)") == 4  # rank 0 alone reports
    assert main([*args, "--out", "one.pth"]) == 0
    assert _max_diff(work / "two.pth", work / "one.pth") < 1e-5
    two, one = (torch.load(work / f"{n}.pth", weights_only=True) for n in ("two", "one"))
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert [h["world_size"] for h in two["history"]] == [2] * 4
    assert [h["loss"] for h in two["history"]] == pytest.approx([h["loss"] for h in one["history"]], rel=1e-5)
    # counts summed over the processes' shares of the validation images: exactly one process's figure
    assert [h["val_top1"] for h in two["history"]] == [h["val_top1"] for h in one["history"]]
    capsys.readouterr()
    assert main([*args, "--out", "two.pth", "--resume"]) == 2  # saved by 2 processes: resume with 2
    assert "saved by a run of 2" in capsys.readouterr().err.strip().splitlines()[-1]


def test_resume_under_ddp_and_the_batches_of_one_process(work, monkeypatch):
    """4 steps an epoch: each process takes every other image of one permutation, so the 2-process run sees
    the global batches of a 1-process torchrun run (world size 1); interrupted and resumed, it ends where the
    uninterrupted run does."""
    (work / "resume.py").write_text(RESUME_SCRIPT)
    rc, log, _ = _torchrun(work, "resume.py")
    assert rc == 0, log
    assert _max_diff(work / "run.pth", work / "ref.pth") < 1e-6
    st = torch.load(state_path(work / "run.pth"), weights_only=True)
    assert st["epoch"] == 3 and st["world_size"] == 2 and len(st["rank_rng"]) == 2
    assert not list(work.glob(".*tmp*"))

    from deploy import models
    from deploy import recipe as recipes
    from deploy.train import fit, image_folder, train_transform

    _one_process_group(monkeypatch)
    r = recipes.load("r.yaml")
    data = image_folder(work / "data", train_transform(r.preprocess, r.train.augment), 4, "training")
    ce = torch.nn.CrossEntropyLoss()
    fit(models.architecture(r.model), data, r.train, lambda l, x, y: ce(l, y), out=work / "one.pth")
    assert _max_diff(work / "ref.pth", work / "one.pth") < 1e-5


def test_a_failing_rank_ends_the_job_in_bounded_time(work):
    """Rank 1's first image is unreadable: it fails with a traceback; rank 0, waiting for its gradients, stops
    with a one-line error (or torchrun ends it first), and torchrun names rank 1."""
    from deploy.train import image_folder

    samples = image_folder(work / "data", None, 4, "training").samples
    first_of_rank_1 = torch.randperm(64, generator=torch.Generator().manual_seed(0))[1].item()  # DistributedSampler
    Path(samples[first_of_rank_1][0]).write_bytes(b"not an image")
    rc, log, seconds = _torchrun(work, "-m", "deploy", "train", "r.yaml", "--train", "data", "--out", "w.pth", timeout=90)
    assert rc != 0 and seconds < 60
    assert "[rank1]:" in log and "UnidentifiedImageError" in log and "rank      : 1" in log
    assert not (work / "w.pth").exists()


def test_missing_ranks_and_uneven_batches_are_one_line_errors(work, monkeypatch, capsys):
    _one_process_group(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")  # rank 1 never comes
    monkeypatch.setenv("DEPLOY_DIST_TIMEOUT", "2")
    start = time.monotonic()
    assert main(["train", "r.yaml", "--train", "data", "--out", "w.pth"]) == 2
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: rank 0 of 2: the other processes did not join at 127.0.0.1:") and "within 2 s" in err
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["train", "r.yaml", "--train", "data", "--out", "w.pth"]) == 2  # 16 images do not split 3 ways
    assert "batch size 16 does not divide among the 3 processes" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (work / "w.pth").exists()


def test_build_distills_and_runs_qat_on_two_processes_into_one_folder(work):
    """Rank 1 trains in distill and QAT and writes nothing: one build folder, no lock or temporary folder left."""
    recipe = yaml.safe_load((work / "r.yaml").read_text())
    recipe["model"]["kwargs"] = {"bn": True}
    recipe.update(distill={"epochs": 1, "batch_size": 16, "augment": "none"},
                  quantize={"calibration": {"samples": 16}, "qat": {"epochs": 1, "images": 32, "batch_size": 16}},
                  verify={"heldout": 8, "max_top1_drop": None, "latency": {"runs": 3, "warmup": 1, "batch": 2}})  # fmt: skip
    (work / "build.yaml").write_text(yaml.safe_dump(recipe))
    (work / "tmp").mkdir()
    rc, log, _ = _torchrun(work, "-m", "deploy", "build", "build.yaml", "--distill", "--int8", "--qat", "on", "--train",
                           "data", "--val", "data", "--out", "out", env={"TMPDIR": str(work / "tmp")})  # fmt: skip
    assert rc == 0, log
    assert [p.name for p in work.iterdir() if p.name.startswith(".") or p.name == "out"] == ["out"]
    assert not list((work / "tmp").glob("edge-deploy-rank*"))
    r = json.loads((work / "out" / "report.json").read_text())
    assert r["distill"]["world_size"] == 2 and r["qat"]["world_size"] == 2
    assert all(h["world_size"] == 2 for h in r["distill"]["history"] + r["qat"]["history"])
    assert log.count("/out/report.md") == 1 and log.count("[distill] done") == 1  # rank 1 reports nothing
