"""`deploy run ARTIFACT IMAGE...` (top-k on the terminal) and `deploy serve ARTIFACT` (the HTTP server)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    r = sub.add_parser("run", help="classify images with a built artifact and print the top-k classes")
    r.add_argument("artifact", type=Path, help="a `deploy build` output folder, or a model file inside one")
    r.add_argument("images", type=Path, nargs="+", help="image files")
    r.add_argument("-k", "--top-k", type=int, default=5, help="classes to print per image (default 5)")
    r.add_argument("--threads", type=int, help="runtime threads (ONNX Runtime CPU)")
    r.set_defaults(func=run)

    s = sub.add_parser("serve", help="serve a built artifact over HTTP (POST /predict, /healthz, /metrics)")
    s.add_argument("artifact", type=Path, help="a `deploy build` output folder, or a model file inside one")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in containers)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch", type=int, default=8, help="most images per model run")
    s.add_argument("--max-wait-ms", type=float, default=5.0, help="longest a request waits for others to batch with")
    s.add_argument("--max-bytes", type=int, default=10 * 1024 * 1024, help="request body limit in bytes")
    s.add_argument("-k", "--top-k", type=int, default=5, help="default classes per answer (?k= overrides)")
    s.add_argument("--threads", type=int, help="runtime threads (ONNX Runtime CPU)")
    s.set_defaults(func=serve)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from .errors import DeployError
    from .predictor import Predictor

    if args.top_k < 1:
        raise DeployError("--top-k must be at least 1")
    for image in args.images:
        if not image.is_file():
            raise DeployError(f"image not found: {image}")
    p = Predictor(args.artifact, args.threads)
    batch = np.stack([p.decode(image.read_bytes(), str(image)) for image in args.images])
    print(f"{p.model_file} on {p.runtime.name}")
    for image, preds in zip(args.images, p.top_k(batch, args.top_k)):
        print(f"{image}: " + ", ".join(f"{x.name} ({x.probability:.3f})" for x in preds))
    return 0


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .console import info
    from .errors import DeployError
    from .predictor import Predictor
    from .serve import ServeConfig, create_app

    if args.max_batch < 1 or args.max_wait_ms < 0 or args.max_bytes < 1 or args.top_k < 1:
        raise DeployError("--max-batch, --max-bytes and --top-k must be positive, --max-wait-ms not negative")
    p = Predictor(args.artifact, args.threads)
    cfg = ServeConfig(args.max_batch, args.max_wait_ms, args.max_bytes, args.top_k)
    info(f"serving {p.model_file} on {p.runtime.name} at http://{args.host}:{args.port} "
         f"(max batch {cfg.max_batch}, max wait {cfg.max_wait_ms} ms)")  # fmt: skip
    uvicorn.run(create_app(p, cfg), host=args.host, port=args.port, log_level="warning")
    return 0
