"""`deploy compare`: the command line of deploy/compare.py."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("compare", help="accuracy vs latency and size across builds, Pareto front marked")
    p.set_defaults(func=run)
    p.add_argument("builds", nargs="+", type=Path, help="build folders (or their report.json), e.g. build/*")
    p.add_argument("--out", type=Path, default=Path("build") / "compare", help="output folder (default build/compare)")


def run(args: argparse.Namespace) -> int:
    from ..compare import load_points, markdown, plot
    from ..console import info

    points = load_points(args.builds)
    args.out.mkdir(parents=True, exist_ok=True)
    plotted = plot(points, args.out / "compare.png")
    (args.out / "compare.md").write_text(markdown(points, "compare.png" if plotted else None))
    print((args.out / "compare.md").read_text())
    info(f"wrote {args.out}/compare.md" + (" and compare.png" if plotted else ""))
    return 0
