"""`deploy list`: the registered models, their recipes and preprocessing."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    sub.add_parser("list", help="supported models and their recipes").set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import recipe as recipes

    rows = []
    for name in recipes.available():
        r = recipes.load(name)
        p = r.preprocess
        rows.append((name, r.model.source, f"{p.input_size}px", f"resize {p.resize} {p.interpolation}",
                     f"calib {r.quantize.calibration.method}", str(recipes.recipe_dir() / f"{name}.yaml")))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0
