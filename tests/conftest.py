"""Shared fixtures. Real images come from $DEPLOY_DATA (CI: ../shared/data); tests needing them skip without it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from deploy import recipe as recipes

DATA_ENV = "DEPLOY_DATA"
SLOW_ENV = "DEPLOY_SLOW"


def pytest_collection_modifyitems(config, items):
    """Tests marked slow (minutes of training each) run only with DEPLOY_SLOW=1; CI stays within its budget."""
    if os.environ.get(SLOW_ENV) == "1":
        return
    skip = pytest.mark.skip(reason=f"slow (QAT on real data, minutes): set {SLOW_ENV}=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def data_root() -> Path:
    root = os.environ.get(DATA_ENV)
    if not root or not Path(root, "imagenet-sample").is_dir():
        pytest.skip(f"real images not available: set {DATA_ENV} to the shared data folder (holding imagenet-sample/)")
    return Path(root)


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    return data_root() / "imagenet-sample"


@pytest.fixture(scope="session")
def skimage_photos() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


@pytest.fixture
def small_val(tmp_path: Path, skimage_photos: Path) -> Path:
    """A labeled folder of real photos for a 3-class model: class folders a, b, c."""
    root = tmp_path / "val"
    for cls, files in {"a": ["astronaut.png", "chelsea.png"], "b": ["coffee.png", "rocket.jpg"], "c": ["retina.jpg"]}.items():
        (root / cls).mkdir(parents=True)
        for f in files:
            shutil.copy(skimage_photos / f, root / cls / f)
    return root


@pytest.fixture
def small_recipe(tmp_path: Path) -> recipes.Recipe:
    """mobilenet_v3_small with a 3-class head, random weights saved as a checkpoint, 64x64 inputs."""
    torch.manual_seed(0)
    base = recipes.load("mobilenet_v3_small")
    recipe = recipes.override(base, {
        "model.num_classes": 3,
        "preprocess.resize": 72,
        "preprocess.input_size": 64,
        "quantize.calibration.samples": 16,
        "verify.heldout": 8,
        "verify.latency.runs": 5,
        "verify.latency.warmup": 1,
        "verify.latency.batch": 4,
    })  # fmt: skip
    from deploy import models

    model = models.architecture(recipe.model)
    ckpt = tmp_path / "w.pth"
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, ckpt)
    return recipes.override(recipe, {"model.weights": str(ckpt)})


@pytest.fixture(scope="session")
def cifar10(tmp_path_factory) -> Path:
    """CIFAR-10 JPEGs ($DEPLOY_DATA/cifar10-jpeg.tar.gz) extracted once per session: holds train/ and test/."""
    import tarfile

    root = os.environ.get(DATA_ENV)
    tarball = Path(root or "", "cifar10-jpeg.tar.gz")
    if not root or not tarball.is_file():
        pytest.skip(f"CIFAR-10 not available: set {DATA_ENV} to the shared data folder (holding cifar10-jpeg.tar.gz)")
    out = tmp_path_factory.mktemp("cifar10")
    with tarfile.open(tarball) as tar:
        tar.extractall(out, filter="data")
    return out
