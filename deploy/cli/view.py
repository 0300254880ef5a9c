"""`deploy view`: the command line of deploy/view.py."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("view", help="open the ONNX graph in netron (local server)")
    p.set_defaults(func=run)
    p.add_argument("model", type=Path, help="a build folder or an .onnx file")
    p.add_argument("--int8", action="store_true", help="in a build folder, the int8 model (default fp32)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    p.add_argument("--no-browser", dest="browse", action="store_false", help="only print the URL (headless)")


def run(args: argparse.Namespace) -> int:
    from ..view import resolve, start

    import netron

    url = start(resolve(args.model, args.int8), args.host, args.port, args.browse)
    print(f"netron serving {url}  (Ctrl-C to stop)", flush=True)
    netron.wait()  # returns on Ctrl-C after stopping the server
    return 0
