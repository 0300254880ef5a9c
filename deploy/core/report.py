"""Build reports: report.json for programs, report.md (with a latency plot) for people."""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

from ..deployment import NEAR, ORT, startup_key


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
    if report.get("sensitivity"):  # deploy/sensitivity.py's figures, when the build computed them
        report["sensitivity"]["plot"] = sensitivity_plot(report["sensitivity"], out / "sensitivity.png", report["model"])
    report["files"] = sorted({p.name for p in out.iterdir() if not p.name.startswith(".")} | {"report.json", "report.md"})
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
    if r.get("recommended"):
        rec = r["recommended"]
        on = f" on {rec['threads']} thread{'s' * (rec['threads'] > 1)}" if rec.get("threads") else ""
        if rec.get("runtime", ORT) != ORT:
            on = f" on {rec['runtime']},{on[3:]}"
        lines += [f"**Deploy `{rec['model']}`** ({rec['precision']}{on}): {rec['reason']}.", ""]

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

    lines += _deployment_section(r.get("deployment"))
    lines += _tensorrt_sections(r)
    lines += _device_sections(r)
    lines += _int8_steps(r)
    lines += _stages_summary(r)
    lines += sensitivity_markdown(r["sensitivity"]) if r.get("sensitivity") else []
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


def _deployment_section(d: dict | None) -> list[str]:
    if not d:
        return []
    counts = sorted({g["threads"] for g in d["grid"]})
    lines = ["## Deployment on this CPU", "", "| model | " + " | ".join(
        f"{t} thread{'s' * (t > 1)}: batch-1 ms · img/s @{d['batch']}" for t in counts) + " | start-up s |",
        "|---|" + "---|" * (len(counts) + 1)]  # fmt: skip
    for key, seconds in d["startup_s"].items():
        cells = {g["threads"]: f"{g['batch1_ms']:.3f} · {g['throughput_ips']:.1f}"
                 for g in d["grid"] if startup_key(g["runtime"], g["precision"]) == key}  # fmt: skip
        lines.append(f"| {key} | " + " | ".join(cells[t] for t in counts) + f" | {seconds:.3f} |")
    lo, hi = d["latency"], d["throughput"]
    lines += ["", f"Lowest latency: **{_row(lo)}** ({lo['batch1_ms']:.3f} ms); highest throughput: **{_row(hi)}** "
              f"({hi['throughput_ips']:.1f} img/s at batch {d['batch']}). ONNX Runtime, then fewer threads, win within "
              f"{NEAR:.0%}. Timed "
              f"in {d['timed']}.", ""]  # fmt: skip
    return lines


def _row(g: dict) -> str:
    return f"{startup_key(g['runtime'], g['precision'])} on {g['threads']} thread{'s' * (g['threads'] > 1)}"


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
        if "bf16" in x:
            a, passed = x["bf16"]["accuracy"], x["bf16"]["passed"]
            drop = f"top-1 drop {a['top1_drop']:.2f} points, " if "top1_drop" in a else ""
            lines += [f"The fp32 model in bf16 there, against ONNX Runtime fp32: {drop}agreement {a['agreement']:.2f}"
                      f"%, logit SQNR {a['sqnr_db']:.1f} dB ({'within' if passed else 'outside'} the thresholds).", ""]
    return lines


