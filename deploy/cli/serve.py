"""`deploy run ARTIFACT IMAGE...` (top-k on the terminal) and `deploy serve ARTIFACT` (the HTTP server)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

API_KEY_ENV = "DEPLOY_API_KEY"


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
    s.add_argument("--header-timeout", type=float, default=10.0, help="seconds for the request line and headers "
                   "to arrive before the connection is closed (default 10)")  # fmt: skip
    s.add_argument("--request-timeout", type=float, default=30.0,
                   help="seconds for a request body to arrive before a 408 answer (default 30)")  # fmt: skip
    s.add_argument("--keep-alive-timeout", type=int, default=5, help="seconds an idle keep-alive connection stays open")
    s.add_argument("--max-connections", type=int, default=1000, help="most open connections; a new one closes the "
                   "idle one (between requests) that has waited longest (default 1000)")  # fmt: skip
    s.add_argument("--api-key", help=f"require this key on every endpoint but /healthz (Authorization: Bearer KEY "
                   f"or X-API-Key: KEY). Default: ${API_KEY_ENV} (preferred: not shown by ps), else none")  # fmt: skip
    s.set_defaults(func=serve)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..errors import DeployError
    from ..serving.predictor import Predictor

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
    from ..console import info, warn
    from ..errors import DeployError
    from ..serving.images import Limits
    from ..serving.predictor import Predictor
    from ..serving.server import ServeConfig, create_app, listen, run

    if args.max_batch < 1 or args.max_wait_ms < 0 or args.max_bytes < 1 or args.top_k < 1:
        raise DeployError("--max-batch, --max-bytes and --top-k must be positive, --max-wait-ms not negative")
    if min(args.header_timeout, args.request_timeout, args.keep_alive_timeout, args.max_connections) <= 0:
        raise DeployError("--header-timeout, --request-timeout, --keep-alive-timeout and --max-connections must be "
                          "positive")  # fmt: skip
    if not 1 <= args.port <= 65535:
        raise DeployError(f"--port {args.port}: expected 1 to 65535")
    limits = Limits.from_env()  # a bad DEPLOY_MAX_IMAGE_* is an error now, not a 400 on every request
    p = Predictor(args.artifact, args.threads)
    cfg = ServeConfig(args.max_batch, args.max_wait_ms, args.max_bytes, args.top_k, args.header_timeout,
                      args.request_timeout, args.keep_alive_timeout, args.max_connections,
                      args.api_key or os.environ.get(API_KEY_ENV) or None)  # fmt: skip
    sock = listen(args.host, args.port)
    if not cfg.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        warn(f"{args.host} is reachable from other machines and no API key is set: set ${API_KEY_ENV} to require one")
    info(f"serving {p.model_file} on {p.runtime.name} at http://{args.host}:{args.port} "
         f"(max batch {cfg.max_batch}, max wait {cfg.max_wait_ms} ms; images up to {limits.max_pixels:,} pixels, "
         f"{limits.max_aspect:g}:1; API key {'required' if cfg.api_key else 'off'})")  # fmt: skip
    run(create_app(p, cfg), sock, cfg)
    return 0
