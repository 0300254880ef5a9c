import shutil

import numpy as np
import pytest

from deploy import data, recipe
from deploy.errors import DeployError


@pytest.fixture
def pre():
    return data.Preprocessor(recipe.override(recipe.load("mobilenet_v2"), {"preprocess.input_size": 32, "preprocess.resize": 36}).preprocess)


def test_synset_folders_map_to_the_imagenet_index_even_when_few_classes_are_present(tmp_path, skimage_photos, pre):
    synsets = data.imagenet_synsets()
    assert len(synsets) == 1000 and synsets[0] == "n01440764"
    for synset in ("n01440764", "n15075141"):  # first and last class
        (tmp_path / synset).mkdir()
        shutil.copy(skimage_photos / "chelsea.png", tmp_path / synset / "x.png")
    x, y = data.labeled_set(tmp_path, pre, 1000).load()
    assert y.tolist() == [0, 999] and x.shape == (2, 3, 32, 32)


def test_other_folder_names_are_numbered_in_sorted_order(small_val, pre):
    assert data.labeled_set(small_val, pre, 3).load()[1].tolist() == [0, 0, 1, 1, 2]


def test_class_count_mismatch_is_explained(small_val, pre):
    with pytest.raises(DeployError, match="3 class folders but the model has 10 classes"):
        data.labeled_set(small_val, pre, 10)


def test_unreadable_images_are_skipped_and_counted(small_val, pre):
    (small_val / "c" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    s = data.labeled_set(small_val, pre, 3)
    assert len(s) == 6  # before a pass: the files
    x, y = s.load()
    assert len(s) == len(x) == len(y) == 5 and s.skipped == [str(small_val / "c" / "broken.jpg")]


def test_no_readable_image_is_an_error(tmp_path, pre):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"nope")
    with pytest.raises(DeployError, match="none of the 1 calibration images could be read"):
        data.calibration_data(tmp_path, pre, 8, 0, 0)


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_missing_or_empty_directory_is_an_error(tmp_path, pre, make):
    root = tmp_path / "calib"
    if make == "empty":
        root.mkdir()
    with pytest.raises(DeployError, match="not found" if make == "missing" else "holds no images"):
        data.calibration_data(root, pre, 8, 0, 0)


def test_calibration_sampling_is_seeded_nested_and_keeps_heldout_apart(small_val, pre):
    a = data.calibration_data(small_val, pre, 3, seed=1, heldout=2)
    b = data.calibration_data(small_val, pre, 3, seed=1, heldout=2)
    assert a.calib.files == b.calib.files and np.array_equal(a.calib.inputs, b.calib.inputs)
    assert len(a.calib) == 3 and len(a.heldout) == 2
    assert not set(a.calib.files) & set(a.heldout.files)
    assert [f["path"] for f in a.manifest["files"]] == [str(p.relative_to(small_val)) for p in map(__import__("pathlib").Path, a.calib.files)]
    assert all(len(f["sha256"]) == 64 for f in a.manifest["files"])


def test_preprocessing_matches_torchvision_weights_transforms(skimage_photos):
    import torchvision
    from PIL import Image

    pre = data.Preprocessor(recipe.load("mobilenet_v3_small").preprocess)
    tv = torchvision.models.MobileNet_V3_Small_Weights.DEFAULT.transforms()
    img = Image.open(skimage_photos / "chelsea.png").convert("RGB")
    assert np.abs(pre(img) - tv(img).numpy()).max() < 1e-5


def test_builtin_set_is_real_photos_with_heldout_views(pre):
    d = data.calibration_data(None, pre, 256, 0, heldout=64)
    images = data.builtin_manifest()["images"]
    assert d.manifest["builtin"] and len(d.calib) == 12 * sum(not i.get("heldout") for i in images)
    assert len(d.heldout) == 12 * sum(bool(i.get("heldout")) for i in images)
    assert float(d.calib.inputs.std()) > 0.1  # real pictures, not constants
    few = data.calibration_data(None, pre, 10, 0, heldout=0)
    assert len(few.calib) == 10 and few.heldout is None
