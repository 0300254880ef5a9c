"""Image folders, ImageNet synset labels, evaluation preprocessing and calibration sampling."""

from __future__ import annotations

import hashlib
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from .console import track, warn
from .errors import DeployError
from .evalset import EvalSet, Item, Unreadable, sample
from .recipe import Preprocess

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
SYNSET = re.compile(r"n\d{8}")


@dataclass
class ImageSet:
    """Preprocessed images in memory (N, 3, H, W float32: the calibration and held-out ones) and what could not
    be read. Validation images are streamed instead (deploy.evalset)."""

    inputs: np.ndarray
    files: list[str]
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.inputs)


class Preprocessor:
    """The model's evaluation transform: resize the short side, center-crop, scale to [0, 1], normalize. One
    implementation, in Pillow + numpy, for builds and serving (deploy/serving/preprocess.py); it equals
    torchvision's eval transforms on PIL images (tests/serving/test_serving_no_torch.py)."""

    def __init__(self, cfg: Preprocess):
        from .serving.preprocess import Preprocess as Transform

        self.cfg = cfg
        self.transform = Transform(cfg.resize, cfg.input_size, cfg.interpolation, tuple(cfg.mean), tuple(cfg.std))

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.transform(image)


def list_images(root: Path, what: str) -> list[Path]:
    """All images under `root`, recursively, in a stable order."""
    if not root.is_dir():
        raise DeployError(f"{what} directory not found: {root}")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise DeployError(f"{what} directory {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


def read_image(path: Path) -> Image.Image | None:
    """The decoded image, or None when unreadable or over the image limits (deploy.images)."""
    from .serving.images import Limits, open_image

    limits = Limits.from_env()  # a bad setting is an error, not a reason to skip every image
    try:
        return open_image(path, str(path), limits)
    except DeployError:
        return None


def preprocess(paths: list[Path], pre: Preprocessor, what: str) -> tuple[np.ndarray, list[int], list[str]]:
    """Preprocess `paths`; returns the batch, the indices that were read, and the unreadable files."""
    arrays, kept, skipped = [], [], []
    with ThreadPoolExecutor(max_workers=4) as pool:
        for i, (path, img) in enumerate(
            track(zip(paths, pool.map(read_image, paths)), f"Reading {what}", total=len(paths))
        ):
            if img is None:
                skipped.append(str(path))
            else:
                arrays.append(pre(img))
                kept.append(i)
    if not arrays:
        raise DeployError(f"none of the {len(paths)} {what} images could be read (first: {paths[0]})")
    return np.stack(arrays), kept, skipped


class Files(Dataset):
    """Image files through the evaluation transform `pre`, with their labels: what the DataLoader workers read."""

    def __init__(self, paths: list, labels: np.ndarray, pre: Preprocessor):
        self.paths, self.labels, self.pre = paths, labels, pre

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Item:
        img = read_image(self.paths[i])
        return Unreadable(i) if img is None else (i, self.pre(img)[None], self.labels[i : i + 1])


def imagenet_synsets() -> list[str]:
    """The 1000 ILSVRC-2012 synset IDs in class-index order."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def class_names(num_classes: int, class_dirs: list[str] | None = None) -> list[str]:
    """Human-readable class names: ImageNet descriptions for 1000 classes, else the folder names."""
    if num_classes == 1000:
        from timm.data import ImageNetInfo

        return [d.split(",")[0] for d in ImageNetInfo().label_descriptions()]
    return class_dirs or [str(i) for i in range(num_classes)]


def labeled_set(root: Path, pre: Preprocessor, num_classes: int, *, limit: int | None = None, seed: int = 0,
                workers: int | None = None) -> EvalSet:  # fmt: skip
    """A labeled folder (one subfolder per class), streamed. Synset-named folders map to ImageNet's 1000-class
    index, so a folder may cover only some classes; other names are numbered in sorted order. `limit`: a
    sample of that many images drawn with `seed`."""
    paths = list_images(root, "validation")
    dirs = sorted({p.parent.name for p in paths if p.parent != root})
    if not dirs or any(p.parent == root for p in paths):
        raise DeployError(f"validation directory {root} must hold one subfolder of images per class")
    if num_classes == 1000 and all(SYNSET.fullmatch(d) for d in dirs):
        index = {s: i for i, s in enumerate(imagenet_synsets())}
        unknown = [d for d in dirs if d not in index]
        if unknown:
            raise DeployError(f"{root}: folder {unknown[0]} is not an ILSVRC-2012 synset")
        mapping = f"{len(dirs)} folders named by ImageNet synset, mapped to the ILSVRC-2012 class index"
        classes = class_names(1000)
    elif len(dirs) == num_classes:
        index = {d: i for i, d in enumerate(dirs)}
        shown = ", ".join(f"{d}={i}" for d, i in list(index.items())[:12]) + (", ..." if len(dirs) > 12 else "")
        mapping = f"{len(dirs)} folders numbered in sorted order: {shown}"
        classes = dirs
    else:
        raise DeployError(
            f"{root} has {len(dirs)} class folders but the model has {num_classes} classes; "
            "name folders by ImageNet synset (n01440764, ...) or give exactly one folder per class"
        )
    total = len(paths)
    paths = [paths[i] for i in sample(total, limit, seed)]
    labels = np.array([index[p.parent.name] for p in paths], dtype=np.int64)
    sampled = {"limit": limit, "seed": seed, "of": total} if len(paths) < total else None
    return EvalSet(Files(paths, labels, pre), what="validation", labeled=True, workers=workers,
                   names=[str(p) for p in paths], class_mapping=mapping, classes=classes, sampled=sampled)  # fmt: skip


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class CalibrationData:
    calib: ImageSet
    heldout: ImageSet | None  # for agreement/SQNR when there is no labeled validation set
    manifest: dict


def heldout_count(available: int, samples: int, heldout: int, what: str) -> int:
    """How many of `available` calibration images are held out to compare int8 with fp32 (no validation set)."""
    n = min(heldout, max(available - samples, available // 5))
    if heldout and not n:
        raise DeployError(f"{what} has {available} images: too few to hold any out for comparing int8 with fp32; "
                          "add images (5 or more) or pass a validation set (--val DIR, val=)")  # fmt: skip
    return n


def calibration_data(root: Path | None, pre: Preprocessor, samples: int, seed: int, heldout: int) -> CalibrationData:
    """Sample `samples` images from `root` with `seed` (and `heldout` other ones when > 0).

    With no `root`, use the built-in set of public-domain photos (see calibration/builtin.yaml).
    """
    if root is None:
        return _builtin(pre, samples, seed, heldout > 0)
    paths = list_images(root, "calibration")
    order = np.random.default_rng(seed).permutation(len(paths))
    n_hold = heldout_count(len(paths), samples, heldout, f"calibration directory {root}")
    hold, calib = order[:n_hold], order[n_hold : n_hold + samples]
    calib_paths = sorted(paths[i] for i in calib)
    inputs, kept, skipped = preprocess(calib_paths, pre, "calibration")
    held = None
    if n_hold:
        hold_paths = sorted(paths[i] for i in hold)
        h_inputs, h_kept, h_skipped = preprocess(hold_paths, pre, "held-out")
        held = ImageSet(h_inputs, [str(hold_paths[i]) for i in h_kept], h_skipped)
    manifest = {
        "source": str(root.resolve()),
        "builtin": False,
        "seed": seed,
        "available": len(paths),
        "requested": samples,
        "used": len(kept),
        "skipped": skipped,
        "files": [{"path": str(calib_paths[i].relative_to(root)), "sha256": sha256(calib_paths[i])} for i in kept],
        "heldout": len(held) if held else 0,
    }
    return CalibrationData(ImageSet(inputs, [str(calib_paths[i]) for i in kept], skipped), held, manifest)


def builtin_manifest() -> dict:
    return yaml.safe_load(resources.files("deploy").joinpath("calibration", "builtin.yaml").read_text())


def _views(img: Image.Image) -> list[Image.Image]:
    """Twelve views of one photo: whole and mirrored, and five 60% crops with their mirrors."""
    w, h = img.size
    cw, ch = int(w * 0.6), int(h * 0.6)
    corners = [(0, 0), (w - cw, 0), (0, h - ch), (w - cw, h - ch), ((w - cw) // 2, (h - ch) // 2)]
    views = [img] + [img.crop((x, y, x + cw, y + ch)) for x, y in corners]
    return views + [ImageOps.mirror(v) for v in views]


def _builtin(pre: Preprocessor, samples: int, seed: int, with_heldout: bool) -> CalibrationData:
    """Calibrate on photos that scikit-image ships (public domain / CC0), twelve views each;
    `samples` of the views are drawn with `seed` when there are more."""
    manifest = builtin_manifest()
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    sets: dict[str, list[np.ndarray]] = {"calib": [], "heldout": []}
    for entry in manifest["images"]:
        path = folder / entry["file"]
        if not path.is_file():
            raise DeployError(f"built-in calibration image {path} is missing; pass --calib DIR")
        if sha256(path) != entry["sha256"]:
            warn(f"built-in calibration image {entry['file']} differs from its manifest checksum")
        with Image.open(path) as img:
            views = [pre(v) for v in _views(img.convert("RGB"))]
        sets["heldout" if entry.get("heldout") else "calib"].extend(views)
    views = np.stack(sets["calib"])
    if samples < len(views):
        views = views[np.sort(np.random.default_rng(seed).choice(len(views), samples, replace=False))]
    calib = ImageSet(views, [e["file"] for e in manifest["images"] if not e.get("heldout")])
    held = None
    if with_heldout:
        held = ImageSet(np.stack(sets["heldout"]), [e["file"] for e in manifest["images"] if e.get("heldout")])
    summary = {"source": f"built-in: {manifest['description']}", "builtin": True, "seed": seed, "used": len(calib),
               "files": manifest["images"], "heldout": len(held) if held else 0}  # fmt: skip
    return CalibrationData(calib, held, summary)
