"""TensorRT engine build: ONNX -> serialized engine `model.<precision>.engine` + a JSON sidecar.

The settings that depend on the TensorRT version are decided by `plan()`, a pure function of
(version, recipe settings, ONNX facts) that runs and is tested on the CPU; `build_engine()` applies
the plan with TensorRT's Python API and needs TensorRT and a GPU.

TensorRT 10.x (JetPack 6 ships 10.3): weakly typed network; explicit Q/DQ needs the INT8 builder flag, and
int8 engines get FP16 too, so the layers outside Q/DQ pairs (h-swish, sigmoid, softmax) may run in fp16 rather
than fp32 (NVIDIA's advice for explicit quantization on 10.x: strongly typed, or INT8 with FP16);
fp16 needs the FP16 flag. TensorRT 11.x: strongly typed only (the precision flags and implicit calibration
are gone), so int8 comes from the Q/DQ nodes alone and fp16 from converting the ONNX graph to fp16.

DLA (Jetson Orin): static shapes only (min = opt = max) and fp16/int8 layers; anything else falls back to
the GPU (with gpu_fallback) or fails the build. TensorRT 11.x runs DLA from 11.4 on (AGX Orin, JetPack 7.2);
DLA builds are experimental here: the sidecar records how many layers DLA takes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from ...console import info, warn
from ...errors import DeployError
from ...recipe import TensorRTConfig
from .sidecar import SIDECAR_FORMAT, engine_path, sidecar_path



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
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


def plan(
    trt_version: str, cfg: TensorRTConfig, precision: str, input_name: str, input_dims: list, quantized: bool
) -> BuildPlan:
    """The builder settings for `precision` on TensorRT `trt_version`.

    `input_dims` is the ONNX input shape (ints, or strings for symbolic dimensions); `quantized`
    says whether the ONNX holds Q/DQ nodes.
    """
    major, minor = version_tuple(trt_version)
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
        flags += {"int8": ["INT8", "FP16"], "fp16": ["FP16"], "fp32": []}[precision]
    warnings = []
    if cfg.dla_core is not None:
        if major == 11 and minor < 4:
            raise DeployError(f"DLA needs TensorRT 10.x, or 11.4+ (AGX Orin with JetPack 7.2); TensorRT {trt_version} "
                              "does not run DLA")  # fmt: skip
        if precision == "fp32":
            raise DeployError("DLA runs only fp16 or int8: set tensorrt.precision, or dla_core: null")
        if not b.min == b.opt == b.max:
            raise DeployError(f"DLA needs static shapes: set tensorrt.batch min = opt = max (got {b.min}/{b.opt}/"
                              f"{b.max}); serve batches are then padded up to that batch")  # fmt: skip
        if cfg.gpu_fallback:
            flags.append("GPU_FALLBACK")
        warnings.append("DLA is experimental here: check the sidecar's dla.layers_on_dla for what fell back to the GPU")
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
        warnings=tuple(warnings),
    )


def timing_cache_file(base: str, trt_version: str, compute_capability: str, gpu: str) -> Path:
    """One cache per TensorRT version and GPU model: TensorRT rejects a cache made by another version or device
    (its header records the device), and two GPUs of one architecture (an A10 and an RTX 3090, sm 86) time
    tactics differently."""
    p = Path(base).expanduser()
    device = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") or "gpu"
    return p.with_name(f"{p.stem}-trt{trt_version}-sm{compute_capability.replace('.', '')}-{device}{p.suffix}")


def layer_precisions(info: dict) -> dict:
    """Layer counts by precision from the engine inspector's JSON (ProfilingVerbosity.DETAILED, shapes set): each
    layer counted by the datatype of its first input ("Format/Datatype", e.g. "Thirty-two wide channel vectorized
    row major Int8 format", "Row major linear FP32"); convolutions (LayerType *Convolution*) also on their own."""
    def kind(fmt: str) -> str:
        f = fmt.lower()
        return next((k for k, words in (("int8", ("int8",)), ("fp16", ("fp16", "half")), ("fp32", ("fp32", "float")))
                     if any(w in f for w in words)), "other")  # fmt: skip

    counts = {"layers": 0, "int8": 0, "fp16": 0, "fp32": 0, "other": 0, "convolutions": 0, "int8_convolutions": 0}
    for layer in info.get("Layers", []):
        if not isinstance(layer, dict):
            raise DeployError("engine inspector gave layer names only: build with ProfilingVerbosity.DETAILED")
        inputs = layer.get("Inputs") or [{}]
        k = kind(str(inputs[0].get("Format/Datatype", "")))
        counts["layers"] += 1
        counts[k] += 1
        if "convolution" in str(layer.get("LayerType", "")).lower():
            counts["convolutions"] += 1
            counts["int8_convolutions"] += k == "int8"
    return counts


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

    from .runtime import environment

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
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer precisions in the engine inspector
    for flag in p.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    dla = None
    if p.dla_core is not None:
        if builder.num_DLA_cores <= p.dla_core:
            raise DeployError(f"tensorrt.dla_core {p.dla_core} requested but this device has {builder.num_DLA_cores} "
                              "DLA cores")  # fmt: skip
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = p.dla_core
        layers = [network.get_layer(i) for i in range(network.num_layers)]
        dla = {"core": p.dla_core, "layers": len(layers), "layers_on_dla": sum(map(config.can_run_on_DLA, layers))}
    for w in p.warnings:
        warn(w)
    profile = builder.create_optimization_profile()
    profile.set_shape(p.input_name, *p.profile)
    config.add_optimization_profile(profile)
    cache_file = timing_cache_file(p.timing_cache, p.tensorrt, env["compute_capability"], env["gpu"]) \
        if p.timing_cache else None  # fmt: skip
    cache_record = _set_timing_cache(config, cache_file) if cache_file else {"file": None, "reused": False}

    info(f"  building TensorRT {p.tensorrt} {precision} engine on {env['gpu']} (flags: {', '.join(p.flags) or 'none'}, "
         f"{'strongly' if p.strongly_typed else 'weakly'} typed)")  # fmt: skip
    start = datetime.now(timezone.utc)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DeployError(f"TensorRT failed to build the {precision} engine from {onnx_path.name} (see its log above)")
    seconds = (datetime.now(timezone.utc) - start).total_seconds()
    if cache_file:
        final = config.get_timing_cache()
        cache_record["written"] = final is not None
        if final is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(cache_file, bytes(final.serialize()))

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
        "timing_cache": cache_record,
        "layers": _inspect(trt, logger, bytes(serialized), p),
        "dla": dla,
        "build_seconds": round(seconds, 1),
        "created": start.isoformat(timespec="seconds"),
    }
    _write_atomic(engine, bytes(serialized))
    _write_atomic(sidecar_path(engine), (json.dumps(sidecar, indent=2) + "\n").encode())
    return sidecar


