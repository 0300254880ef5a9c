"""Build reports: report.json for programs, report.md (with a latency plot) for people."""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path


def environment(threads: int) -> dict:
    versions = {}
    for pkg in ("torch", "torchvision", "timm", "onnx", "onnxruntime", "onnxslim", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "packages": versions,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write(report: dict, out: Path) -> None:
    """Write latency.png, report.json and report.md into the build folder `out`."""
    plot = _latency_plot(report, out / "latency.png")
    report["files"] = sorted({p.name for p in out.iterdir()} | {"report.json", "report.md"})
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "report.md").write_text(markdown(report, plot))


def _latency_plot(report: dict, path: Path) -> str | None:
    lat = report.get("latency") or {}
    if not lat.get("fp32"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    precisions = [p for p in ("fp32", "int8") if lat.get(p)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    width = 0.8 / len(precisions)
    for i, p in enumerate(precisions):
        vals = [lat[p]["p50_ms"], lat[p]["p90_ms"], lat[p]["p99_ms"]]
        ax1.bar([x + i * width for x in range(3)], vals, width, label=p)
        ax2.bar([i], [lat[p]["throughput_ips"]], 0.6, label=p)
    ax1.set_xticks([x + width * (len(precisions) - 1) / 2 for x in range(3)], ["p50", "p90", "p99"])
    ax1.set_ylabel("ms, batch 1")
    ax1.legend()
    ax2.set_xticks(range(len(precisions)), precisions)
    ax2.set_ylabel(f"images/s, batch {lat['fp32']['batch']}")
    fig.suptitle(f"{report['model']} on {lat.get('runtime', 'runtime')} ({lat['fp32']['threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _int8_summary(acc: dict) -> str:
    drop = f"top-1 drop **{acc['top1_drop']:.2f}** points · " if "top1_drop" in acc else ""
    return f"{drop}int8/fp32 top-1 agreement **{acc['agreement']:.2f}%** · logit SQNR **{acc['sqnr_db']:.1f} dB**"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", r"\|")


def _fmt(value, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def markdown(r: dict, plot: str | None) -> str:
    lines = [f"# Build report: {r['model']}", ""]
    status = "PASSED" if r["passed"] else "FAILED"
    lines += [f"**{status}** · target `{r['target']}` · int8 {'on' if r['int8'] else 'off'} · {r['created']}", ""]
    for reason in r["failures"]:
        lines.append(f"> **Threshold missed:** {reason}")
    for w in r["warnings"]:
        lines.append(f"> **Warning:** {w}")
    if r["failures"] or r["warnings"]:
        lines.append("")

    acc = r.get("accuracy") or {}
    if acc:
        lines += ["## Accuracy", "", f"Evaluated on {acc['dataset']}.", ""]
        if "fp32" in acc:
            lines += ["| precision | top-1 % | top-5 % | images |", "|---|---|---|---|"]
            for p in ("fp32", "int8"):
                if p in acc:
                    lines.append(f"| {p} | {acc[p]['top1']:.2f} | {acc[p]['top5']:.2f} | {acc[p]['n']} |")
            lines.append("")
        if "agreement" in acc:
            lines += [_int8_summary(acc) + f" ({acc['compared']} images; int8 run on {acc['int8_evaluated_on']})", ""]
        if "reference" in acc:
            lines += [f"With exact Q/DQ arithmetic (VNNI/AMX CPUs, TensorRT): {_int8_summary(acc['reference'])}", ""]

    lat = r.get("latency") or {}
    if lat.get("fp32"):
        lines += [f"## Latency on {lat['runtime']}", ""]
        lines += ["| precision | p50 ms | p90 ms | p99 ms | throughput img/s | size MB |", "|---|---|---|---|---|---|"]
        for p in ("fp32", "int8"):
            if lat.get(p):
                x = lat[p]
                size = r["size_bytes"].get(p)
                lines.append(
                    f"| {p} | {x['p50_ms']:.3f} | {x['p90_ms']:.3f} | {x['p99_ms']:.3f} | "
                    f"{x['throughput_ips']:.1f} | {_fmt(size / 1e6 if size else None)} |"
                )
        x = lat["fp32"]
        lines += ["", f"Batch-1 percentiles over {x['runs']} runs after warm-up; throughput at batch {x['batch']}; "
                  f"{x['threads']} threads."]  # fmt: skip
        if lat.get("note"):
            lines.append(f"Note: {lat['note']}.")
        if "int8_speedup" in lat:
            lines.append(f"int8 speed-up over fp32: **{lat['int8_speedup']:.2f}x** at batch 1, "
                         f"**{lat['int8_throughput_speedup']:.2f}x** throughput.")  # fmt: skip
        if plot:
            lines += ["", f"![latency]({plot})"]
        lines.append("")

    lines += _tensorrt_sections(r)
    lines += _stages_summary(r)
    lines += ["## Stages", "", "| stage | seconds | notes |", "|---|---|---|"]
    for s in r["stages"]:
        lines.append(f"| {s['name']} | {s['seconds']:.1f} | {_cell(s.get('notes', ''))} |")
    lines.append("")

    if r.get("quantize"):
        q = r["quantize"]
        c = q["calibration"]
        lines += ["## Quantization", "",
                  f"- form: QDQ, activations {q['activations']}, weights {q['weights']}",
                  f"- calibration: {c['method']}" + (f" ({c['percentile']})" if c["method"] == "percentile" else "")
                  + f" on {c['images']} images from {r['calibration']['source']}"
                  + (" (ranges reused from the cache)" if c["cache_reused"] else ""),
                  f"- Q/DQ nodes: {q['quantize_linear']} QuantizeLinear, {q['dequantize_linear']} DequantizeLinear;"
                  f" nodes kept in float by request: {len(q['excluded_nodes'])}", ""]  # fmt: skip

    env = r["environment"]
    pk = env["packages"]
    lines += ["## Environment", "",
              f"{env['cpu']} ({env['cpu_count']} CPUs, {env['threads']} threads used) · Python {env['python']} · "
              + " · ".join(f"{k} {v}" for k, v in pk.items() if v), "",
              "Files: " + ", ".join(f"`{f}`" for f in r["files"]), ""]  # fmt: skip
    return "\n".join(lines)


def _tensorrt_sections(r: dict) -> list[str]:
    """The Q/DQ rule check (tensorrt target) and the results on verify.runtime, when present."""
    lines = []
    if r.get("qdq_check"):
        c = r["qdq_check"]
        lines += ["## TensorRT Q/DQ rules", "", f"**{'PASSED' if c['passed'] else 'FAILED'}**: {len(c['errors'])} errors "
                  f"(TensorRT rejects or computes differently), {len(c['warnings'])} warnings (lost fusions).", ""]  # fmt: skip
        lines += [f"- {kind}: `{v}`" for kind in ("errors", "warnings") for v in c[kind][:20]] + [""]
    if r.get("runtime"):
        x = r["runtime"]
        acc, lat = x["accuracy"], x["latency"]
        lines += [f"## On {x['runtime']}", "", f"Against ONNX Runtime fp32: {_int8_summary(acc)}.", ""]
        if "int8" in acc:
            lines += [f"Top-1 {acc['int8']['top1']:.2f}% (fp32 on ORT {acc['fp32']['top1']:.2f}%).", ""]
        lines += [f"Batch-1 p50 {lat['p50_ms']:.3f} ms, p90 {lat['p90_ms']:.3f} ms, p99 {lat['p99_ms']:.3f} ms "
                  f"over {lat['runs']} runs; {lat['throughput_ips']:.1f} img/s at batch {lat['batch']}.", ""]  # fmt: skip
    return lines


def _stages_summary(r: dict) -> list[str]:
    """What each compression stage cost and bought: params, MACs, ORT batch-1 p50, top-1 (with --val)."""
    rows = r.get("stages_summary")
    if not rows:
        return []
    lines = ["## After each stage", "", "| after | params M | MACs M | p50 ms | top-1 % |", "|---|---|---|---|---|"]
    for x in rows:
        lines.append(f"| {x['stage']} | {x['params'] / 1e6:.3f} | {x['macs'] / 1e6:.1f} | {x['p50_ms']:.3f} | "
                     f"{_fmt(x.get('top1'))} |")  # fmt: skip
    return lines + ["", "Latency on onnxruntime-cpu (fp32 until the int8 row), batch 1, median.", ""]
