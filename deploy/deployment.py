"""The deployment a build recommends on ONNX Runtime's CPU provider: each precision at each thread count up to the
cores, timed in alternating rounds, the (precision, threads) pair with the lowest batch-1 latency and the one with
the highest throughput, and each precision's session start-up (load + first inference)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .runtimes.base import interleaved_times
from .runtimes.ort import OrtCpu

# A pair with fewer threads is preferred when within this fraction of the fastest: the cores left serve other work
# (two sessions of one model differ by up to ~1.5% here, and rounds on a shared machine by more)
NEAR = 0.05


def thread_counts(most: int) -> list[int]:
    """1, 2, 4, ... below `most`, and `most`."""
    return sorted({2**k for k in range(most.bit_length()) if 2**k < most} | {most})


def _start(model: Path, threads: int, shape: tuple[int, ...]) -> tuple[OrtCpu, float]:
    start = time.perf_counter()
    rt = OrtCpu(model, threads)
    rt.infer(np.zeros((1, *shape), np.float32))
    return rt, time.perf_counter() - start


def measure(models: dict[str, Path], shape: tuple[int, ...], batch: int, most_threads: int, runs: int) -> dict:
    """Batch-1 time and batch-`batch` throughput of every (precision, threads) pair, all in alternating rounds
    (`runs` batch-1 runs per pair and round, fastest of 10 rounds; throughput from the fastest of 3 rounds), and
    start-up seconds per precision at `most_threads`."""
    counts = thread_counts(most_threads)
    pairs, runtimes, startup = [], [], {}
    for precision, path in models.items():
        for threads in counts:
            rt, seconds = _start(path, threads, shape)
            pairs.append((precision, threads))
            runtimes.append(rt)
            if threads == most_threads:
                startup[precision] = round(seconds, 4)
    one = interleaved_times(runtimes, shape, 1, rounds=10, runs=runs)
    many = interleaved_times(runtimes, shape, batch, rounds=3, runs=1)
    grid = [{"precision": p, "threads": t, "batch1_ms": round(float(a.min()) * 1e3, 4),
             "throughput_ips": round(batch / float(b.min()), 2)}
            for (p, t), a, b in zip(pairs, one, many)]  # fmt: skip
    return {"grid": grid, "batch": batch, "startup_s": startup,
            "timed": f"alternating rounds over every pair: batch 1 fastest of 10 rounds x {runs} runs, batch {batch} "
                     "fastest of 3 rounds; start-up = session load + first inference, in a process with onnxruntime "
                     "loaded"}  # fmt: skip


def best(grid: list[dict], precisions: list[str], key: str) -> dict:
    """The pair of `precisions` best on `key` (batch1_ms: least; throughput_ips: most), the one with the fewest
    threads among those within NEAR of it."""
    rows = [g for g in grid if g["precision"] in precisions]
    sign = 1 if key == "batch1_ms" else -1
    top = min(rows, key=lambda g: sign * g[key])
    near = [g for g in rows
            if g["precision"] == top["precision"] and sign * g[key] <= sign * top[key] * (1 + sign * NEAR)]  # fmt: skip
    return min(near, key=lambda g: g["threads"])


def fastest_ms(grid: list[dict], precision: str) -> float:
    return min(g["batch1_ms"] for g in grid if g["precision"] == precision)
