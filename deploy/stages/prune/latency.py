"""Latency-aware pruning, NetAdapt-style (Yang et al. 2018, arXiv:1804.03230), measured on ORT's CPU provider
of this machine or of a device over SSH (prune.latency_on: deploy/remote/latency.py).

Each step proposes one candidate per Torch-Pruning dependency group: the group's least important `latency_step`
of channels removed (kept width a multiple of round_to). Each candidate's latency is predicted from NetAdapt's
per-layer look-up table (table.py: each layer configuration timed once, kept across runs) and every step is
confirmed by timing the unpruned and the pruned model whole, which also re-anchors the table's predictions; with
prune.latency_table None, or on a device, every candidate is exported and timed whole on ONNX Runtime instead. Its
accuracy cost is estimated without labels: the KL divergence of its predictions from the unpruned model's on the
calibration images, after re-estimating BatchNorm statistics (adapt_bn: the cheap stand-in for NetAdapt's short
fine-tune, as in EagleEye). The step keeps the
candidate with the least KL increase per ms saved; steps repeat until the latency (predicted and measured) is
within `latency_budget` of the unpruned model's.

Whole-model timing on a shared machine: batch 1 on one ORT thread; the unpruned, current and candidate models run in
alternating rounds (`interleaved_best_ms`) so load from other processes hits all of them alike, and each model
is the fastest of its runs; a round lasts at least ROUND_MS per model, so a brief disturbance cannot cover all
of a small model's rounds. Two ORT sessions of the same model differ by up to ~1.5% (measured here:
placement in memory), so every model is loaded twice and its figure is the mean of both; a candidate counts
only when it saves more than the two sessions of the current model differ by, and more than 0.5%. When no
candidate counts, every one is timed again with twice the rounds before the search gives up.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ... import macs
from ...console import info
from ...errors import DeployError
from ...recipe import PruneConfig
from ...train import torch_threads
from .groups import adapt_bn, importance, protected_layers, traceable_shuffle, widths
from .table import TableCost
from .timing import ROUNDS, LocalTimer

# The accuracy proxy (BN re-estimation and KL) runs on calibration images worth this many pixels, per candidate
# (128 images at 64x64, the 32-image minimum at 224x224), which bounds its cost at large inputs.
PROXY_PIXELS, MIN_PROXY_IMAGES = 128 * 64 * 64, 32
MIN_RUNS, SESSIONS = 10, 2  # timing: runs per model and round (timing.ROUNDS, interleaved); sessions per model
ROUND_MS = 20.0  # at least this long per model and round: 31 runs a round for mobilenet_v3_small at 64 px
MAX_STEPS = 200


class MacsCost:
    """MACs (deploy.macs: torch.utils.flop_counter) as the search's cost, in millions: exact, so any saving counts."""

    name, unit = "MACs", "macs"

    def __init__(self, input_size: int):
        self.size = input_size

    def load(self, model: nn.Module) -> float:
        return macs.count(model, self.size)["macs"] / 1e6

    def best_ms(self, models: list[float], rounds: int, runs: int) -> list[list[float]]:
        return [[m] for m in models]

    def floor(self, current: float, spread: float) -> float:
        return 0.0

    def close(self) -> None:
        pass


@dataclass
class _Proposal:
    group: str  # the group's root layer, as Torch-Pruning names it
    layers: list[str]  # the Conv/Linear layers whose outputs shrink
    channels: tuple[int, int]  # before, after
    idxs: list[int]  # the channels removed, least important first
    shapes: tuple  # weight shapes of every layer the group touches: what its latency saving depends on


