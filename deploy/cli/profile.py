"""`deploy profile`: the command line of deploy/profile.py."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("profile", help="per-layer params, MACs, memory traffic and measured time share")
    p.set_defaults(func=run)
    p.add_argument("model", help="a model name, recipe YAML, timm:<name> or torchvision:<name>, or a build folder")
    p.add_argument("--input-size", type=int, help="input resolution (default: the recipe's)")
    p.add_argument("--runs", type=int, default=20, help="profiled runs after warm-up (default 20)")
    p.add_argument("--threads", type=int, help="runtime threads (default: all cores)")
    p.add_argument("--top", type=int, default=10, help="layers in the top-by-time / top-by-MACs lists")
    p.add_argument("--out", type=Path, help="folder for profile.json and profile.md (default build/profile/<model>)")


def run(args: argparse.Namespace) -> int:
    import json

    from ..errors import DeployError
    from ..profile import markdown, profile_target, terminal

    if args.runs <= 0 or args.top <= 0:
        raise DeployError("--runs and --top must be positive")
    prof = profile_target(args.model, args.input_size, args.runs, args.threads)
    out = args.out or Path("build") / "profile" / prof["model"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(prof, indent=2) + "\n")
    (out / "profile.md").write_text(markdown(prof, args.top))
    print(terminal(prof, args.top))
    print(f"\nwrote {out}/profile.json and {out}/profile.md")
    return 0
