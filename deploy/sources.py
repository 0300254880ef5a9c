"""The user's own data for a build: a torch Dataset, a DataLoader or any iterable of preprocessed images,
optionally with a transform (as `nncf.Dataset(source, transform_fn)`): calibration images read into memory,
validation ones streamed (deploy.evalset).

An item is an image tensor or array (3, H, W), a batch (N, 3, H, W) as a DataLoader yields, or a tuple/list whose
first element is that and whose second is the label (int, or a tensor of N labels for a batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from .data import CalibrationData, ImageSet, heldout_count
from .errors import DeployError
from .evalset import EvalSet, Item, Unreadable, sample


class Dataset:
    """A data source with a function applied to each item, like NNCF's: `Dataset(loader, lambda b: b[0])`."""

    def __init__(self, source: Iterable, transform: Callable[[Any], Any] | None = None):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        item = self.source[i]  # type: ignore[index]
        return self.transform(item) if self.transform else item

    def __iter__(self) -> Iterator:
        for item in self.source:
            yield self.transform(item) if self.transform else item


def is_folder(source) -> bool:
    from os import PathLike

    return source is None or isinstance(source, (str, PathLike))


def _map_style(source) -> bool:
    """Indexable with a length (a torch map-style Dataset, a list): sampled like a folder, with the seed."""
    import torch

    if isinstance(source, Dataset):
        return _map_style(source.source)
    if isinstance(source, torch.utils.data.DataLoader):
        return False
    return hasattr(source, "__len__") and hasattr(source, "__getitem__")


