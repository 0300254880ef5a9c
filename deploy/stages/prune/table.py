"""NetAdapt's latency look-up table (Yang et al. 2018, section 3.2): every convolution and linear layer configuration
(kind, channels, kernel, stride, padding, groups, input size) timed once on its own as a one-node ONNX model on ORT's
CPU provider, batch 1, one thread, and a model's latency predicted as the sum over its layers, scaled to the latest
whole-model measurement (TableCost). The table is kept in a JSON file keyed by runtime and CPU, so later runs reuse it.

A lone layer's time includes the layout reorders ORT puts around a lone NCHWc convolution, and the model's other
nodes (activations, adds, pooling) are not in the table: the scale covers both, on average. Alternatives measured
worse on pruned mobilenet_v2 (docs/pruning.md): the lone layer's kernel time alone (ORT lays out and pads a lone
convolution differently), or each layer's time in ORT's profile of a whole model holding it (profiling overhead).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ...console import warn
from ...runtimes.base import interleaved_best_ms
from ...runtimes.ort import OrtCpu
from .timing import ROUNDS, LocalTimer

LAYER_ROUNDS, LAYER_RUNS = 10, 20  # a new layer's figure: fastest of 10 alternating rounds x 20 runs
# A predicted saving counts above this fraction of the current latency: below it, within a layer figure's variation
FLOOR = 0.002
SCHEMA = 1


def layer_configs(model: nn.Module, input_size: int) -> dict[str, tuple]:
    """Module name -> (kind, in, out, kernel h, kernel w, stride h, stride w, pad h, pad w, dilation h, dilation w,
    groups, input h, input w) of each Conv2d and Linear that runs in one batch-1 forward pass."""
    import torch

    out: dict[str, tuple] = {}
    names = {m: n for n, m in model.named_modules()}

    def hook(m, args, _):
        x = args[0]
        if isinstance(m, nn.Conv2d):
            pad = m.padding
            if isinstance(pad, str):  # "valid" or "same" (stride 1, odd kernels in practice)
                pad = tuple(0 if pad == "valid" else d * (k - 1) // 2 for k, d in zip(m.kernel_size, m.dilation))
            out[names[m]] = ("conv", m.in_channels, m.out_channels, *m.kernel_size, *m.stride, *pad, *m.dilation,
                             m.groups, x.shape[-2], x.shape[-1])  # fmt: skip
        else:
            out[names[m]] = ("linear", m.in_features, m.out_features, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size))
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return out


def layer_onnx(config: tuple) -> tuple[bytes, tuple[int, ...]]:
    """A one-node ONNX model of the layer (random weights, with bias) and its input shape."""
    kind, cin, cout, kh, kw, sh, sw, ph, pw, dh, dw, groups, h, w = config
    rng = np.random.default_rng(0)
    if kind == "conv":
        shape = (1, cin, h, w)
        weight = rng.standard_normal((cout, cin // groups, kh, kw), dtype=np.float32) * 0.1
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[kh, kw], strides=[sh, sw],
                                pads=[ph, pw, ph, pw], dilations=[dh, dw], group=groups)  # fmt: skip
    else:
        shape = (1, cin)
        weight = rng.standard_normal((cout, cin), dtype=np.float32) * 0.1
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
    graph = helper.make_graph(
        [node], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.zeros(cout, np.float32), "b")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString(), shape


def time_layers(configs: list[tuple]) -> list[float]:
    """Batch-1 ms of each layer alone on one ORT thread: its fastest run, the layers timed in alternating rounds."""
    sessions, shapes = [], []
    for c in configs:
        model, shape = layer_onnx(c)
        sessions.append(OrtCpu(model, threads=1))
        shapes.append(shape[1:])
    return interleaved_best_ms(sessions, shapes, 1, LAYER_ROUNDS, LAYER_RUNS)


def runtime_key() -> str:
    """What a table's figures hold for: the runtime, its version and settings, and the CPU."""
    import onnxruntime

    from ...core.report import environment

    return f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider, 1 thread, {environment(1)['cpu']}"


