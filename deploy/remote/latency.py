"""Timing for the latency-aware pruning search on a device over SSH (prune.latency_on): one temporary folder on
the device for the whole search, each candidate model copied once, each step's candidates timed in one round
trip by device_runner.py --time (the build's own interleaved timing code, deploy/runtimes/base.py)."""

from __future__ import annotations

import hashlib
import tempfile
from contextlib import ExitStack
from pathlib import Path

from ..recipe import DeviceConfig
from ..stages.prune.timing import onnx_bytes, time_floor
from . import ssh
from .verify import RUNNER, TIMING, remote_folder, runner

SEARCH_TIMEOUT_S = 24 * 3600  # the whole search; each copy and run has the device's own timeout


class RemoteTimer:
    """The latency search's cost on a device (as LocalTimer's here): `load(model)` names a model on the device;
    `best_ms(names, rounds, runs)` times them there, `sessions` ONNX Runtime sessions each on one thread, and
    returns each model's sessions' fastest batch-1 times (ms)."""

    unit, floor = "latency", staticmethod(time_floor)

    def __init__(self, device: DeviceConfig, input_size: int, sessions: int):
        self.device, self.size, self.sessions = device, input_size, sessions
        self.link = ssh.Ssh(ssh.parse(device.url), SEARCH_TIMEOUT_S, Path(device.ssh_config) if device.ssh_config
                            else None, device.accept_new_host_key)  # fmt: skip
        self.name = f"onnxruntime-cpu on {self.link.device.host}"
        self._stack = ExitStack()
        self._local = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="edge-deploy-latency-")))
        try:
            self.remote = self._stack.enter_context(remote_folder(self.link, device.python))
            self.link.copy([RUNNER, TIMING], self.remote, device.timeout)
        except BaseException:
            self._stack.close()
            raise
        self._pending: list[Path] = []
        self._known: set[str] = set()
        self.environment: dict | None = None

    def load(self, model) -> str:
        onnx = onnx_bytes(model, self.size)
        name = hashlib.sha256(onnx).hexdigest()[:20] + ".onnx"
        if name not in self._known:
            (self._local / name).write_bytes(onnx)
            self._pending.append(self._local / name)
            self._known.add(name)
        return name

    def best_ms(self, names: list[str], rounds: int, runs: int) -> list[list[float]]:
        if self._pending:  # the step's new candidates, in one copy
            self.link.copy(self._pending, self.remote, self.device.timeout)
            for path in self._pending:
                path.unlink()
            self._pending = []
        args = ["--time", ",".join(names), "--sessions", str(self.sessions), "--rounds", str(rounds),
                "--runs", str(runs), "--threads", "1"]  # fmt: skip
        result = runner(self.link, self.device.python, self.remote, args, self.device.timeout, last=False)
        self.environment = result["environment"]
        best = result["best_ms"]
        return [best[i : i + self.sessions] for i in range(0, len(best), self.sessions)]

    def close(self) -> None:
        self._stack.close()
