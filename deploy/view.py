"""`deploy view`: open a model graph in netron, served on a local port."""

from __future__ import annotations

from pathlib import Path

from .errors import DeployError


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
