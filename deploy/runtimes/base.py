"""One interface for every inference runtime: load an artifact, run a batch, measure latency."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput_ips: float  # images per second at `batch`
    batch: int
    runs: int
    threads: int

    def to_dict(self) -> dict:
        return asdict(self)


class Runtime(ABC):
    """A loaded model on one runtime. Subclasses implement `infer`; timing is shared."""

    name: str
    threads: int

    @abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Logits for an NCHW float32 batch."""

    def benchmark(self, input_shape: tuple[int, ...], batch: int, warmup: int, runs: int) -> Latency:
        """Batch-1 latency percentiles after warm-up, and throughput at `batch`."""
        rng = np.random.default_rng(0)
        one = rng.standard_normal((1, *input_shape), dtype=np.float32)
        many = rng.standard_normal((batch, *input_shape), dtype=np.float32)
        for _ in range(warmup):
            self.infer(one)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            self.infer(one)
            times.append(time.perf_counter() - start)
        ms = np.array(times) * 1e3
        self.infer(many)  # warm-up at the large batch (allocations)
        batch_runs = max(3, -(-runs // batch))  # about as many images as the batch-1 runs
        start = time.perf_counter()
        for _ in range(batch_runs):
            self.infer(many)
        throughput = batch * batch_runs / (time.perf_counter() - start)
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return Latency(
            float(p50), float(p90), float(p99), float(ms.mean()), float(throughput), batch, runs, self.threads
        )


Shape = tuple[int, ...]


def interleaved_times(runtimes: list[Runtime], input_shape: Shape | list[Shape], batch: int, rounds: int = 10,
                      runs: int = 10) -> list[np.ndarray]:
    """Seconds per run of one `batch` on each runtime, measured in alternating rounds; `input_shape` (without
    the batch) is every runtime's, or a list of one per runtime.

    For comparing models on a shared machine: load from other processes comes and goes, and alternating
    rounds expose every model to the same conditions."""
    shapes = input_shape if isinstance(input_shape, list) else [input_shape] * len(runtimes)
    rng = np.random.default_rng(0)
    arrays = {s: rng.standard_normal((batch, *s), dtype=np.float32) for s in dict.fromkeys(map(tuple, shapes))}
    inputs = [arrays[tuple(s)] for s in shapes]
    for rt, x in zip(runtimes, inputs):
        rt.infer(x)  # warm-up: allocations, kernel selection
    times = [[] for _ in runtimes]
    for _ in range(rounds):
        for rt, x, t in zip(runtimes, inputs, times):
            for _ in range(runs):
                start = time.perf_counter()
                rt.infer(x)
                t.append(time.perf_counter() - start)
    return [np.array(t) for t in times]


def interleaved_best_ms(runtimes: list[Runtime], input_shape: Shape | list[Shape], batch: int, rounds: int = 10,
                        runs: int = 10) -> list[float]:
    """The fastest time (ms) of one `batch` on each runtime in `interleaved_times`: the least disturbed run."""
    return [float(t.min()) * 1e3 for t in interleaved_times(runtimes, input_shape, batch, rounds, runs)]