class LatencySearch:
    """The NetAdapt loop, one `step()` at a time; `model` is the current pruned model (a copy of the input).

    A group's saving depends on the shapes of the layers it touches, so it is timed again only when one of them
    changed (NetAdapt's look-up table, filled by measuring whole models); the accuracy proxy is recomputed
    lazily: for the candidates whose earlier score could still make them the best (`step`). `timer` is the cost:
    latency here (LocalTimer) or on a device (remote.latency.RemoteTimer), or MACs (MacsCost)."""

    def __init__(self, model: nn.Module, cfg: PruneConfig, input_size: int, data, timer):
        self.cfg, self.size, self.timer = cfg, input_size, timer
        self.unit = "ms" if timer.unit == "latency" else "mmacs"  # of the step records' saved and kl_per
        n = max(MIN_PROXY_IMAGES, PROXY_PIXELS // input_size**2)
        # channels_last: 1.7x faster forward passes than NCHW for these depthwise-separable nets on x86 (oneDNN)
        self.images = torch.as_tensor(data[:n]).contiguous(memory_format=torch.channels_last)
        self.model = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
        self.model.requires_grad_(True)  # Torch-Pruning proposes no group for frozen weights (a distillation teacher)
        with torch.no_grad():
            self.teacher = F.log_softmax(self.model(self.images), 1)
        self.kl = 0.0
        self.steps: list[dict] = []
        self._saved: dict[str, tuple[tuple, float, float]] = {}  # group -> (shapes, ms saved, noise floor)
        self._scores: dict[tuple, float] = {}  # (group, shapes) -> KL increase per unit saved when last scored
        self.base_sessions = self.sessions = self._load(self.model)
        base_ms = min(timer.best_ms([self.base_sessions], 1, MIN_RUNS)[0])
        self.runs = max(MIN_RUNS, math.ceil(ROUND_MS / base_ms))

    def _load(self, model: nn.Module):
        """The cost's handle for `model` (sessions here, a file on the device, its MACs)."""
        return self.timer.load(model)

    def _time(self, models: list, rounds: int = ROUNDS) -> list[tuple[float, float]]:
        """(mean, spread) over each model's sessions of its fastest batch-1 run, all timed interleaved (ms)."""
        return [(sum(b) / len(b), max(b) - min(b)) for b in self.timer.best_ms(models, rounds, self.runs)]

    def latency(self) -> tuple[float, float]:
        """Batch-1 latency (ms) of the unpruned and the current model, timed together."""
        (base, _), (current, _) = self._time([self.base_sessions, self.sessions])
        return base, current

    def _kl(self, model: nn.Module) -> float:
        """KL(unpruned || model) on the proxy images after re-estimating `model`'s BatchNorm statistics on them."""
        model.to(memory_format=torch.channels_last)
        adapt_bn(model, self.images.split(64))
        model.eval()
        with torch.no_grad():
            logp = F.log_softmax(model(self.images), 1)
        return F.kl_div(logp, self.teacher, log_target=True, reduction="batchmean").item()

    def _dependency_graph(self, model: nn.Module):
        import torch_pruning as tp

        with traceable_shuffle():
            return tp.DependencyGraph().build_dependency(model, torch.zeros(1, 3, self.size, self.size))

    def _proposals(self) -> list[_Proposal]:
        """One proposal for every group of the current model that can still shrink by a step."""
        cfg, model = self.cfg, self.model
        dg = self._dependency_graph(model)
        modules = dict(model.named_modules())
        names = {m: n for n, m in modules.items()}
        if cfg.importance == "taylor":  # gradients of the loss against the model's own predictions (no labels)
            logits = model(self.images[:32])
            F.cross_entropy(logits, logits.argmax(1)).backward()
        score = importance(cfg.importance)
        out = []
        ignored = [modules[n] for n in protected_layers(model, cfg)]
        for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Linear)):
            scores = score(group)
            width = len(group[0].idxs)
            keep = max(cfg.round_to, cfg.round_to * int(width * (1 - cfg.latency_step) / cfg.round_to))
            if scores is None or keep >= width:
                continue
            touched = {d.target.module for d, _ in group if isinstance(d.target.module, nn.Module)}
            layers = sorted(names[m] for m in touched if isinstance(m, (nn.Conv2d, nn.Linear)) and any(
                d.target.module is m and dg.is_out_channel_pruning_fn(d.handler) for d, _ in group))  # fmt: skip
            weighted = [m for m in touched if getattr(m, "weight", None) is not None]
            shapes = tuple(sorted((names[m], tuple(m.weight.shape)) for m in weighted))
            idxs = torch.argsort(scores)[: width - keep].tolist()
            out.append(_Proposal(names[group[0].dep.target.module], layers, (width, keep), idxs, shapes))
        model.zero_grad(set_to_none=True)
        return out

    def _pruned(self, p: _Proposal) -> nn.Module:
        model = copy.deepcopy(self.model)
        dg = self._dependency_graph(model)
        module = model.get_submodule(p.group)
        dg.get_pruning_group(module, dg.get_pruner_of_module(module).prune_out_channels, p.idxs).prune()
        return model

    def _time_savings(self, proposals: list[_Proposal], rounds: int) -> dict[str, tuple[nn.Module, object]]:
        """Time the proposals whose layers changed since they were last timed, against the current model."""
        built = {}
        for p in proposals:
            if self._saved.get(p.group, (None,))[0] != p.shapes:
                model = self._pruned(p)
                built[p.group] = (model, self._load(model))
        (current, spread), *timed = self._time([self.sessions] + [s for _, s in built.values()], rounds)
        floor = self.timer.floor(current, spread)
        shapes = {p.group: p.shapes for p in proposals}
        for group, (ms, _) in zip(built, timed):
            self._saved[group] = (shapes[group], current - ms, floor)
        return built

    def step(self, rounds: int = ROUNDS) -> dict | None:
        """Prune the group that costs least KL per ms saved; its record, or None when no group saves measurable time."""
        start = time.perf_counter()
        proposals = self._proposals()
        built = self._time_savings(proposals, rounds)
        # Lazy greedy: a proposal's KL cost per unit saved was measured on an earlier (less pruned) model and mostly
        # grows as the model shrinks, so proposals are scored afresh in the order of their earlier scores (new ones
        # first) until no earlier score can beat the best fresh one.
        counting = [p for p in proposals if self._saved[p.group][1] > self._saved[p.group][2]]
        counting.sort(key=lambda p: self._scores.get((p.group, p.shapes), -math.inf))
        best, scored = None, 0
        for p in counting:
            if best is not None and self._scores.get((p.group, p.shapes), -math.inf) >= best[0]:
                break
            saved = self._saved[p.group][1]
            model = built[p.group][0] if p.group in built else self._pruned(p)
            kl = self._kl(model)
            score = self._scores[(p.group, p.shapes)] = (kl - self.kl) / saved
            scored += 1
            if best is None or score < best[0]:
                best = (score, p, model, saved, kl)
        if best is None and rounds == ROUNDS:
            # No saving counts: those timed at earlier steps may be stale and this timing may have been disturbed,
            # so time every group again, with twice the rounds
            self._saved.clear()
            return self.step(2 * rounds)
        if best is None:
            return None
        score, chosen, model, saved, kl = best
        sessions = built[chosen.group][1] if chosen.group in built else self._load(model)
        self.model, self.sessions, self.kl = model, sessions, kl
        record = {"group": chosen.group, "layers": chosen.layers, "channels": list(chosen.channels),
                  f"{self.unit}_saved": round(saved, 4), "kl": round(kl, 5), f"kl_per_{self.unit}": round(score, 4),
                  "proposals": len(proposals), "timed": len(built), "scored": scored,
                  "measurable": sum(self._saved[p.group][1] > self._saved[p.group][2] for p in proposals),
                  "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
        self.steps.append(record)
        return record

    def close(self) -> None:
        self.timer.close()


def _search(model: nn.Module, cfg: PruneConfig, input_size: int, data, cost, budget: float, what: str):
    """The search's steps until `cost` of the current model is at most `budget` of the unpruned model's; the pruned
    model (BatchNorm re-estimated on `data`), the search, and the unpruned and final costs."""
    if data is None or len(data) == 0:
        raise DeployError(f"prune ({what}) needs calibration images (its accuracy proxy runs on them)")
    # one forward pass of 64 images took 2.3 s on 2 OpenMP threads and 0.03 s on 1 on this 2-core machine shared
    # with other jobs, and idle OpenMP workers spin into ORT's timing
    confirm = isinstance(cost, TableCost)  # predicted: each step is confirmed by timing the models whole
    with torch_threads(1):
        try:
            search = LatencySearch(model, cfg, input_size, data, cost)
        except BaseException:
            cost.close()
            raise
        try:
            while True:
                base, now = search.latency()
                # the table's prediction, confirmed by timing the unpruned and the current model whole
                measured = cost.confirm(search.base_sessions, search.sessions, search.runs) if confirm else None
                ratio = measured[1] / measured[0] if measured else now / base
                if search.steps:
                    last = search.steps[-1]
                    last[f"{cost.unit}_ratio"] = round(ratio, 4)  # measured after the step
                    if measured:
                        last["predicted_ratio"] = round(now / base, 4)
                    info(f"  prune step {len(search.steps)}: {last['group']} {last['channels'][0]} -> "
                         f"{last['channels'][1]}, {what} {ratio:.3f} of unpruned (target {budget:.3f})"
                         + (f", predicted {now / base:.3f}" if measured else ""))  # fmt: skip
                # budgets are below 1: before any step, a ratio within one means timing noise (the same model timed
                # twice; it once read <= 0.9 on a busy CI machine, and the search returned the unpruned model)
                if search.steps and now <= budget * base and ratio <= budget:
                    break
                if len(search.steps) >= MAX_STEPS or search.step() is None:
                    raise DeployError(f"prune: {what} budget {budget:g} not reached: {ratio:.2f} of the unpruned "
                                      f"{what} after {len(search.steps)} steps, no group left whose pruning saves "
                                      f"measurable {what}")  # fmt: skip
        finally:
            search.close()
        pruned = search.model.to(memory_format=torch.contiguous_format)
        adapt_bn(pruned, (data[i : i + 64] for i in range(0, len(data), 64)))
        pruned.eval()
    predicted = (base, now)
    if measured:
        base, now = measured
    return pruned, search, base, now, predicted


def _record(model: nn.Module, pruned: nn.Module, cfg: PruneConfig, input_size: int, search, data) -> dict:
    before, after = macs.count(model, input_size), macs.count(pruned, input_size)
    return {"proxy": f"KL(unpruned || pruned) on {len(search.images)} calibration images after BatchNorm "
                     "re-estimation",
            "kl": search.kl, "steps": search.steps, "bn_adapted_on": len(data), "importance": cfg.importance,
            "round_to": cfg.round_to, "before": before, "after": after,
            "macs_reduction": 1 - after["macs"] / before["macs"], "params_reduction": 1 - after["params"] / before["params"],
            "protected": protected_layers(model, cfg), "widths": widths(pruned)}  # fmt: skip


def prune_latency(model: nn.Module, cfg: PruneConfig, input_size: int, data) -> tuple[nn.Module, dict]:
    """Prune a copy of `model` step by step until its batch-1 ORT CPU latency (here, or on cfg.latency_on) is
    cfg.latency_budget of the unpruned model's, measured; `data` (N x 3 x H x W calibration images) drives the
    accuracy proxy and the final BatchNorm re-estimation. Returns the pruned model and its record (latency
    before/after, the steps, the widths)."""
    start = time.perf_counter()
    if cfg.latency_on is not None:
        from ...remote.latency import RemoteTimer

        info(f"  timing the candidates on {cfg.latency_on.url}")
        timer = RemoteTimer(cfg.latency_on, input_size, SESSIONS)
    elif cfg.latency_table is not None:
        timer = TableCost(input_size, Path(cfg.latency_table).expanduser(), SESSIONS)
    else:
        timer = LocalTimer(input_size, SESSIONS)
    pruned, search, base_ms, ms, predicted = _search(model, cfg, input_size, data, timer, cfg.latency_budget, "latency")
    record = {"mode": "latency", "latency_budget": cfg.latency_budget, "latency_step": cfg.latency_step,
        "latency_before_ms": round(base_ms, 4), "latency_after_ms": round(ms, 4),
        "latency_ratio": round(ms / base_ms, 4),
        "latency_measured": f"{timer.name}: batch 1, 1 thread, fastest of {ROUNDS} rounds x {search.runs} runs "
                            f"interleaved, mean of {SESSIONS} sessions",
        **({"device": getattr(timer, "environment", None)} if cfg.latency_on else {}),
        **({"table": _table_record(timer, search.sessions, predicted, ms)} if isinstance(timer, TableCost) else {}),
        **_record(model, pruned, cfg, input_size, search, data), "seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip
    return pruned, record


def _table_record(cost: TableCost, final, predicted: tuple[float, float], measured_ms: float) -> dict:
    """The look-up table's figures: its file, layers, and its predictions of the final latency against the measured:
    from the step before (what the search used) and from the unpruned model's scale alone."""
    t, unpruned = cost.table, cost.from_unpruned(final)
    return {"path": str(t.path), "runtime": t.key, "layers": len(t.ms), "timed_this_run": t.timed,
            "scale": round(cost.scale, 4), "predicted_after_ms": round(predicted[1], 4),
            "prediction_error": round(predicted[1] / measured_ms - 1, 4),
            "predicted_from_unpruned_ms": round(unpruned, 4),
            "prediction_error_from_unpruned": round(unpruned / measured_ms - 1, 4)}  # fmt: skip


def prune_macs_kl(model: nn.Module, cfg: PruneConfig, input_size: int, data) -> tuple[nn.Module, dict]:
    """Remove cfg.ratio of the MACs the way the latency search removes time (prune.scope kl): each step prunes
    the group whose candidate costs least KL to the unpruned model per MAC saved, across all groups."""
    start = time.perf_counter()
    pruned, search, *_ = _search(model, cfg, input_size, data, MacsCost(input_size), 1 - cfg.ratio, "MACs")
    record = {"mode": "ratio", "scope": "kl", "by": "macs", "ratio": cfg.ratio, "latency_step": cfg.latency_step,
              **_record(model, pruned, cfg, input_size, search, data),
              "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    return pruned, record
