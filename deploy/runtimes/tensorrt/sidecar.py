"""The engine sidecar `model.<precision>.engine.json`: what an engine was built with (TensorRT version, GPU,
precision, profile, plan), and whether it can run on this machine. Read by the runtime and the predictor."""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import DeployError

SIDECAR_FORMAT = 1


def engine_path(out_dir: Path, precision: str) -> Path:
    return out_dir / f"model.{precision}.engine"


def sidecar_path(engine: Path) -> Path:
    return engine.with_name(engine.name + ".json")


def incompatibility(sidecar: dict, here: dict) -> str | None:
    """One line saying why an engine built as `sidecar` records cannot run `here` (TensorRT version and
    GPU as `runtimes.tensorrt.environment()` reports them), or None when it can."""
    built = f"TensorRT {sidecar['tensorrt']} on {sidecar['gpu']} (sm {sidecar['compute_capability']})"
    now = f"TensorRT {here['tensorrt']} on {here['gpu']} (sm {here['compute_capability']})"
    if sidecar["tensorrt"] != here["tensorrt"] or sidecar["compute_capability"] != here["compute_capability"]:
        return (f"engine built with {built} cannot run with {now}: TensorRT engines are not portable across "
                f"TensorRT versions or GPUs; rebuild it here with `deploy engine {sidecar['onnx']}`")  # fmt: skip
    return None


def compatible_engine(engines: list[Path], here: dict) -> tuple[Path | None, list[str]]:
    """The first of `engines` whose sidecar says it runs `here`, and why each one before it does not."""
    refused = []
    for engine in engines:
        try:
            why = incompatibility(read_sidecar(engine), here)
        except (DeployError, json.JSONDecodeError, KeyError) as err:
            why = f"its sidecar is unusable ({err})"
        if why is None:
            return engine, refused
        refused.append(f"{engine.name}: {why}")
    return None, refused


def read_sidecar(engine: Path) -> dict:
    path = sidecar_path(engine)
    if not path.is_file():
        raise DeployError(f"{path} is missing: an engine needs the sidecar written with it (rebuild with `deploy engine`)")
    return json.loads(path.read_text())
