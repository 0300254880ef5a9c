"""The figures a build is judged by: logits on a runtime, top-1/top-5, int8-vs-fp32 agreement and SQNR, thresholds."""

from __future__ import annotations

import numpy as np

from .console import track
from .evalset import EvalSet
from .recipe import VerifyConfig
from .runtimes.base import Runtime


def logits_many(runtimes: dict[str, Runtime], images: EvalSet | np.ndarray, batch: int, what: str) -> dict[str, np.ndarray]:
    """Each runtime's logits on `images` (streamed, or an array in memory), decoding each batch once for all."""
    if isinstance(images, np.ndarray):
        chunks = range(0, len(images), batch)
        batches = ((images[i : i + batch], None) for i in track(chunks, what, total=len(chunks)))
    else:
        batches = images.batches(batch, what)
    out: dict[str, list[np.ndarray]] = {name: [] for name in runtimes}
    for x, _ in batches:
        for name, rt in runtimes.items():
            out[name].append(rt.infer(x))
    return {name: np.concatenate(parts) for name, parts in out.items()}


def logits(rt: Runtime, images: EvalSet | np.ndarray, batch: int, what: str) -> np.ndarray:
    return logits_many({"": rt}, images, batch, what)[""]


def predict_fn(rt: Runtime, batch: int):
    """predict(images) -> logits on `rt`, in chunks of `batch`: what a user's evaluate function is given."""

    def predict(images) -> np.ndarray:
        x = np.ascontiguousarray(images.detach().cpu().numpy() if hasattr(images, "detach") else images, np.float32)
        return np.concatenate([rt.infer(x[i : i + batch]) for i in range(0, len(x), batch)])

    return predict


def accuracy(out: np.ndarray, labels: np.ndarray) -> dict:
    """Top-1 / top-5 in percent."""
    top5 = np.argsort(-out, axis=1)[:, :5]
    return {
        "top1": float((top5[:, 0] == labels).mean() * 100),
        "top5": float((top5 == labels[:, None]).any(axis=1).mean() * 100),
        "n": int(len(labels)),
    }


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of `test` against `reference`, in dB."""
    noise = float(((reference - test) ** 2).sum())
    return float("inf") if noise == 0 else float(10 * np.log10(float((reference**2).sum()) / noise))


def compare(fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray | None) -> dict:
    """What int8 costs against fp32 on the same images."""
    out = {
        "agreement": float((fp32.argmax(1) == int8.argmax(1)).mean() * 100),
        "sqnr_db": sqnr_db(fp32, int8),
    }
    if labels is not None:
        a, b = accuracy(fp32, labels), accuracy(int8, labels)
        out.update(fp32=a, int8=b, top1_drop=a["top1"] - b["top1"])
    return out


def missed_thresholds(cfg: VerifyConfig, acc: dict) -> list[str]:
    """One line per recipe threshold that `acc` misses; thresholds without the figure they need are skipped."""
    missed = []
    if cfg.max_top1_drop is not None and "top1_drop" in acc and acc["top1_drop"] > cfg.max_top1_drop:
        missed.append(f"int8 top-1 drop {acc['top1_drop']:.2f} points > max_top1_drop {cfg.max_top1_drop}")
    if cfg.min_agreement is not None and "agreement" in acc and acc["agreement"] < cfg.min_agreement:
        missed.append(f"int8/fp32 top-1 agreement {acc['agreement']:.2f}% < min_agreement {cfg.min_agreement}%")
    if cfg.min_sqnr_db is not None and "sqnr_db" in acc and acc["sqnr_db"] < cfg.min_sqnr_db:
        missed.append(f"int8 logit SQNR {acc['sqnr_db']:.1f} dB < min_sqnr_db {cfg.min_sqnr_db} dB")
    return missed
