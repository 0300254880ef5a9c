"""TensorRT engine build: ONNX -> serialized engine `model.<precision>.engine` + a JSON sidecar.

The settings that depend on the TensorRT version are decided by `plan()`, a pure function of
(version, recipe settings, ONNX facts) that runs and is tested on the CPU; `build_engine()` applies
the plan with TensorRT's Python API and needs TensorRT and a GPU.

TensorRT 10.x (JetPack 6 ships 10.3): weakly typed network; explicit Q/DQ needs the INT8 builder flag,
fp16 the FP16 flag. TensorRT 11.x: strongly typed only (the precision flags and implicit calibration
are gone), so int8 comes from the Q/DQ nodes alone and fp16 from converting the ONNX graph to fp16.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..errors import DeployError
from ..recipe import TensorRTConfig

SIDECAR_FORMAT = 1


def version_tuple(version: str) -> tuple[int, int]:
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        raise DeployError(f"cannot read TensorRT version {version!r}") from None
    return major, minor


@dataclass(frozen=True)
class BuildPlan:
    """Every builder setting, decided before TensorRT is touched."""

    tensorrt: str
    precision: str
    strongly_typed: bool
    flags: tuple[str, ...]  # trt.BuilderFlag member names
    onnx_to_fp16: bool  # convert the graph to fp16 (keeping fp32 I/O) before parsing
    workspace_bytes: int
    input_name: str
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # min, opt, max input shapes
    dla_core: int | None
    timing_cache: str | None

    def to_dict(self) -> dict:
        return asdict(self)


def plan(
    trt_version: str, cfg: TensorRTConfig, precision: str, input_name: str, input_dims: list, quantized: bool
) -> BuildPlan:
    """The builder settings for `precision` on TensorRT `trt_version`.

    `input_dims` is the ONNX input shape (ints, or strings for symbolic dimensions); `quantized`
    says whether the ONNX holds Q/DQ nodes.
    """
    major, _ = version_tuple(trt_version)
    if major not in (10, 11):
        raise DeployError(f"TensorRT {trt_version} is not supported: engines are built with TensorRT 10.x or 11.x")
    if precision == "int8" and not quantized:
        raise DeployError("int8 engines are built from the QDQ ONNX (deploy build --int8 --target tensorrt): "
                          "implicit int8 calibration is deprecated in TensorRT 10 and removed in 11")  # fmt: skip
    if precision != "int8" and quantized:
        raise DeployError(f"{precision} engines are built from the fp32 ONNX, not a quantized (QDQ) one")
    if len(input_dims) != 4 or any(not isinstance(d, int) for d in input_dims[1:]):
        raise DeployError(f"input {input_name!r} must be NCHW with fixed C, H, W; got {input_dims}")
    b = cfg.batch
    if isinstance(input_dims[0], int) and not b.min == b.opt == b.max == input_dims[0]:
        raise DeployError(f"the ONNX input has a fixed batch of {input_dims[0]}; set tensorrt.batch min/opt/max to it "
                          "or export with a dynamic batch")  # fmt: skip
    chw = tuple(input_dims[1:])
    profile = ((b.min, *chw), (b.opt, *chw), (b.max, *chw))

    strongly_typed = major >= 11
    flags: list[str] = []
    if not strongly_typed:
        flags += {"int8": ["INT8"], "fp16": ["FP16"], "fp32": []}[precision]
    if cfg.dla_core is not None:
        if major >= 11:
            raise DeployError(f"DLA needs TensorRT 10.x (JetPack 6 ships 10.3); TensorRT {trt_version} does not "
                              "support DLA on Jetson")  # fmt: skip
        if precision == "fp32":
            raise DeployError("DLA runs only fp16 or int8: set tensorrt.precision, or dla_core: null")
        if cfg.gpu_fallback:
            flags.append("GPU_FALLBACK")
    return BuildPlan(
        tensorrt=trt_version,
        precision=precision,
        strongly_typed=strongly_typed,
        flags=tuple(flags),
        onnx_to_fp16=strongly_typed and precision == "fp16",
        workspace_bytes=cfg.workspace_mib << 20,
        input_name=input_name,
        profile=profile,
        dla_core=cfg.dla_core,
        timing_cache=cfg.timing_cache,
    )


def timing_cache_file(base: str, trt_version: str, compute_capability: str) -> Path:
    """One cache per TensorRT version and GPU architecture: TensorRT rejects a cache made by another."""
    p = Path(base).expanduser()
    return p.with_name(f"{p.stem}-trt{trt_version}-sm{compute_capability.replace('.', '')}{p.suffix}")


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


def read_sidecar(engine: Path) -> dict:
    path = sidecar_path(engine)
    if not path.is_file():
        raise DeployError(f"{path} is missing: an engine needs the sidecar written with it (rebuild with `deploy engine`)")
    return json.loads(path.read_text())


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


def to_fp16(model):
    """The ONNX graph in fp16 with fp32 inputs and outputs: how a strongly typed network gets fp16."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True)


