"""`deploy verify`: a build's accuracy and latency checks run on remote devices over SSH (deploy/remote/)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="run a build's accuracy and latency checks on a device over SSH")
    p.set_defaults(func=run)
    p.add_argument("build", type=Path, help="a `deploy build` output folder")
    p.add_argument("--on", action="append", default=[], metavar="ssh://[USER@]HOST[:PORT]",
                   help="a device (repeatable; default: the recipe's verify.devices); HOST may be a ~/.ssh/config "
                   "alias")  # fmt: skip
    p.add_argument("--engine", action="store_true",
                   help="also build a TensorRT engine on the device and measure it (needs TensorRT and "
                   "edge-deploy[engine] of this version there)")  # fmt: skip
    p.add_argument(
        "--python", default="python3", help="Python on the device, with numpy and onnxruntime (default python3)"
    )
    p.add_argument("--val", type=Path, help="labeled validation images (needed when the build was made with --val)")
    p.add_argument(
        "--calib", type=Path, help="calibration images to draw the held-out ones from (default: the build's)"
    )
    p.add_argument(
        "--images", type=int, default=100, help="at most this many evaluation images, a seeded subset (default 100)"
    )
    p.add_argument("--threads", type=int, help="threads on the device (default: the recipe's, else all its cores)")
    p.add_argument(
        "--timeout", type=float, default=600, help="seconds for the whole remote run, per device (default 600)"
    )
    p.add_argument("--ssh-config", type=Path, help="ssh_config file to use instead of ~/.ssh/config (ssh -F)")
    p.add_argument("--accept-new-host-key", action="store_true",
                   help="store the key of a device seen the first time (a changed key is always refused)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from ..remote.verify import Options, verify

    opts = Options(python=args.python, images=args.images, val=args.val, calib=args.calib, timeout=args.timeout,
                   ssh_config=args.ssh_config, accept_new_host_key=args.accept_new_host_key,
                   threads=args.threads, engine=args.engine)  # fmt: skip
    for url, e in verify(args.build, args.on, opts).items():
        lat, acc = e["latency"], e["accuracy"]
        parts = [f"fp32 p50 {lat['fp32']['p50_ms']:.2f} ms"]
        if "int8" in lat:
            parts.append(f"int8 p50 {lat['int8']['p50_ms']:.2f} ms ({lat['int8_speedup_interleaved']:.2f}x), "
                         f"agreement {acc['int8']['agreement']:.1f}% with host fp32")  # fmt: skip
        if "engine" in lat:
            parts.append(f"TensorRT {e['engine']['precision']} engine p50 {lat['engine']['p50_ms']:.2f} ms, "
                         f"agreement {acc['engine']['agreement']:.1f}%")  # fmt: skip
        print(f"{url}: {', '.join(parts)}; deploy {e['recommended']['model']}")
    return 0
