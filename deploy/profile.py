"""`deploy profile`: per-layer parameters, MACs, activation bytes, memory-access cost and measured time share.

Counts come from the PyTorch model as `deploy build` exports it (BatchNorm folded): parameters from the
modules, MACs from `torch.utils.flop_counter` (MACs = FLOPs / 2). Time comes from ONNX Runtime's
profiler on the exported graph; each profiled kernel is attributed to the module whose scope its ONNX
node carries, so the two views can be put side by side.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from .errors import DeployError

BYTES = 4  # fp32
RUNTIME_ROW = "(runtime: layout reorders, copies)"


def profile_target(target: str, input_size: int | None, runs: int, threads: int | None) -> dict:
    """Profile a model name / recipe / timm:<name> (random weights, exported to a temporary ONNX file),
    or a build folder (its recipe's architecture for the counts, its model.fp32.onnx for the time)."""
    from . import models
    from . import recipe as recipes
    from .recipe import ExportConfig
    from .stages import export_onnx, fold_bn

    folder = Path(target)
    if folder.is_dir():
        if not (folder / "report.json").is_file() or not (folder / "model.fp32.onnx").is_file():
            raise DeployError(f"{folder} is not a build folder (no report.json and model.fp32.onnx)")
        r = recipes.validate(json.loads((folder / "report.json").read_text())["recipe"], str(folder / "report.json"))
        if input_size and input_size != r.preprocess.input_size:
            raise DeployError(f"{folder} was exported at {r.preprocess.input_size}px; --input-size cannot change it")
    else:
        r = recipes.load(target)
    size = input_size or r.preprocess.input_size
    model = models.architecture(r.model).eval()  # counts and timing do not depend on the weights' values
    if r.fold_bn.enabled:
        model, _ = fold_bn.fold_batchnorm(model)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = folder / "model.fp32.onnx" if folder.is_dir() else Path(tmp) / "model.onnx"
        if not folder.is_dir():
            export_onnx.export(model, onnx_path, ExportConfig(), size)
        result = profile(model, onnx_path, size, runs, threads)
    result["model"] = r.model.name
    result["onnx"] = str(onnx_path) if folder.is_dir() else "exported for this profile (random weights)"
    return result


def profile(model, onnx_path: Path, input_size: int, runs: int, threads: int | None) -> dict:
    """Per-layer rows, totals and category shares for `model` and its ONNX export `onnx_path`."""
    layers = count_layers(model, input_size)
    times, runtime_info = ort_node_times(onnx_path, input_size, runs, threads)
    modules = dict(model.named_modules())
    for name, t in times.items():
        if name not in layers:
            kind = type(modules[name]).__name__ if name in modules else name if name == RUNTIME_ROW else "(no module)"
            layers[name] = _row(kind, None, 0, 0, 0, 0)
        layers[name]["time_us"] = t["us"]
        layers[name]["onnx_ops"] = sorted(t["ops"])
    total_us = sum(row.get("time_us", 0.0) for row in layers.values())
    total_macs = sum(row["macs"] for row in layers.values())
    rows = []
    for name, row in layers.items():
        row = {"name": name or "(model)", **row}
        row["time_share"] = row.get("time_us", 0.0) / total_us if total_us else 0.0
        row["mac_share"] = row["macs"] / total_macs if total_macs else 0.0
        rows.append(row)
    totals = {
        "params": sum(r["params"] for r in rows),
        "macs": total_macs,
        "activation_bytes": sum(r["activation_bytes"] for r in rows),
        "memory_access_bytes": sum(r["memory_access_bytes"] for r in rows),
        "time_ms_per_run": total_us / 1e3,
    }
    return {"input_size": input_size, "totals": totals, "runtime": runtime_info,
            "categories": _categories(rows), "layers": rows}  # fmt: skip


def _row(kind: str, shape, params: int, macs: int, act: int, mac_bytes: int) -> dict:
    return {"type": kind, "output_shape": shape, "params": params, "macs": macs,
            "activation_bytes": act, "memory_access_bytes": mac_bytes}  # fmt: skip


def count_layers(model, input_size: int) -> dict[str, dict]:
    """Rows keyed by module name: own parameters, own MACs (flop_counter), output shape, bytes at batch 1.

    Memory-access cost follows ShuffleNetV2 (Ma et al. 2018): inputs read + outputs written + weights,
    h·w·(c_in + c_out) + weights for a 1x1 convolution, here in fp32 bytes.
    """
    import torch
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    seen: dict[str, tuple] = {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            y = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(y, torch.Tensor):
                seen[name] = (tuple(y.shape), y.numel(), x.numel() if x is not None else 0)

        return record

    modules = dict(model.named_modules())
    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in handles:
            h.remove()
    root = type(model).__name__
    flops = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}

    def total(name: str) -> int:
        return flops.get(f"{root}.{name}" if name else root, 0)

    rows: dict[str, dict] = {}
    for name, m in modules.items():
        children = [f"{name}.{c}" if name else c for c, _ in m.named_children()]
        own_macs = (total(name) - sum(total(c) for c in children)) // 2
        params = sum(p.numel() for p in m.parameters(recurse=False))
        is_leaf = not children and not isinstance(m, (nn.Identity, nn.Dropout))
        if not (is_leaf and name in seen) and not params and not own_macs:
            continue
        shape, out_numel, in_numel = seen.get(name, (None, 0, 0))
        act = out_numel * BYTES if not children else 0
        rows[name] = _row(_kind(m), shape, params, own_macs, act, (in_numel + out_numel + params) * BYTES if act else 0)
    return rows


def _kind(m) -> str:
    from torch import nn

    if isinstance(m, nn.Conv2d):
        if m.groups > 1 and m.groups == m.in_channels:
            return f"Conv2d dw {m.kernel_size[0]}x{m.kernel_size[1]}"
        return f"Conv2d {m.kernel_size[0]}x{m.kernel_size[1]}" + (f" g{m.groups}" if m.groups > 1 else "")
    return type(m).__name__


def _category(row: dict) -> str:
    kind = row["type"]
    if kind == RUNTIME_ROW:
        return "runtime reorders/copies"
    if kind.startswith("Conv2d dw"):
        return "depthwise conv"
    if kind == "Conv2d 1x1":
        return "pointwise conv"
    if kind.startswith("Conv2d"):
        return "other conv"
    if kind == "Linear":
        return "linear"
    if "Pool" in kind:
        return "pooling"
    return "activations, element-wise, other"


def _categories(rows: list[dict]) -> list[dict]:
    """MAC share vs time share per layer category: where MACs fail to predict latency."""
    out: dict[str, dict] = {}
    for r in rows:
        c = out.setdefault(_category(r), {"category": _category(r), "macs": 0, "mac_share": 0.0, "time_share": 0.0})
        c["macs"] += r["macs"]
        c["mac_share"] += r["mac_share"]
        c["time_share"] += r["time_share"]
    return sorted(out.values(), key=lambda c: -c["time_share"])


def ort_node_times(onnx_path: Path, input_size: int, runs: int, threads: int | None) -> tuple[dict, dict]:
    """Kernel time per module scope over `runs` batch-1 runs after warm-up, with ORT's profiler."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from .runtimes.ort import default_threads

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    nodes = {n.name: n for n in graph.node}
    producers = {out: n for n in graph.node for out in n.output}
    threads = threads or default_threads()
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.log_severity_level = 3
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((1, 3, input_size, input_size), dtype=np.float32)
        warmup = 5
        for _ in range(warmup + runs):
            session.run(None, {session.get_inputs()[0].name: x})
        events = json.loads(Path(session.end_profiling()).read_text())
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")[warmup:]  # drop the warm-up runs
    per_run: dict[str, np.ndarray] = {}
    ops: dict[str, set] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < starts[0]:
            continue
        node = _onnx_node(e["name"].removesuffix("_kernel_time"), e["args"].get("op_name"), nodes, producers)
        scope = _module_name(node.name) if node is not None else RUNTIME_ROW
        per_run.setdefault(scope, np.zeros(runs))[int(np.searchsorted(starts, e["ts"], "right")) - 1] += e["dur"]
        ops.setdefault(scope, set()).add(e["args"].get("op_name", "?"))
    # The median over runs: on a shared CPU a single preempted kernel would otherwise dominate its layer.
    times = {scope: {"us": float(np.median(t)), "ops": ops[scope]} for scope, t in per_run.items()}
    info = {"name": "onnxruntime-cpu", "version": ort.__version__, "threads": threads, "runs": runs,
            "optimization": "ORT_ENABLE_ALL (fusions as deployed)"}  # fmt: skip
    return times, info


def _onnx_node(kernel: str, op: str | None, nodes: dict, producers: dict):
    """The ONNX node a profiled kernel computes. ORT names a fused kernel after the output of its last
    node (Conv+Relu -> ".../Relu_output_0_nchwc"), so walk up from there to the node of the kernel's op."""
    if kernel in nodes:
        return nodes[kernel]
    m = re.match(r"(.*_output_\d+)", kernel)
    node = producers.get(m[1]) if m else None
    walk = node
    for _ in range(4):
        if walk is None or walk.op_type == op:
            break
        walk = producers.get(walk.input[0]) if walk.input else None
    return walk if walk is not None and walk.op_type == op else node


def _module_name(node_name: str) -> str:
    """The module path of a TorchScript-exported node: "/features/features.1/block/block.0/Conv" ->
    "features.1.block.0" (each scope repeats its parent's local name as a prefix)."""
    parts: list[str] = []
    prev = None
    for comp in node_name.strip("/").split("/")[:-1]:
        parts.append(comp[len(prev) + 1 :] if prev and comp.startswith(prev + ".") else comp)
        prev = comp
    return ".".join(parts)


def _top(rows: list[dict], key: str, n: int) -> list[dict]:
    return sorted((r for r in rows if r[key] > 0), key=lambda r: -r[key])[:n]


def _fmt_count(v: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return f"{v:.0f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _layer_cells(r: dict) -> list[str]:
    shape = "x".join(map(str, r["output_shape"][1:])) if r["output_shape"] else "–"
    return [r["name"], r["type"], shape, _fmt_count(r["params"]), _fmt_count(r["macs"]),
            _fmt_count(r["activation_bytes"]), _fmt_count(r["memory_access_bytes"]),
            f"{100 * r['time_share']:.1f}"]  # fmt: skip


LAYER_HEADER = ["layer", "type", "output", "params", "MACs", "act B", "MAC-est B", "time %"]


def _side_by_side(prof: dict, n: int) -> tuple[list[str], list[list[str]]]:
    by_time, by_macs = _top(prof["layers"], "time_share", n), _top(prof["layers"], "macs", n)
    rows = []
    for i in range(max(len(by_time), len(by_macs))):
        a = by_time[i] if i < len(by_time) else None
        b = by_macs[i] if i < len(by_macs) else None
        rows.append([str(i + 1),
                     _label(a) if a else "", f"{100 * a['time_share']:.1f}" if a else "",
                     f"{100 * a['mac_share']:.1f}" if a else "",
                     _label(b) if b else "", f"{100 * b['mac_share']:.1f}" if b else "",
                     f"{100 * b['time_share']:.1f}" if b else ""])  # fmt: skip
    return ["#", "top by time", "time %", "MACs %", "top by MACs", "MACs %", "time %"], rows


def _label(r: dict) -> str:
    return r["name"] if r["name"] == r["type"] else f"{r['name']} ({r['type']})"


def _summary(prof: dict) -> str:
    t, rt = prof["totals"], prof["runtime"]
    return (f"{prof['model']} at {prof['input_size']}px, batch 1: {t['params']:,} params, "
            f"{_fmt_count(t['macs'])} MACs, "
            f"activations {_fmt_count(t['activation_bytes'])}B, memory-access estimate "
            f"{_fmt_count(t['memory_access_bytes'])}B; {t['time_ms_per_run']:.3f} ms of kernels per run on "
            f"{rt['name']} {rt['version']} ({rt['threads']} threads, {rt['runs']} runs)")  # fmt: skip


def terminal(prof: dict, top: int) -> str:
    lines = _table(LAYER_HEADER, [_layer_cells(r) for r in prof["layers"]])
    lines += ["", _summary(prof), ""]
    lines += _table(["category", "MACs %", "time %"],
                    [[c["category"], f"{100 * c['mac_share']:.1f}", f"{100 * c['time_share']:.1f}"]
                     for c in prof["categories"]])  # fmt: skip
    lines += ["", *_table(*_side_by_side(prof, top))]
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def markdown(prof: dict, top: int) -> str:
    lines = [f"# Profile: {prof['model']}", "", _summary(prof) + ".", "",
             "MACs from torch.utils.flop_counter on the BN-folded PyTorch model; time from ONNX Runtime's "
             "profiler, each kernel attributed to the module its ONNX node came from (fused activations count "
             "with their convolution). Memory-access estimate: inputs + outputs + weights (ShuffleNetV2).", "",
             "## MACs do not predict latency", ""]  # fmt: skip
    lines += _md_table(["category", "MACs %", "time %"],
                       [[c["category"], f"{100 * c['mac_share']:.1f}", f"{100 * c['time_share']:.1f}"]
                        for c in prof["categories"]])  # fmt: skip
    lines += ["", *_md_table(*_side_by_side(prof, top)), "", "## Layers", ""]
    lines += _md_table(LAYER_HEADER, [_layer_cells(r) for r in prof["layers"]])
    return "\n".join(lines) + "\n"
