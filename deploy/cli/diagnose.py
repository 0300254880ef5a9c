"""`deploy diagnose`: the command line of deploy/diagnose.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from .build import TARGETS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("diagnose", help="per-layer int8 sensitivity: the layers that lose the accuracy")
    p.set_defaults(func=_run)
    p.add_argument("model", help="a model name, recipe YAML or ONNX file (built with --int8), or a build folder")
    p.add_argument("--weights", help="checkpoint: a state_dict or a training checkpoint holding one")
    p.add_argument("--num-classes", type=int, help="classes of a fine-tuned head")
    p.add_argument("--calib", type=Path, help="calibration images (default: the build folder's, else built-in)")
    p.add_argument("--val", type=Path, help="labeled validation images (else held-out calibration images)")
    p.add_argument("--target", choices=TARGETS, help="runtime the int8 model is made for")
    p.add_argument("--out", type=Path, help="output folder (default build/diagnose/<model>-<target>)")
    p.add_argument("--top", type=int, default=10, help="layers in the worst-layers table (default 10)")
    p.add_argument("--sqnr-images", type=int, default=32, help="calibration images for the one-pass SQNR (default 32)")
    p.add_argument("--images", type=int, default=64,
                   help="evaluation images for the per-layer variants, 0 = one pass only (default 64)")  # fmt: skip
    p.add_argument("--no-alone", action="store_true", help="skip the quantized-alone variants (half the time)")
    p.add_argument("--mixed-precision", action="store_true",
                   help="then keep the most sensitive layers in float until the verify thresholds are met")  # fmt: skip
    p.add_argument("--max-top1-drop", type=float, help="threshold for --mixed-precision (default: the recipe's)")
    p.add_argument("--max-float-layers", type=int, help="limit for --mixed-precision (default: the recipe's)")
    p.add_argument("--threads", type=int, help="runtime threads (default: all cores)")


def _run(args: argparse.Namespace) -> int:
    from ..diagnose import run

    return run(args)
