"""`deploy explore`: the command line of deploy/explore.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import DeployError
from ..explore import WIDTH_FAMILIES


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("explore", help="width x resolution grid: params, MACs, fp32/int8 latency, plot")
    p.set_defaults(func=run)
    p.add_argument("model", help=f"one of {', '.join(WIDTH_FAMILIES)}")
    p.add_argument("--width", type=_floats, default=[0.5, 0.75, 1.0], help="width multipliers α (default 0.5,0.75,1)")
    p.add_argument("--resolution", type=_floats, default=[128, 160, 224], help="input sizes (default 128,160,224)")
    p.add_argument("--no-int8", dest="int8", action="store_false", help="skip the int8 models")
    p.add_argument("--runs", type=int, default=50, help="batch-1 latency runs per model (default 50)")
    p.add_argument("--samples", type=int, default=32, help="calibration images for int8 (default 32)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--threads", type=int, help="runtime threads (default: all cores)")
    p.add_argument("--out", type=Path, help="folder for explore.json/.md/.png (default build/explore/<model>)")
    p.add_argument("--weights", help="checkpoint per width, with {width} in the path (e.g. w{width}.pth): adds "
                                     "top-1 on --val at every resolution")  # fmt: skip
    p.add_argument("--val", type=Path, help="labeled validation images (one subfolder per class), with --weights")


def run(args: argparse.Namespace) -> int:
    import json

    from ..explore import explore, markdown, plot, table

    if args.runs <= 0 or args.samples <= 0 or args.num_classes <= 0:
        raise DeployError("--runs, --samples and --num-classes must be positive")
    res = [int(r) for r in args.resolution]
    if any(r < 32 or r != f for r, f in zip(res, args.resolution)):
        raise DeployError("--resolution takes whole pixel sizes of at least 32")
    if bool(args.weights) != bool(args.val):
        raise DeployError("accuracy needs both --weights (with {width} in the path) and --val")
    if args.weights and "{width}" not in args.weights:
        raise DeployError("--weights must contain {width}: each width needs its own trained checkpoint")
    result = explore(args.model, args.width, res, args.int8, args.runs, args.samples, args.num_classes, args.threads,
                     args.weights, args.val)  # fmt: skip
    out = args.out or Path("build") / "explore" / args.model
    out.mkdir(parents=True, exist_ok=True)
    (out / "explore.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "explore.png")
    (out / "explore.md").write_text(markdown(result, "explore.png"))
    print(table(result))
    print(f"\nwrote {out}/explore.json, explore.md and explore.png")
    return 0


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values