def _as_array(x, what: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 batch (N, *shape) from one item's input; a one-line error naming the item when it does not fit."""
    import torch

    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim == len(shape):
        x = x[None]
    if x.shape[1:] != shape or not np.issubdtype(x.dtype, np.floating):
        got = f"shape {tuple(x.shape[1:]) if x.ndim == len(shape) + 1 else tuple(x.shape)} {x.dtype}"
        raise DeployError(f"{what}: got {got}, the model takes {shape} float32 (preprocessed and normalized, at the "
                          "recipe's input_size)")  # fmt: skip
    return x.astype(np.float32, copy=False)


def _as_labels(y, n: int, what: str, num_classes: int) -> np.ndarray:
    import torch

    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    labels = np.asarray(y).reshape(-1)
    if labels.size != n or not np.issubdtype(labels.dtype, np.integer):
        raise DeployError(f"{what}: expected {n} integer label(s), got {labels.dtype} of {labels.size}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DeployError(f"{what}: label {int(labels.max() if labels.max() >= num_classes else labels.min())} "
                          f"is outside the model's {num_classes} classes")  # fmt: skip
    return labels.astype(np.int64)


def _split(item) -> tuple[Any, Any]:
    return (item[0], item[1] if len(item) > 1 else None) if isinstance(item, (tuple, list)) else (item, None)


def _labeled(item, where: str, shape: tuple[int, ...], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = _split(item)
    batch = _as_array(x, where, shape)
    if y is None:
        raise DeployError(f"{where}: a labeled set must yield (image, label) pairs")
    return batch, _as_labels(y, len(batch), where, num_classes)


def _failed(what: str, err: Exception) -> str:
    return f"reading {what} failed: {type(err).__name__}: {str(err)[:200]}"


class _UserItems:
    """A map-style labeled source as evalset Items, read in the DataLoader's workers: an item that does not fit
    (or raises) becomes the one-line error naming it."""

    def __init__(self, source, indices: list[int], shape: tuple[int, ...], num_classes: int):
        self.source, self.indices, self.shape, self.num_classes = source, indices, shape, num_classes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> Item:
        where = f"validation item {self.indices[k]}"
        try:
            return (k, *_labeled(self.source[self.indices[k]], where, self.shape, self.num_classes))
        except DeployError as err:
            return Unreadable(k, str(err))
        except Exception as err:  # noqa: BLE001 - the user's dataset or transform raised
            return Unreadable(k, _failed(where, err))


def evaluation(source, shape: tuple[int, ...], num_classes: int, *, limit: int | None = None, seed: int = 0,
               workers: int | None = None) -> EvalSet:  # fmt: skip
    """The user's labeled validation source, streamed: a map-style one through our DataLoader (`limit` images
    drawn with `seed`), others iterated as they are (their first `limit` images)."""
    mapping = f"labels from {type(source.source if isinstance(source, Dataset) else source).__name__}"
    if _map_style(source):
        total = len(source)
        indices = sample(total, limit, seed)
        sampled = {"limit": limit, "seed": seed, "of": total} if len(indices) < total else None
        return EvalSet(_UserItems(source, indices, shape, num_classes), what="validation", labeled=True,
                       workers=workers, class_mapping=mapping, sampled=sampled)  # type: ignore[arg-type]  # fmt: skip

    def iterate(batch: int) -> Iterator[Item]:
        n = 0
        for k, item in enumerate(source):
            try:
                x, y = _labeled(item, f"validation item {k}", shape, num_classes)
            except DeployError:
                raise
            except Exception as err:  # noqa: BLE001 - the user's transform raised
                raise DeployError(_failed(f"validation item {k}", err)) from None
            x, y = (x, y) if limit is None else (x[: limit - n], y[: limit - n])
            yield k, x, y
            n += len(x)
            if limit is not None and n >= limit:
                return

    return EvalSet(None, what="validation", labeled=True, iterate=iterate, class_mapping=mapping,
                   sampled={"limit": limit, "first": True} if limit else None)  # fmt: skip


def read(source, what: str, shape: tuple[int, ...], *, indices: list[int] | None = None,
         limit: int | None = None) -> ImageSet:  # fmt: skip
    """Read `source` (the items at `indices`, else the first `limit` images) into memory (calibration)."""
    inputs, n = [], 0
    items = iter(source) if indices is None else (source[i] for i in indices)
    try:
        for k, item in enumerate(items):
            batch = _as_array(_split(item)[0], f"{what} item {indices[k] if indices else k}", shape)
            inputs.append(batch)
            n += len(batch)
            if limit is not None and n >= limit:
                break
    except DeployError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's dataset or transform raised
        raise DeployError(_failed(what, err)) from None
    if not n:
        raise DeployError(f"{what} yielded no images")
    return ImageSet(np.concatenate(inputs)[:limit], [])


def calibration(source, shape: tuple[int, ...], samples: int, seed: int, heldout: int) -> CalibrationData:
    """Calibration images (and held-out ones when `heldout` > 0) from a user's data source. Map-style sources are
    sampled with `seed` exactly as a folder is (deploy.data.calibration_data); others give their first images."""
    name = type(source.source if isinstance(source, Dataset) else source).__name__
    if _map_style(source):
        total = len(source)
        order = np.random.default_rng(seed).permutation(total)
        n_hold = heldout_count(total, samples, heldout, "the calibration data")
        calib = read(source, "calibration", shape, indices=sorted(order[n_hold : n_hold + samples].tolist()))
        held = read(source, "held-out", shape, indices=sorted(order[:n_hold].tolist())) if n_hold else None
    else:  # no random access: the first images are held out, the next ones calibrate
        first = read(source, "calibration", shape, limit=samples + heldout)
        total = None
        n_hold = heldout_count(len(first), samples, heldout, "the calibration data")
        calib = ImageSet(first.inputs[n_hold : n_hold + samples], [])
        held = ImageSet(first.inputs[:n_hold], []) if n_hold else None
    manifest = {"source": f"python: {name}", "builtin": False, "seed": seed, "available": total,
                "requested": samples, "used": len(calib), "skipped": [], "files": [],
                "heldout": len(held) if held else 0}  # fmt: skip
    return CalibrationData(calib, held, manifest)


def training(source, recipe):
    """Training images for distillation and QAT: a folder (augmented as the recipe's distill stage says), or the
    user's map-style torch Dataset (or a DataLoader over one) of (augmented image tensor, label)."""
    import torch

    if is_folder(source):
        from .train import image_folder, train_transform

        return image_folder(source, train_transform(recipe.preprocess, recipe.distill.augment), None, "training")
    if isinstance(source, torch.utils.data.DataLoader):
        source = source.dataset
    if not _map_style(source):
        raise DeployError("train must be a folder or a map-style torch Dataset (or DataLoader over one) of "
                          "(image tensor, label)")  # fmt: skip
    return source
