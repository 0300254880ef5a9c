"""A Triton Inference Server model repository entry from a build folder: REPO/NAME/config.pbtxt, REPO/NAME/1/model.onnx
(or model.plan, the folder's TensorRT engine) and REPO/NAME/labels.txt (the class names, Triton's label_filename).

Inputs, outputs and dtypes come from the model; max_batch_size is the engine's profile maximum, or serving.json's
max_batch (the recipe's tensorrt.batch.max) for ONNX. The entry is written beside REPO/NAME and renamed into place:
an existing entry is replaced only with force, and only when it holds a config.pbtxt (a Triton entry).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import DeployError
from .spec import Spec, Tensor, load, model_io

TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "int64": "TYPE_INT64",
                 "int32": "TYPE_INT32", "uint8": "TYPE_UINT8", "int8": "TYPE_INT8"}  # fmt: skip
NAME = re.compile(r"[A-Za-z0-9_.-]+")
LABELS = "labels.txt"


@dataclass(frozen=True)
class TritonOptions:
    name: str | None = None  # default: the build's model name
    instances: int = 1
    kind: str = "auto"  # auto: KIND_GPU for an engine, KIND_CPU for ONNX
    max_queue_delay_us: int = 5000
    force: bool = False


def export(build: Path, repo: Path, opts: TritonOptions) -> Path:
    """Write the repository entry for `build` into `repo`; returns REPO/NAME."""
    if not build.is_dir():
        raise DeployError(f"build folder not found: {build}")
    spec = load(build)
    name = opts.name or re.sub(r"[^A-Za-z0-9_.-]", "_", spec.name)
    if not NAME.fullmatch(name) or name.startswith("."):
        raise DeployError(f"--name {name!r}: use letters, digits, '_', '-' and '.' (not first)")
    if opts.instances < 1 or opts.max_queue_delay_us < 0:
        raise DeployError("--instances must be positive and --max-queue-delay-us not negative")
    model, platform, max_batch, (inp, out) = _model(build, spec)
    kind = opts.kind if opts.kind != "auto" else ("gpu" if platform == "tensorrt_plan" else "cpu")
    dest = repo / name
    if dest.exists() and not opts.force:
        raise DeployError(f"{dest} exists: pass --force to replace it")
    if dest.exists() and not (dest / "config.pbtxt").is_file():
        raise DeployError(f"{dest} is not a Triton model entry (no config.pbtxt): not replacing it")
    text = config(name, platform, max_batch, inp, out, kind, opts)
    tmp, old = repo / f".{name}.tmp-{os.getpid()}", repo / f".{name}.old-{os.getpid()}"
    try:
        (tmp / "1").mkdir(parents=True)
        shutil.copyfile(model, tmp / "1" / ("model.plan" if platform == "tensorrt_plan" else "model.onnx"))
        (tmp / LABELS).write_text("\n".join(spec.classes) + "\n")
        (tmp / "config.pbtxt").write_text(text)
        if dest.exists():
            dest.rename(old)
        try:
            tmp.rename(dest)
        except OSError:
            if old.exists():
                old.rename(dest)  # put the previous entry back
            raise
    except OSError as err:
        raise DeployError(f"cannot write {dest}: {err.strerror or err}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return dest


def _model(build: Path, spec: Spec) -> tuple[Path, str, int, tuple[Tensor, Tensor]]:
    """The file to serve, its Triton platform, max_batch_size and I/O: the engine of the recommended precision (else
    any engine), whose sidecar gives the batch profile; else the recommended ONNX model."""
    engines = sorted(build.glob("model.*.engine"), key=lambda e: e.name != f"model.{spec.precision}.engine")
    if engines:
        engine = engines[0]
        sidecar = engine.with_name(engine.name + ".json")
        try:
            side = json.loads(sidecar.read_text())
            max_batch, onnx = int(side["profile"]["max"][0]), build / side["onnx"]
        except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
            raise DeployError(f"{sidecar}: unusable engine sidecar ({type(err).__name__}: {err})") from None
        io = model_io(onnx) if onnx.is_file() else (spec.input, spec.output)  # the engine keeps the ONNX names
        return engine, "tensorrt_plan", max_batch, io
    model = build / spec.model
    if not model.is_file():
        raise DeployError(f"{model} is missing: the build folder is incomplete")
    return model, "onnxruntime_onnx", spec.max_batch, model_io(model)


def config(name: str, platform: str, max_batch: int, inp: Tensor, out: Tensor, kind: str, opts: TritonOptions) -> str:
    """config.pbtxt (protobuf text format of Triton's ModelConfig). A dynamic first dimension is Triton's batch."""
    batched = isinstance(inp.shape[0], str)
    if any(isinstance(d, str) for d in inp.shape[1:] + out.shape[1:]):
        raise DeployError(f"{name}: only the batch dimension may be dynamic (input {inp.shape}, output {out.shape})")
    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch if batched else 0}"]
    for section, t, extra in (("input", inp, ""), ("output", out, f' label_filename: "{LABELS}"')):
        if t.dtype not in TRITON_DTYPES:
            raise DeployError(f"{name}: {t.name} has dtype {t.dtype}, which Triton has no type for")
        dims = ", ".join(str(d) for d in (t.shape[1:] if batched else t.shape))
        lines.append(
            f'{section} [ {{ name: "{t.name}" data_type: {TRITON_DTYPES[t.dtype]} dims: [ {dims} ]{extra} }} ]'
        )
    if batched:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {opts.max_queue_delay_us} }}")
    lines.append(f"instance_group [ {{ count: {opts.instances} kind: KIND_{kind.upper()} }} ]")
    return "\n".join(lines) + "\n"
