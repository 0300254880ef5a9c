"""`deploy compare`: accuracy against latency and size across build reports, with the Pareto front marked."""

from __future__ import annotations

import json
from pathlib import Path

from .console import info
from .errors import DeployError

COSTS = {"latency_ms": "batch-1 p50 latency, ms", "size_mb": "model file, MB"}


def load_points(paths: list[Path]) -> list[dict]:
    """One point per build and precision (fp32, int8): top-1 (None without a labeled --val), latency, size."""
    points = []
    for path in paths:
        report = path / "report.json" if path.is_dir() else path
        if path.is_dir() and not report.is_file():
            info(f"skipping {path}: no report.json")
            continue
        try:
            r = json.loads(report.read_text())
            build = path.name if path.is_dir() else path.parent.name
            for p in ("fp32", "int8"):
                if not (r.get("latency") or {}).get(p):
                    continue
                top1 = (r.get("accuracy") or {}).get(p, {}).get("top1")
                points.append({"build": build, "model": r["model"], "precision": p, "top1": top1,
                               "latency_ms": r["latency"][p]["p50_ms"],
                               "size_mb": r["size_bytes"][p] / 1e6})  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DeployError(f"{report} is not a build report ({type(err).__name__}: {err})") from None
    if not points:
        raise DeployError("no build reports with latency figures among the given paths")
    for cost in COSTS:
        front = pareto(points, cost)
        for i, pt in enumerate(points):
            pt[f"pareto_{cost}"] = i in front
    return points


def pareto(points: list[dict], cost: str) -> set[int]:
    """Indices of the points with a top-1 that no other point beats at lower or equal cost (higher top-1 and
    lower cost are better; ties in both keep both points)."""
    scored = [(i, p["top1"], p[cost]) for i, p in enumerate(points) if p["top1"] is not None]
    return {
        i for i, acc, c in scored
        if not any(a >= acc and k <= c and (a > acc or k < c) for _, a, k in scored)
    }  # fmt: skip


def markdown(points: list[dict], plot_name: str | None) -> str:
    lines = ["# Build comparison", "",
             "Pareto-optimal: no other build is at least as accurate and at least as cheap (one strictly).", "",
             "| build | model | precision | top-1 % | p50 ms | size MB | front: latency | front: size |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in sorted(points, key=lambda p: p["latency_ms"]):
        top1 = "–" if p["top1"] is None else f"{p['top1']:.2f}"
        marks = ["**yes**" if p[f"pareto_{c}"] else "" for c in COSTS]
        lines.append(f"| {p['build']} | {p['model']} | {p['precision']} | {top1} | {p['latency_ms']:.3f} | "
                     f"{p['size_mb']:.2f} | {marks[0]} | {marks[1]} |")  # fmt: skip
    missing = sorted({p["build"] for p in points if p["top1"] is None})
    if missing:
        lines += ["", f"No labeled accuracy (built without --val), so not on the plot: {', '.join(missing)}."]
    if plot_name:
        lines += ["", f"![accuracy vs latency and size]({plot_name})"]
    return "\n".join(lines) + "\n"


def plot(points: list[dict], path: Path) -> bool:
    """Top-1 against latency and against size, Pareto points joined by a step line. False when nothing
    has a labeled accuracy to plot."""
    scored = [p for p in points if p["top1"] is not None]
    if not scored:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (cost, label) in zip(axes, COSTS.items()):
        for precision, marker in (("fp32", "o"), ("int8", "s")):
            pts = [p for p in scored if p["precision"] == precision]
            ax.scatter([p[cost] for p in pts], [p["top1"] for p in pts], marker=marker, c="tab:gray", label=precision)
        front = sorted((p for p in scored if p[f"pareto_{cost}"]), key=lambda p: p[cost])
        ax.step([p[cost] for p in front], [p["top1"] for p in front], "r-", where="post", label="Pareto front")
        ax.scatter([p[cost] for p in front], [p["top1"] for p in front], s=80, facecolors="none", edgecolors="r")
        for p in scored:
            ax.annotate(f"{p['build']} {p['precision']}", (p[cost], p["top1"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")  # fmt: skip
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 %")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
