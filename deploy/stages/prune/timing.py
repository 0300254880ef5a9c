"""Batch-1 timing of the latency search's candidate models on this machine (LocalTimer) and what the on-device
timer (deploy/remote/latency.py) shares with it: the export and the least saving that counts."""

from __future__ import annotations

import tempfile
from pathlib import Path

from torch import nn

from ...recipe import ExportConfig
from ...runtimes.base import interleaved_best_ms
from ...runtimes.ort import OrtCpu
from ..export_onnx import export


ROUNDS = 10  # whole-model timing: alternating rounds of the models compared


def onnx_bytes(model: nn.Module, input_size: int) -> bytes:
    """`model` exported as the build would (unsimplified: the search times many candidates)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "candidate.onnx"
        export(model, path, ExportConfig(simplifier="none"), input_size)
        return path.read_bytes()


def time_floor(current: float, spread: float) -> float:
    """A saving counts when it exceeds the spread of the current model's sessions and 0.5% of its latency: two
    sessions of one model differ by up to 1.5% here (see stages/prune/latency.py)."""
    return max(spread, 0.005 * current)


class LocalTimer:
    """Batch-1 timing on this machine: `sessions` ONNX Runtime sessions of each model, one thread each. A search
    cost: `load(model)` gives a handle, `best_ms(handles, rounds, runs)` each one's sessions' fastest times (ms),
    `floor(current, spread)` the least saving that counts."""

    name, unit, floor = "onnxruntime-cpu on this machine", "latency", staticmethod(time_floor)

    def __init__(self, input_size: int, sessions: int):
        self.size, self.sessions = input_size, sessions

    def load(self, model: nn.Module) -> list[OrtCpu]:
        onnx = onnx_bytes(model, self.size)
        return [OrtCpu(onnx, threads=1) for _ in range(self.sessions)]

    def best_ms(self, models: list[list[OrtCpu]], rounds: int, runs: int) -> list[list[float]]:
        """Each model's sessions' fastest batch-1 times (ms), all timed in alternating rounds."""
        best = interleaved_best_ms([s for m in models for s in m], (3, self.size, self.size), 1, rounds, runs)
        return [best[i : i + self.sessions] for i in range(0, len(best), self.sessions)]

    def close(self) -> None:
        pass