class LatencyTable:
    """Layer configuration -> ms, read from and saved to `path` (None: this run only); filled when a model needs a
    configuration it lacks."""

    def __init__(self, path: Path | None):
        self.path, self.key = path, runtime_key()
        self.tables = self._read() if path is not None and path.is_file() else {}
        self.ms: dict[str, float] = self.tables.setdefault(self.key, {})
        self.timed = 0  # layers this run timed (the others came from the file)

    def _read(self) -> dict:
        try:
            content = json.loads(self.path.read_text())
            if content.get("schema") != SCHEMA or not isinstance(content.get("tables"), dict):
                raise ValueError(f"schema {content.get('schema')!r}")
            tables = {str(k): {str(c): float(v) for c, v in t.items()} for k, t in content["tables"].items()}
        except (OSError, ValueError, TypeError, AttributeError) as err:
            warn(f"latency table {self.path} not read ({type(err).__name__}: {err}): layers are timed again, for this "
                 "run only (the file is left as it is)")  # fmt: skip
            self.path = None
            return {}
        return tables

    def predict(self, model: nn.Module, input_size: int) -> float:
        """Sum of the table's ms over `model`'s layers, timing those not in it."""
        keys = [json.dumps(c) for c in layer_configs(model, input_size).values()]
        missing = sorted(set(keys) - set(self.ms))
        if missing:
            self.ms.update(zip(missing, time_layers([tuple(json.loads(k)) for k in missing])))
            self.timed += len(missing)
            self._save()
        return sum(self.ms[k] for k in keys)

    def _save(self) -> None:
        """Written to a temporary file and renamed over the table: a reader never sees half of it."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():  # what another run added meanwhile
            for key, table in self._read().items():
                self.tables[key] = {**table, **self.tables.get(key, {})}
            self.ms = self.tables[self.key]
            if self.path is None:  # damaged meanwhile: left as it is
                return
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps({"schema": SCHEMA, "tables": self.tables}, indent=1) + "\n")
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)


class _Candidate:
    """A model the search considers: its table sum, and its sessions and measured ms once it has been timed whole."""

    def __init__(self, model: nn.Module, table_ms: float):
        self.model, self.table_ms = model, table_ms
        self.sessions, self.measured = None, None


class TableCost:
    """The latency search's cost from the look-up table (prune.latency_table): a candidate's latency is predicted
    without exporting it, `confirm` times the unpruned and the current model whole (LocalTimer, in alternating
    rounds) after each step. The prediction is the candidate's table sum x the current model's measured / table ms,
    from the latest confirmation: its error is then one step's. Scaled once from the unpruned model instead, the
    errors add up over the steps in one direction (the search picks the savings the table overestimates: measured
    in docs/pruning.md); that prediction is kept for the record (`from_unpruned`)."""

    name, unit = "onnxruntime-cpu on this machine (per-layer look-up table)", "latency"

    def __init__(self, input_size: int, path: Path | None, sessions: int):
        self.size, self.table, self.timer = input_size, LatencyTable(path), LocalTimer(input_size, sessions)
        self.scale: float | None = None  # measured / table ms of the unpruned model, at the first confirmation
        self.anchor = 1.0  # measured / table ms of the current model, at the latest confirmation

    def load(self, model: nn.Module) -> _Candidate:
        return _Candidate(model, self.table.predict(model, self.size))

    def best_ms(self, models: list[_Candidate], rounds: int, runs: int) -> list[list[float]]:
        return [[m.measured if m.measured is not None else m.table_ms * self.anchor] for m in models]

    def from_unpruned(self, model: _Candidate) -> float:
        """`model`'s ms predicted from the table scaled by the unpruned model alone."""
        return model.table_ms * self.scale

    def floor(self, current: float, spread: float) -> float:
        return FLOOR * current

    def confirm(self, base: _Candidate, current: _Candidate, runs: int) -> tuple[float, float]:
        """Measured batch-1 ms of `base` and `current` (mean of their sessions' fastest runs), timed together."""
        for c in (base, current):
            if c.sessions is None:
                c.sessions = self.timer.load(c.model)
        base.measured, current.measured = (
            sum(b) / len(b) for b in self.timer.best_ms([base.sessions, current.sessions], ROUNDS, runs))
        if self.scale is None:
            self.scale = base.measured / base.table_ms
        self.anchor = current.measured / current.table_ms
        return base.measured, current.measured

    def close(self) -> None:
        pass
