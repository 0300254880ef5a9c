"""`deploy export triton BUILD --repo DIR`: a Triton Inference Server model repository entry from a build folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    e = sub.add_parser("export", help="write a build folder in another server's layout (Triton model repository)")
    formats = e.add_subparsers(dest="format", required=True)
    t = formats.add_parser("triton", help="REPO/NAME/{config.pbtxt, 1/model.onnx or model.plan, labels.txt}")
    t.add_argument("build", type=Path, help="a `deploy build` output folder")
    t.add_argument("--repo", type=Path, required=True, help="the Triton model repository (created if missing)")
    t.add_argument("--name", help="model name in the repository (default: the build's model name)")
    t.add_argument("--instances", type=int, default=1, help="model instances (instance_group count, default 1)")
    t.add_argument("--kind", choices=["auto", "cpu", "gpu"], default="auto",
                   help="instance kind; auto: gpu for a TensorRT engine, cpu for ONNX")  # fmt: skip
    t.add_argument("--max-queue-delay-us", type=int, default=5000,
                   help="dynamic batching: longest wait for other requests, microseconds (default 5000)")  # fmt: skip
    t.add_argument("--force", action="store_true", help="replace an existing entry of that name")
    t.set_defaults(func=triton)


def triton(args: argparse.Namespace) -> int:
    from ..console import info
    from ..serving.triton import TritonOptions, export

    opts = TritonOptions(args.name, args.instances, args.kind, args.max_queue_delay_us, args.force)
    dest = export(args.build, args.repo, opts)
    info(f"wrote {dest} (tritonserver --model-repository {args.repo})")
    return 0