def _set_timing_cache(config, cache_file: Path) -> dict:
    """Give the builder the cache in `cache_file` if TensorRT accepts it, else a fresh one; says which."""
    blob = cache_file.read_bytes() if cache_file.is_file() else b""
    try:
        cache = config.create_timing_cache(blob)
    except RuntimeError:  # a corrupt file: TensorRT's bindings raise where the C++ API returns null
        cache = None
    # set_timing_cache returns False for a cache from another TensorRT version or device (ignore_mismatch=False)
    accepted = cache is not None and config.set_timing_cache(cache, ignore_mismatch=False)
    if blob and not accepted:
        warn(f"TensorRT rejected the timing cache {cache_file} (made by another TensorRT or GPU): timing afresh")
        cache = config.create_timing_cache(b"")
    if not accepted and (cache is None or not config.set_timing_cache(cache, ignore_mismatch=False)):
        raise DeployError("TensorRT refused a fresh timing cache: set tensorrt.timing_cache: null")
    return {"file": str(cache_file), "loaded_bytes": len(blob), "reused": bool(blob) and accepted,
            "rejected": bool(blob) and not accepted}  # fmt: skip


def _inspect(trt, logger, serialized: bytes, p: BuildPlan) -> dict:
    """Layer precisions of the built engine, read back by the engine inspector at the profile's opt shape (with
    dynamic shapes unset, the inspector reports no formats)."""
    runtime = trt.Runtime(logger)
    if p.dla_core is not None:
        runtime.DLA_core = p.dla_core
    engine = runtime.deserialize_cuda_engine(serialized)
    context = engine.create_execution_context()
    context.set_input_shape(p.input_name, p.profile[1])
    inspector = engine.create_engine_inspector()
    inspector.execution_context = context
    return layer_precisions(json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON)))
