"""The images a build is judged on (--val, or the held-out calibration images), streamed in batches.

A torch DataLoader decodes them in worker processes and in a fixed order, so no stage holds them all (the
50,000 ImageNet validation images need the memory of a few batches) and no figure depends on the number of
workers. Unreadable files are skipped and counted; a user's item that does not fit is a one-line error naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import torch

from .console import progress
from .errors import DeployError
from .runtimes.ort import default_threads


class Unreadable(NamedTuple):
    """An item that gave no image: skipped and counted (`error` None), or the one-line error to stop with."""

    index: int
    error: str | None = None


Item = tuple[int, np.ndarray, np.ndarray] | Unreadable  # (index, images (n, 3, H, W), labels (n,)) or a miss


class _Arrays(torch.utils.data.Dataset):
    def __init__(self, inputs: np.ndarray, labels: np.ndarray):
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> Item:
        return i, self.inputs[i : i + 1], self.labels[i : i + 1]


def _collate(items: list[Item]):
    """One batch: the images and labels of the readable items (torch tensors travel from the workers in shared
    memory), and the misses."""
    good = [it for it in items if not isinstance(it, Unreadable)]
    missed = [it for it in items if isinstance(it, Unreadable)]
    if not good:
        return None, None, missed
    x, y = (torch.from_numpy(np.concatenate([g[k] for g in good])) for k in (1, 2))
    return x, y, missed


class EvalSet:
    """The items of `dataset` (a torch Dataset of Items, read in worker processes) or, for a source without
    random access, those `iterate(batch)` yields. After a full pass, `labels` (of the images that were read, in
    order), `skipped` and `count` describe what was evaluated; every pass reads the same images."""

    def __init__(self, dataset: torch.utils.data.Dataset | None, *, what: str, labeled: bool,
                 workers: int | None = None, names: list[str] | None = None,
                 iterate: Callable[[int], Iterator[Item]] | None = None, class_mapping: str | None = None,
                 classes: list[str] | None = None, sampled: dict | None = None):  # fmt: skip
        self.dataset, self.iterate, self.what, self.labeled = dataset, iterate, what, labeled
        self.n = None if dataset is None else len(dataset)
        # decode processes: ours (not the source's), by default one per core this process may use
        self.workers = 0 if iterate else default_threads() if workers is None else workers
        self.names = names  # what to call item i in `skipped` (file paths)
        self.class_mapping, self.classes = class_mapping, classes  # labeled folders: how folders became classes
        self.sampled = sampled  # verify.val_limit: {"limit", "seed", "of"}
        self._labels: np.ndarray | None = None
        self.skipped: list[str] = []
        self.count: int | None = None

    @classmethod
    def arrays(cls, inputs: np.ndarray, labels: np.ndarray | None = None, what: str = "held-out") -> EvalSet:
        """Images already in memory (the held-out calibration images)."""
        y = np.full(len(inputs), -1, np.int64) if labels is None else labels
        return cls(_Arrays(inputs, y), what=what, labeled=labels is not None, workers=0)

    def __len__(self) -> int:
        """Images evaluated (after a pass), else items to read."""
        return self.count if self.count is not None else self.n or 0

    @property
    def labels(self) -> np.ndarray | None:
        if not self.labeled:
            return None
        if self._labels is None:
            raise RuntimeError("EvalSet.labels is known after a full pass over the images")
        return self._labels

    def _loader(self, batch: int) -> Iterator:
        if self.iterate is not None:
            for item in self.iterate(batch):
                yield _collate([item])
            return
        workers = min(self.workers, max(1, (self.n + batch - 1) // batch))
        yield from torch.utils.data.DataLoader(
            self.dataset, batch_size=batch, shuffle=False, num_workers=workers, collate_fn=_collate,
            prefetch_factor=2 if workers else None,
        )  # fmt: skip

    def batches(self, batch: int, description: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(images, labels) batches of the readable images, in order; labels are -1 for an unlabeled set."""
        skipped, labels, count = [], [], 0
        with progress(description, self.n) as advance:
            for x, y, missed in self._loader(batch):
                for m in missed:
                    if m.error:
                        raise DeployError(m.error)
                    skipped.append(self.names[m.index] if self.names else f"{self.what} item {m.index}")
                advance(len(missed) + (0 if x is None else len(x)))
                if x is None:
                    continue
                count += len(x)
                labels.append(y.numpy())
                yield x.numpy(), labels[-1]
        if not count:
            raise DeployError(f"none of the {self.n or ''} {self.what} images could be read"
                              + (f" (first: {skipped[0]})" if skipped else ""))  # fmt: skip
        self._labels, self.skipped, self.count = np.concatenate(labels), skipped, count

    def head(self, n: int, batch: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
        """The first `n` readable images (and labels) in memory: the sensitivity and mixed-precision subsets."""
        xs, ys, have = [], [], 0
        for x, y in self.batches(batch, f"Reading {min(n, self.n or n)} {self.what} images"):
            xs.append(x[: n - have])
            ys.append(y[: n - have])
            have += len(xs[-1])
            if have >= n:
                break
        return np.concatenate(xs), np.concatenate(ys) if self.labeled else None

    def load(self, batch: int = 64) -> tuple[np.ndarray, np.ndarray | None]:
        """All images (and labels) in memory: for benchmarks and tools on small sets, never for a build."""
        xs = [x for x, _ in self.batches(batch, f"Reading {self.what}")]
        return np.concatenate(xs), self.labels


def sample(n: int, limit: int | None, seed: int) -> list[int]:
    """The indices of a `limit`-image sample of `n` items drawn with `seed`, in order (all when no limit)."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, limit, replace=False).tolist())
