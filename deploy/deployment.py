"""The deployment a build recommends on this CPU: each precision at each thread count up to the cores, on ONNX
Runtime's CPU provider and, when the build verified the model on it, OpenVINO's; all timed in alternating rounds;
the (runtime, precision, threads) row with the lowest batch-1 latency and the one with the highest throughput,
and each model's session start-up (load + first inference)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .runtimes.base import Runtime, interleaved_times
from .runtimes.openvino import RUNTIME as OPENVINO
from .runtimes.ort import OrtCpu

ORT = "onnxruntime-cpu"
# ONNX Runtime, then fewer threads, are preferred when within this fraction of the fastest: no extra dependency, and
# the cores left serve other work (two sessions of one model differ by up to ~1.5% here, and rounds on a shared
# machine by more)
NEAR = 0.05


def thread_counts(most: int) -> list[int]:
    """1, 2, 4, ... below `most`, and `most`."""
    return sorted({2**k for k in range(most.bit_length()) if 2**k < most} | {most})


def _load(runtime: str, model: Path, threads: int) -> Runtime:
    if runtime == OPENVINO:
        from .runtimes.openvino import OpenVinoCpu

        return OpenVinoCpu(model, threads)
    return OrtCpu(model, threads)


def _start(runtime: str, model: Path, threads: int, shape: tuple[int, ...]) -> tuple[Runtime, float]:
    start = time.perf_counter()
    rt = _load(runtime, model, threads)
    rt.infer(np.zeros((1, *shape), np.float32))
    return rt, time.perf_counter() - start


def startup_key(runtime: str, precision: str) -> str:
    return precision if runtime == ORT else f"{precision} on {runtime}"


def measure(models: dict[tuple[str, str], Path], shape: tuple[int, ...], batch: int, most_threads: int,
            runs: int) -> dict:  # fmt: skip
    """Batch-1 time and batch-`batch` throughput of every (runtime, precision) model at every thread count, all in
    alternating rounds (`runs` batch-1 runs per row and round, fastest of 10 rounds; throughput from the fastest of
    3 rounds), and start-up seconds per model at `most_threads`."""
    counts = thread_counts(most_threads)
    rows, runtimes, startup = [], [], {}
    for (runtime, precision), path in models.items():
        for threads in counts:
            rt, seconds = _start(runtime, path, threads, shape)
            rows.append((runtime, precision, threads))
            runtimes.append(rt)
            if threads == most_threads:
                startup[startup_key(runtime, precision)] = round(seconds, 4)
    one = interleaved_times(runtimes, shape, 1, rounds=10, runs=runs)
    many = interleaved_times(runtimes, shape, batch, rounds=3, runs=1)
    grid = [{"runtime": r, "precision": p, "threads": t, "batch1_ms": round(float(a.min()) * 1e3, 4),
             "throughput_ips": round(batch / float(b.min()), 2)}
            for (r, p, t), a, b in zip(rows, one, many)]  # fmt: skip
    return {"grid": grid, "batch": batch, "startup_s": startup,
            "timed": f"alternating rounds over every row: batch 1 fastest of 10 rounds x {runs} runs, batch {batch} "
                     "fastest of 3 rounds; start-up = session load + first inference, in a process with the runtime "
                     "loaded"}  # fmt: skip


def best(rows: list[dict], key: str) -> dict:
    """The row best on `key` (batch1_ms: least; throughput_ips: most); among the rows of its precision within NEAR
    of it, ONNX Runtime's (the runtime every install has) before another's, then the one with the fewest threads."""
    sign = 1 if key == "batch1_ms" else -1
    top = min(rows, key=lambda g: sign * g[key])
    near = [g for g in rows
            if g["precision"] == top["precision"] and sign * g[key] <= sign * top[key] * (1 + sign * NEAR)]
    return min(near, key=lambda g: (g["runtime"] != ORT, g["threads"]))


def fastest_ms(grid: list[dict], precision: str) -> float:
    """The fastest batch-1 ms of `precision` on ONNX Runtime (what the int8-vs-fp32 decision compares)."""
    return min(g["batch1_ms"] for g in grid if (g["runtime"], g["precision"]) == (ORT, precision))
