"""`deploy view`: open a model graph in netron, served on a local port."""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import DeployError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("view", help="open the ONNX graph in netron (local server)")
    p.set_defaults(func=run)
    p.add_argument("model", type=Path, help="a build folder or an .onnx file")
    p.add_argument("--int8", action="store_true", help="in a build folder, the int8 model (default fp32)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    p.add_argument("--no-browser", dest="browse", action="store_false", help="only print the URL (headless)")


def run(args: argparse.Namespace) -> int:
    import netron

    url = start(resolve(args.model, args.int8), args.host, args.port, args.browse)
    print(f"netron serving {url}  (Ctrl-C to stop)", flush=True)
    netron.wait()  # returns on Ctrl-C after stopping the server
    return 0


def resolve(path: Path, int8: bool = False) -> Path:
    """The ONNX file to show: `path` itself, or model.fp32.onnx / model.int8.onnx of a build folder."""
    if path.is_dir():
        path = path / ("model.int8.onnx" if int8 else "model.fp32.onnx")
        if not path.is_file():
            raise DeployError(f"{path} not found: not a build folder" + (" with an int8 model" if int8 else ""))
    elif not path.is_file():
        raise DeployError(f"model file not found: {path}")
    elif path.suffix != ".onnx":
        raise DeployError(f"{path} is not an .onnx file or a build folder")
    return path


def start(path: Path, host: str = "127.0.0.1", port: int = 0, browse: bool = False) -> str:
    """Serve `path` with netron in a background thread; return its URL."""
    try:
        import netron
    except ImportError:
        raise DeployError("deploy view needs netron: pip install netron") from None
    try:
        served_host, served_port = netron.start(str(path), (host, port), browse=browse)
    except OSError as err:
        raise DeployError(f"netron could not serve on {host}:{port} ({err})") from None
    return f"http://{served_host}:{served_port}"


def stop(url: str) -> None:
    import netron

    host, port = url.removeprefix("http://").rsplit(":", 1)
    netron.stop((host, int(port)))