def _device_sections(r: dict) -> list[str]:
    """The figures `deploy verify --on URL` measured on each device (deploy/remote/verify.py)."""
    lines = []
    for url, d in (r.get("device") or {}).items():
        env, acc, lat, rec = d["environment"], d["accuracy"], d["latency"], d["recommended"]
        lines += [f"## On device `{url}`", "",
                  (f"{env['cpu']} ({env['cpu_count']} CPUs, {env['threads']} threads used) · {env['os']} · "
                   f"Python {env['python']} · onnxruntime {env['onnxruntime']} ({', '.join(env['providers'])}) · "
                   f"measured {d['measured']}"), "",
                  f"Against {acc['against']} on {acc['dataset']}:", "",
                  "| precision | agreement % | SQNR dB | top-1 % | p50 ms | p90 ms | p99 ms | img/s | start-up s |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for p in ("fp32", "int8"):
            if p in lat:
                a, x = acc[p], lat[p]
                sqnr = "exact" if a["sqnr_db"] is None else f"{a['sqnr_db']:.1f}"
                lines.append(f"| {p} | {a['agreement']:.2f} | {sqnr} | "
                             f"{_fmt(a.get('top1'))} | {x['p50_ms']:.3f} | {x['p90_ms']:.3f} | {x['p99_ms']:.3f} | "
                             f"{x['throughput_ips']:.1f} | {d['startup_s'][p]:.2f} |")  # fmt: skip
        lines += [""] + [f"> **Threshold missed:** {m}" for m in d["failures"]] + ([""] if d["failures"] else [])
        lines += [f"**Deploy `{rec['model']}`** on this device ({rec['precision']}): {rec['reason']}.", ""]
    return lines


def _int8_steps(r: dict) -> list[str]:
    """What graph preparation and the fallbacks did (deploy/int8.py), when the build ran them."""
    lines = []
    if eq := r.get("equalize"):
        spread = eq["range_spread"]["conv1_out"]
        lines.append(f"- Cross-layer equalization: {eq['pairs']} conv pairs ({', '.join(f'{k} {v}' for k, v in eq['kinds'].items())}); "
                     f"per-channel weight range spread (max/median, geometric mean) {_fmt(spread['before'], '.1f')} -> "
                     f"{_fmt(spread['after'], '.1f')}; fp32 logits changed by {eq['max_abs_logit_diff']:.1e}.")  # fmt: skip
    if pad := r.get("pad_depthwise"):
        lines.append("- Depthwise channels zero-padded to a multiple of 16 for ORT's int8 kernels: "
                     + ", ".join(f"`{n}` -> {c}" for n, c in pad["convs"].items())
                     + f"; fp32 logits changed by {pad['max_abs_logit_diff']:.1e}.")  # fmt: skip
    if (ce := r.get("center_activations")) and ce["activations"]:
        lines.append(f"- Centred activations (symmetric int8 over the whole range): {ce['activations']} of "
                     f"{ce['candidates']} ReLU/ReLU6 outputs read only by unpadded convs or Gemms, shifted by "
                     f"{ce['shift']['min']:.3g}-{ce['shift']['max']:.3g}; fp32 logits changed by "
                     f"{ce['max_abs_logit_diff']:.1e}.")  # fmt: skip
    if ar := r.get("adaround"):
        ratio = ar["error_ratio"] and f", output error {ar['error_ratio']['median']:.2f}x nearest rounding's (median)"
        lines.append(f"- AdaRound: {ar['layers']} layers on {ar['images']} calibration images, {ar['iterations']} "
                     f"steps each; {ar['flipped'] * 100:.0f}% of their weights rounded the other way{ratio or ''}, "
                     f"{ar['kept_nearest']} kept nearest rounding; {ar['seconds']:.0f} s.")  # fmt: skip
    if bc := r.get("bias_correction"):
        lines.append(f"- Bias correction: {bc['layers']} layers on {bc['images']} calibration images"
                     + (f", median RMS shift removed {bc['rms_shift']['median']:.2e}." if bc["rms_shift"] else "."))  # fmt: skip
    if qat := r.get("qat"):
        lines.append(f"- QAT ({qat['reason']}): {len(qat['history'])} epochs; post-training int8 "
                     f"{figures(qat['ptq'])} -> after QAT {figures(qat['int8'])}"
                     + ("; worse, so the post-training model was kept." if qat.get("kept") else
                        " (calibrated again, without AdaRound or bias correction: QAT learned under quantization)."))  # fmt: skip
    if mp := r.get("mixed_precision"):
        if mp.get("error"):
            lines.append(f"- Mixed precision failed: {_cell(mp['error'])}.")
        else:
            lines.append(f"- Mixed precision: {len(mp['float_layers'])} layers kept in float "
                         f"({', '.join(f'`{n}`' for n in mp['float_layers']) or 'none needed'})"
                         + (f", {mp['latency']['slowdown']:.2f}x the all-int8 batch-1 time." if mp.get("latency") else "."))  # fmt: skip
    return ["## Int8 preparation and fallbacks", "", *lines, ""] if lines else []


def figures(f: dict) -> str:
    """One line of int8-vs-fp32 figures: drop (with labels), agreement, logit SQNR."""
    drop = f"top-1 drop {f['top1_drop']:.2f}, " if "top1_drop" in f else ""
    sqnr = "exact" if f.get("sqnr_db") is None else f"{f['sqnr_db']:.1f} dB"
    return f"{drop}agreement {f['agreement']:.1f}%, logit SQNR {sqnr}"


def _stages_summary(r: dict) -> list[str]:
    """What each compression stage cost and bought: params, MACs, ORT batch-1 p50, top-1 (with --val)."""
    rows = r.get("stages_summary")
    if not rows:
        return []
    lines = ["## After each stage", "", "| after | params M | MACs M | p50 ms | top-1 % |", "|---|---|---|---|---|"]
    for x in rows:
        lines.append(f"| {x['stage']} | {x['params'] / 1e6:.3f} | {x['macs'] / 1e6:.1f} | {x['p50_ms']:.3f} | "
                     f"{_fmt(x.get('top1'))} |")  # fmt: skip
    lines += ["", "Latency on onnxruntime-cpu (fp32 until the int8 row), batch 1, median.", ""]
    return lines + _latency_pruning(r.get("prune") or {})


def _latency_pruning(p: dict) -> list[str]:
    """The steps of the pruning search (stages/prune/latency.py; by latency or by MACs): the widths it chose."""
    if p.get("scope") == "kl":
        title, unit, after = "Pruning by MACs, channels chosen by KL", "MMACs", "MACs"
        saved, ratio = "mmacs_saved", "macs_ratio"
        summary = (f"MACs {p['before']['macs'] / 1e6:.1f}M -> {p['after']['macs'] / 1e6:.1f}M "
                   f"({p['macs_reduction']:.3f} removed) in {len(p['steps'])} steps, {p['seconds']:.0f} s.")  # fmt: skip
    elif p.get("mode") == "latency":
        title, unit, after, saved, ratio = "Latency-aware pruning", "ms", "latency", "ms_saved", "latency_ratio"
        summary = (f"Budget {p['latency_budget']:.2f} of the unpruned latency: {p['latency_before_ms']:.3f} -> "
                   f"{p['latency_after_ms']:.3f} ms ({p['latency_ratio']:.3f}) in {len(p['steps'])} steps, "
                   f"{p['seconds']:.0f} s ({p['latency_measured']}).")  # fmt: skip
    else:
        return []
    lines = [f"## {title}", "", f"{summary} Each step pruned the group with the least {p['proxy']} per {unit} saved.",
             "", f"| step | group | channels | {unit} saved | KL | {after} after |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for i, s in enumerate(p["steps"], 1):
        lines.append(f"| {i} | `{s['group']}` | {s['channels'][0]} -> {s['channels'][1]} | {s[saved]:.4f} | "
                     f"{s['kl']:.4f} | {_fmt(s.get(ratio), '.3f')} |")  # fmt: skip
    return lines + [""]


def sensitivity_markdown(sens: dict, top: int = 10) -> list[str]:
    """The `top` worst layers of a deploy/sensitivity.py analysis (`layer_sqnr` rows, with or without the
    per-layer variants) as a Markdown section, with its plot when one was written."""
    from ..stages.int8.sensitivity import worst

    key = sens["ranking"]
    variants = "base" in sens
    lines = ["## Layer sensitivity", "",
             f"One pass on {sens['sqnr_images']} calibration images, int8 (exact Q/DQ arithmetic) against fp32: "
             "SQNR of each quantized node's output, and the dB it loses against its inputs (`lost`)."]  # fmt: skip
    if variants:
        b = sens["base"]
        lines.append(f"Then each node kept alone in float, and quantized alone, on {sens['variant_images']} images "
                     f"(all-int8 there: logit SQNR {_fmt(b['sqnr_db'], '.1f')} dB, agreement {b['agreement']:.1f}%"
                     + (f", top-1 drop {b['top1_drop']:.2f}" if "top1_drop" in b else "") + ").")  # fmt: skip
    lines += ["", f"Ranked by `{key}`:", ""]
    head = "| # | layer | op | SQNR dB | lost dB | weight dB | output Q/DQ dB |"
    if variants:
        head += " in float: +dB | agreement % | top-1 % | alone: SQNR dB |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for i, r in enumerate(worst(sens["layers"], top, key), 1):
        row = (f"| {i} | `{_cell(r['node'])}` | {r['op_type']} | {_fmt(r['sqnr_db'], '.1f')} | {_fmt(r['lost_db'], '.1f')} | "
               f"{_fmt(r['weight_sqnr_db'], '.1f')} | {_fmt(r['output_qdq_sqnr_db'], '.1f')} |")  # fmt: skip
        if variants:
            ex, al = r.get("excluded", {}), r.get("alone", {})
            row += (f" {_fmt(r.get('excluded_gain_db'))} | {_fmt(ex.get('agreement'), '.1f')} | {_fmt(ex.get('top1'))} | "
                    f"{_fmt(al.get('sqnr_db'), '.1f')} |")  # fmt: skip
        lines.append(row)
    if sens.get("plot"):
        lines += ["", f"![layer sensitivity]({sens['plot']})"]
    return lines + [""]


def sensitivity_plot(sens: dict, path: Path, title: str) -> str:
    """Bars per quantized node in graph order: the dB it loses (and, with the variants, the logit SQNR gained by
    keeping it alone in float), the worst ones labeled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..stages.int8.sensitivity import worst

    rows = sens["layers"]
    panels = [("lost_db", "dB lost at the node")] + ([("excluded_gain_db", "logit SQNR gain in float, dB")]
                                                     if "base" in sens else [])  # fmt: skip
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.8 * len(panels)), squeeze=False)
    for ax, (key, label) in zip(axes[:, 0], panels):
        ax.bar(range(len(rows)), [r.get(key) or 0.0 for r in rows], color="tab:blue")
        for r in worst(rows, 5, key):
            i = rows.index(r)
            ax.bar([i], [r[key]], color="tab:red")
            ax.annotate(r["node"].strip("/").replace("/", " "), (i, r[key]), fontsize=6, rotation=20,
                        ha="left", va="bottom")  # fmt: skip
        ax.set_ylabel(label)
        ax.axhline(0, color="black", linewidth=0.5)
    axes[-1, 0].set_xlabel("quantized node, in graph order")
    fig.suptitle(f"{title}: int8 sensitivity per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
