"""serving.json: what a build folder serves (written by the describe stage), read without the build stack.

    {"schema": 1, "name": "mobilenet_v3_small", "model": "model.int8.onnx", "precision": "int8",
     "input": {"name": "input", "dtype": "float32", "shape": ["batch", 3, 224, 224]},
     "output": {"name": "logits", "dtype": "float32", "shape": ["batch", 1000]},
     "max_batch": 32, "preprocess": {"resize": 256, "input_size": 224, "interpolation": "bilinear",
     "mean": [...], "std": [...]}, "classes": ["tench", ...], "threads": 2, "cores": 2}

"threads" (optional): the CPU thread count the build measured fastest for the model, on a machine with "cores".
"runtime" (optional): "openvino-cpu" when that was OpenVINO's CPU plugin (served there when OpenVINO is installed).

Folders built before serving.json existed are read from report.json (its recipe and recommendation) and the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import DeployError
from ..runtimes.openvino import RUNTIME as OPENVINO
from .preprocess import Preprocess

SPEC_FILE = "serving.json"
SCHEMA = 1
ORT_DTYPES = {  # ONNX Runtime's type names: numpy's
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
}


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # numpy's name: float32, ...
    shape: list[int | str]  # a str is a dynamic dimension (the batch)

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": self.shape}


@dataclass(frozen=True)
class Spec:
    name: str  # the model's name in the recipe
    model: str  # the file to serve: the build's recommendation
    precision: str
    input: Tensor
    output: Tensor
    max_batch: int  # the largest batch the build declares (recipe tensorrt.batch.max)
    preprocess: Preprocess
    classes: list[str]
    threads: int | None = None  # the build's fastest CPU thread count, on a machine with `cores` cores
    cores: int | None = None
    runtime: str | None = None  # "openvino-cpu" when the build measured the model fastest there; None = ORT


def model_io(model: Path) -> tuple[Tensor, Tensor]:
    """The ONNX model's (single) input and first output, as ONNX Runtime reads them."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - ORT raises its own exception types
        raise DeployError(f"{model}: not a loadable ONNX model ({str(err).splitlines()[0][:160]})") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise DeployError(f"{model}: expected one input (an image batch), found {len(inputs)}")

    def tensor(t) -> Tensor:
        if t.type not in ORT_DTYPES:
            raise DeployError(f"{model}: {t.name} has unsupported type {t.type}")
        return Tensor(t.name, ORT_DTYPES[t.type], [d if isinstance(d, int) else str(d or "batch") for d in t.shape])

    return tensor(inputs[0]), tensor(outputs[0])


def recommended(folder: Path) -> str | None:
    """The file name of the model the build recommends (serving.json, else report.json), if it says."""
    for name, key in ((SPEC_FILE, "model"), ("report.json", "recommended")):
        content = _read(folder / name) if (folder / name).is_file() else {}
        value = content.get(key)
        value = value.get("model") if isinstance(value, dict) else value
        if isinstance(value, str):
            return value
    return None


def load(folder: Path) -> Spec:
    """The serving description of a build folder; a one-line DeployError when it has none or it is malformed."""
    path = folder / SPEC_FILE
    if path.is_file():
        d = _read(path)
        try:
            if d.get("schema") != SCHEMA:
                raise DeployError(f"{path}: schema {d.get('schema')!r}, expected {SCHEMA}: rebuild with `deploy build`")
            spec = Spec(str(d["name"]), str(d["model"]), str(d["precision"]), Tensor(**d["input"]),
                        Tensor(**d["output"]), int(d["max_batch"]), Preprocess.from_dict(d["preprocess"], str(path)),
                        [str(c) for c in d["classes"]], _count(d.get("threads")), _count(d.get("cores")),
                        _runtime(d.get("runtime")))  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise DeployError(f"{path}: malformed serving description ({type(err).__name__}: {err})") from None
    elif (folder / "report.json").is_file():
        spec = _from_report(folder / "report.json")
    else:
        raise DeployError(f"{folder} holds no {SPEC_FILE}, and report.json is missing: pass a `deploy build` output "
                          "folder")  # fmt: skip
    n = spec.output.shape[-1]
    if isinstance(n, int) and len(spec.classes) != n:
        raise DeployError(f"{folder}: {len(spec.classes)} class names for a model with {n} outputs")
    return spec


def _from_report(report: Path) -> Spec:
    """An older build folder: its report's recipe and recommendation, the model's inputs and outputs."""
    from ..console import warn

    content = _read(report)
    recipe = content.get("recipe")
    if not isinstance(recipe, dict) or not isinstance(recipe.get("model"), dict):
        raise DeployError(f'{report}: the build report holds no "recipe": rebuild with `deploy build`')
    rec = content.get("recommended") or {"model": "model.fp32.onnx", "precision": "fp32"}
    model = report.parent / rec["model"]
    if not model.is_file():
        raise DeployError(f"{model} is missing: the build folder is incomplete")
    inp, out = model_io(model)
    n = int(recipe["model"].get("num_classes") or out.shape[-1])
    classes = [str(i) for i in range(n)]
    if n == 1000:
        try:
            from timm.data import ImageNetInfo

            classes = [d.split(",")[0] for d in ImageNetInfo().label_descriptions()]
        except ImportError:
            warn(f"{report.parent}: built before {SPEC_FILE}, and timm (ImageNet's class names) is not installed: "
                 "classes are numbered; rebuild to name them")  # fmt: skip
    batch = (recipe.get("tensorrt") or {}).get("batch") or {}
    pre = Preprocess.from_dict(recipe.get("preprocess") or {}, str(report))
    name = str(recipe["model"].get("name", report.parent.name))
    return Spec(name, rec["model"], rec["precision"], inp, out, int(batch.get("max", 32)), pre, classes)


def _count(value) -> int | None:
    if value is None:
        return None
    if type(value) is not int or value < 1:
        raise ValueError(f"a thread or core count must be a positive integer, got {value!r}")
    return value


def _runtime(value) -> str | None:
    if value not in (None, OPENVINO):
        raise ValueError(f"runtime must be {OPENVINO} or absent (ONNX Runtime), got {value!r}")
    return value


def _read(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # ValueError: invalid JSON or UTF-8
        raise DeployError(f"{path}: not readable JSON ({str(err).splitlines()[0][:120]})") from None
    if not isinstance(content, dict):
        raise DeployError(f"{path}: expected a JSON object")
    return content
