"""Streaming evaluation (deploy.evalset): the images flow through a DataLoader in fixed order, equal to the
in-memory preprocessing for any number of workers; unreadable files are skipped and counted; a user's item that
does not fit is a one-line error naming it; a build's peak memory does not grow with the number of images."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from deploy import data, models, recipe, sources
from deploy.errors import DeployError
from deploy.evalset import EvalSet


@pytest.fixture
def pre() -> data.Preprocessor:
    return data.Preprocessor(recipe.load("mobilenet_v3_small").preprocess)


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_images_equal_the_in_memory_preprocessing(imagenet_sample, pre, workers):
    val = data.labeled_set(imagenet_sample / "val", pre, 1000, limit=70, seed=3, workers=workers)
    x, y = val.load(batch=16)
    paths = [Path(p) for p in val.names]
    expected, kept, skipped = data.preprocess(paths, pre, "validation")
    assert len(paths) == 70 and not skipped and np.array_equal(x, expected)
    synsets = {s: i for i, s in enumerate(data.imagenet_synsets())}
    assert y.tolist() == [synsets[p.parent.name] for p in paths]
    again = data.labeled_set(imagenet_sample / "val", pre, 1000, limit=70, seed=3, workers=1)
    assert again.names == val.names and val.sampled["of"] > 70  # the seeded sample does not depend on workers


def test_unreadable_files_are_skipped_and_counted_across_workers(small_val, pre):
    for name in ("a/0-broken.jpg", "b/zz-empty.png", "c/bad.webp"):
        (small_val / name).write_bytes(b"\xff\xd8 not an image" if "broken" in name else b"")
    val = data.labeled_set(small_val, pre, 3, workers=2)
    batches = list(val.batches(2, "test"))
    assert sum(len(x) for x, _ in batches) == len(val) == 5
    assert sorted(val.skipped) == sorted(str(small_val / n) for n in ("a/0-broken.jpg", "b/zz-empty.png", "c/bad.webp"))
    assert val.labels.tolist() == [0, 0, 1, 1, 2]


def _pairs(n: int, bad: int | None = None) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(3, 16, 16 if i != bad else 15, generator=g), i % 3) for i in range(n)]


@pytest.mark.parametrize("form", ["map-style", "iterable"])
def test_a_user_item_that_does_not_fit_is_a_one_line_error_naming_it(form):
    items = _pairs(12, bad=7)
    source = items if form == "map-style" else (item for item in items)
    val = sources.evaluation(source, (3, 16, 16), 3, workers=2)
    with pytest.raises(DeployError, match=r"^validation item 7: got shape \(3, 16, 15\) float32, the model takes") as err:
        val.load(batch=4)
    assert "\n" not in str(err.value)


def test_a_user_dataset_that_raises_is_reported_with_its_index():
    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            if i == 4:
                raise KeyError("no such record")
            return torch.zeros(3, 8, 8), 0

    with pytest.raises(DeployError, match=r"^reading validation item 4 failed: KeyError: 'no such record'$"):
        sources.evaluation(Broken(), (3, 8, 8), 2, workers=1).load(batch=2)


def test_user_sources_stream_with_a_limit():
    items = _pairs(40)
    full = sources.evaluation(items, (3, 16, 16), 3, workers=0)
    x, y = full.load(batch=8)
    assert np.array_equal(x, np.stack([t.numpy() for t, _ in items])) and y.tolist() == [i % 3 for i in range(40)]
    some = sources.evaluation(items, (3, 16, 16), 3, limit=10, seed=1, workers=2)
    xs, _ = some.load(batch=4)
    assert len(xs) == 10 and some.sampled == {"limit": 10, "seed": 1, "of": 40}
    first = sources.evaluation(iter(items), (3, 16, 16), 3, limit=10)
    assert np.array_equal(first.load(batch=4)[0], x[:10])


def test_head_and_arrays():
    x = np.random.default_rng(0).standard_normal((9, 3, 4, 4)).astype(np.float32)
    s = EvalSet.arrays(x)
    got, labels = s.head(5, batch=2)
    assert np.array_equal(got, x[:5]) and labels is None and s.labels is None


def _peak_rss_kb(cmd: list[str]) -> int:
    """The largest peak RSS among the processes `cmd` ran (the build and its decoding workers), in kB."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


def test_a_builds_peak_memory_does_not_grow_with_the_validation_images(cifar10, tmp_path):
    """500 vs 3,000 CIFAR-10 test images at 112 px, fp32 + int8: held in memory, the extra 2,500 would add
    ~375 MB (1.5x that at the stacking peak); streamed, the peaks are within the issue's 10%."""
    torch.manual_seed(0)
    r = recipe.override(recipe.load("mobilenet_v3_small"), {
        "model.num_classes": 10, "preprocess.resize": 112, "preprocess.input_size": 112, "quantize.enabled": True,
        "quantize.calibration.samples": 32, "verify.latency.runs": 3, "verify.latency.warmup": 1,
        "verify.latency.batch": 2, "verify.max_top1_drop": None, "verify.workers": 2,
        "model.weights": str(tmp_path / "w.pth")})  # fmt: skip
    torch.save(models.architecture(r.model).state_dict(), tmp_path / "w.pth")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(r.model_dump(mode="json")))
    calib = tmp_path / "calib"
    calib.mkdir()
    for p in sorted((cifar10 / "train" / "airplane").iterdir())[:40]:
        shutil.copy(p, calib / p.name)
    peaks = {}
    for n in (500, 3000):
        out = tmp_path / f"build-{n}"
        peaks[n] = _peak_rss_kb([sys.executable, "-m", "deploy", "build", str(tmp_path / "recipe.yaml"), "--calib",
                                 str(calib), "--val", str(cifar10 / "test"), "--val-limit", str(n), "--out", str(out)])  # fmt: skip
        report = json.loads((out / "report.json").read_text())
        assert report["validation"]["evaluated"] == n and report["validation"]["sampled"]["limit"] == n
        assert report["accuracy"]["compared"] == n
    assert peaks[3000] < 1.10 * peaks[500], peaks  # measured: 1.04 and 1.09 GB (3,000 the lower)