def onnx_facts(model) -> tuple[str, list, bool]:
    """Input name, input dims (int or symbolic name), and whether the graph holds Q/DQ nodes."""
    inp = model.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in inp.type.tensor_type.shape.dim]
    quantized = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    return inp.name, dims, quantized


def build_engine(onnx_path: Path, out_dir: Path, cfg: TensorRTConfig, precision: str | None = None) -> dict:
    """Build `model.<precision>.engine` and its sidecar in `out_dir` from `onnx_path`; returns the sidecar."""
    import onnx
    import tensorrt as trt

    from ..console import info
    from ..runtimes.tensorrt import environment

    precision = precision or cfg.precision
    model = onnx.load(str(onnx_path))
    name, dims, quantized = onnx_facts(model)
    p = plan(trt.__version__, cfg, precision, name, dims, quantized)
    env = environment()
    if p.onnx_to_fp16:
        model = to_fp16(model)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if p.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise DeployError(f"TensorRT could not parse {onnx_path.name}: {errors[:400]}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, p.workspace_bytes)
    for flag in p.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if p.dla_core is not None:
        if builder.num_DLA_cores <= p.dla_core:
            raise DeployError(f"tensorrt.dla_core {p.dla_core} requested but this device has {builder.num_DLA_cores} DLA cores")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = p.dla_core
    profile = builder.create_optimization_profile()
    profile.set_shape(p.input_name, *p.profile)
    config.add_optimization_profile(profile)
    cache_file = timing_cache_file(p.timing_cache, p.tensorrt, env["compute_capability"]) if p.timing_cache else None
    cache_reused = bool(cache_file and cache_file.is_file())
    if cache_file:
        cache = config.create_timing_cache(cache_file.read_bytes() if cache_reused else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    info(f"  building TensorRT {p.tensorrt} {precision} engine on {env['gpu']} (flags: {', '.join(p.flags) or 'none'}, "
         f"{'strongly' if p.strongly_typed else 'weakly'} typed)")  # fmt: skip
    start = datetime.now(timezone.utc)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DeployError(f"TensorRT failed to build the {precision} engine from {onnx_path.name} (see its log above)")
    seconds = (datetime.now(timezone.utc) - start).total_seconds()
    if cache_file:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(cache_file, bytes(config.get_timing_cache().serialize()))

    engine = engine_path(out_dir, precision)
    sidecar = {
        "format": SIDECAR_FORMAT,
        **env,
        "precision": precision,
        "onnx": onnx_path.name,
        "onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
        "input": p.input_name,
        "profile": {"min": p.profile[0], "opt": p.profile[1], "max": p.profile[2]},
        "plan": p.to_dict(),
        "timing_cache": {"file": str(cache_file) if cache_file else None, "reused": cache_reused},
        "build_seconds": round(seconds, 1),
        "created": start.isoformat(timespec="seconds"),
    }
    _write_atomic(engine, bytes(serialized))
    _write_atomic(sidecar_path(engine), (json.dumps(sidecar, indent=2) + "\n").encode())
    return sidecar
