"""Post-training int8 quantization to QDQ ONNX with onnxruntime's quantization tool, made for a target.

ort-cpu:  uint8 activations (asymmetric), int8 per-channel symmetric weights: the U8S8 form that
          ORT's x86 kernels run fast; h-swish/h-sigmoid rewritten to run in int8 and, where it pays, the
          stem kept in float (qdq_placement.py).
tensorrt: int8 activations with zero-point 0, int8 per-channel symmetric weights on the output-channel
          axis: what TensorRT's explicit quantization accepts (it also runs on ORT CPU, slowly); Q/DQ only
          on the inputs of Conv/Gemm/MatMul/Add, so each Conv fuses with its activation; biases stay float
          (TensorRT's ONNX parser takes only INT8/FP8/INT4 into DequantizeLinear, so an int32 bias DQ fails
          the parse; TensorRT quantizes the bias itself when it fuses the Conv; NVIDIA ModelOpt does the same).
openvino: the tensorrt placement (OpenVINO's CPU plugin also fuses each Conv with its activation) with the ort-cpu
          form's uint8 asymmetric activations and int32 biases: faster there than either form (docs/int8.md),
          slower than the ort-cpu form on ORT CPU.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import numpy as np
import onnx

from ...console import track, warn
from ...errors import DeployError
from ...core.context import PREPARED, Build
from ...recipe import QuantizeConfig
from . import center, check_prepared, qdq_placement
from .histogram import fast_histograms

CALIB_BATCH = 8
# tensorrt placement (conv_inputs_only): Q/DQ on the inputs of these ops and of Add (so both inputs of a residual
# Add are quantized), none on their outputs, so TensorRT fuses each with the activation after it
TENSORRT_WEIGHTED = ["Conv", "Gemm", "MatMul"]


@contextmanager
def _quiet_ort():
    """quantize_static prints calibration chatter to stdout and logs advice on the root logger
    ("consider pre-processing"). We skip that pre-processing on purpose: it splits HardSwish into
    HardSigmoid+Mul. Our own progress bar replaces the chatter."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as devnull, redirect_stdout(devnull):
            yield
    finally:
        root.setLevel(level)


def _reader(inputs: np.ndarray, input_name: str):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """Feeds calibration batches; ORT reads it in strides (set_range) so that histogram
        calibration never holds every activation of every image in memory at once."""

        def __init__(self):
            self.batches = [inputs[i : i + CALIB_BATCH] for i in range(0, len(inputs), CALIB_BATCH)]
            self._stream = iter(track(self.batches, "Calibrating", total=len(self.batches)))
            self._left = len(self.batches)

        def __len__(self) -> int:
            return len(self.batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._left = end_index - start_index

        def get_next(self):
            if self._left <= 0:
                return None
            self._left -= 1
            batch = next(self._stream, None)
            return None if batch is None else {input_name: batch}

    return Reader()


def _readable(cache: Path) -> bool:
    """Whether onnxruntime can load a cached range file; a truncated or damaged one is a miss (recalibrate)."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    try:
        load_tensors_data(cache)
        return True
    except Exception as err:  # noqa: BLE001 - json, key and type errors of a damaged file
        warn(f"ignoring the damaged calibration cache {cache} ({type(err).__name__}); recalibrating")
        return False


def cache_key(fp32: Path, calib: np.ndarray, cfg: QuantizeConfig) -> str:
    """Calibration ranges depend on the model, the preprocessed images, the calibration settings and the target
    (tensorrt's activations are symmetric: its percentile, entropy and mse ranges differ from the others')."""
    h = hashlib.sha256(fp32.read_bytes())
    h.update(np.ascontiguousarray(calib).tobytes())
    h.update(json.dumps({"method": cfg.calibration.method, "percentile": cfg.calibration.percentile,
                         "target": cfg.target}).encode())  # fmt: skip
    h.update(json.dumps(quantized_op_types(cfg)).encode())  # ORT calibrates only the tensors of these ops
    return h.hexdigest()[:16]


def quantized_op_types(cfg: QuantizeConfig) -> list[str] | None:
    """The op types onnxruntime quantizes; None = all it can."""
    return [*TENSORRT_WEIGHTED, "Add"] if cfg.target != "ort-cpu" and cfg.conv_inputs_only else None


def float_stem(model: onnx.ModelProto, cfg: QuantizeConfig) -> list[str]:
    """Names of the stem nodes kept in float (ort-cpu, `float_stem`; see qdq_placement.float_stem_pays)."""
    if cfg.target != "ort-cpu" or cfg.float_stem is False:
        return []
    nodes = qdq_placement.stem_nodes(model)
    return nodes if cfg.float_stem or qdq_placement.float_stem_pays(model, nodes) else []


def excluded_nodes(model: onnx.ModelProto, patterns: list[str]) -> list[str]:
    names = [n.name for n in model.graph.node]
    out = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise DeployError(f"quantize.exclude pattern {unmatched[0]!r} matches no node of the model")
    return out


def quantize(
    fp32: Path, out: Path, calib: np.ndarray, cfg: QuantizeConfig, cache_dir: Path, previous_cache: Path | None
) -> dict:
    """Write the int8 QDQ model of `fp32` to `out`; returns what the report needs to know.

    Calibration ranges are cached as `ranges-<key>-<method used>.json` in `cache_dir`; one found in
    `previous_cache` (the last build's folder) with the same key is reused instead of calibrating.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
        "mse": CalibrationMethod.MinMax,  # ORT has no MSE method: mse_calibration.py writes the ranges to the cache
    }
    model = onnx.load(str(fp32))
    excluded = excluded_nodes(model, cfg.exclude)
    stem = float_stem(model, cfg)
    op_types = quantized_op_types(cfg)
    symmetric_activations = float_bias = cfg.target == "tensorrt"
    key = cache_key(fp32, calib, cfg)
    cache_dir.mkdir(parents=True, exist_ok=True)
    found = [c for c in sorted(previous_cache.glob(f"ranges-{key}-*.json")) if _readable(c)] if previous_cache else []
    if found:
        shutil.copy2(found[0], cache_dir / found[0].name)
    method_used = found[0].stem.rsplit("-", 1)[1] if found else cfg.calibration.method

    def run(method: str) -> None:
        cache = cache_dir / f"ranges-{key}-{method}.json"
        if method == "mse" and not cache.is_file():
            from .calibration import write_ranges

            with _quiet_ort():
                write_ranges(Path(source), _reader(calib, model.graph.input[0].name), op_types, symmetric_activations, cache)
        with _quiet_ort(), fast_histograms():
            quantize_static(
                source,
                str(out),
                calibration_data_reader=None if found else _reader(calib, model.graph.input[0].name),
                quant_format=QuantFormat.QDQ,
                per_channel=cfg.per_channel,
                reduce_range=cfg.reduce_range,
                activation_type=QuantType.QInt8 if symmetric_activations else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=methods[method],
                nodes_to_exclude=sorted(set(excluded) | set(stem)),
                op_types_to_quantize=op_types,
                calibration_cache_path=str(cache),
                extra_options={
                    "ActivationSymmetric": symmetric_activations,
                    "QuantizeBias": not float_bias,
                    "WeightSymmetric": True,
                    "CalibStridedMinMax": 1,  # one reader batch per collection step (see Reader)
                    "CalibPercentile": cfg.calibration.percentile,
                    **({"OpTypesToExcludeOutputQuantization": TENSORRT_WEIGHTED} if op_types else {}),
                },
            )

    with tempfile.TemporaryDirectory() as tmp:
        source = str(fp32)
        if qdq_placement.own_constants(model, excluded + stem):  # float nodes keep float constants
            source = str(Path(tmp) / "fp32.onnx")
            onnx.save(model, source)
        try:
            run(method_used)
        except ValueError as err:
            # ORT's histogram collector calls np.histogram(bins=2048) on each tensor, which fails on
            # a (nearly) constant one: fall back to min/max ranges rather than give up.
            if "bins" not in str(err) or method_used == "minmax":
                raise
            warn(f"{method_used} calibration failed on a near-constant tensor ({err}); using minmax")
            method_used = "minmax"
            run(method_used)
    qmodel = onnx.load(str(out))
    rewrites, float_inputs = {}, 0
    if cfg.target == "ort-cpu":
        rewrites = qdq_placement.rewrite_hard_activations(qmodel) if cfg.int8_hard_activations else {}
        float_inputs = qdq_placement.float_inputs(qmodel, excluded + stem)
    compensated = center.compensate(qmodel, model)  # the readers of a centred model's activations: center.py
    if cfg.target == "ort-cpu" or compensated:
        onnx.save(qmodel, str(out))
    ops = Counter(n.op_type for n in qmodel.graph.node)
    return {
        "target": cfg.target,
        "activations": "int8 symmetric (zero-point 0)" if symmetric_activations else "uint8 asymmetric",
        "weights": f"int{7 if cfg.reduce_range else 8} symmetric " + ("per-channel" if cfg.per_channel else "per-tensor"),
        "bias": "float" if float_bias else "int32 (scale = input scale x weight scale)",
        "calibration": {**cfg.calibration.model_dump(), "method_used": method_used, "images": len(calib),
                        "cache_reused": bool(found)},
        "excluded_nodes": excluded,
        "placement": {"float_stem": stem, "int8_hard_activations": rewrites, "float_inputs_per_channel": float_inputs,
                      "quantized_op_types": op_types or "all onnxruntime quantizes"},  # fmt: skip
        "quantize_linear": ops["QuantizeLinear"],
        "dequantize_linear": ops["DequantizeLinear"],
        "op_types": dict(sorted(ops.items())),
    }


def quantize_centred(fp32: Path, out: Path, prepared: Path, calib: np.ndarray, cfg: QuantizeConfig, cache_dir: Path,
                     method: str) -> dict:  # fmt: skip
    """After quantize() wrote `out` from `fp32`, with its ranges cached in `cache_dir` by `method`: write the
    centred `fp32` to `prepared` (center.py) and re-quantize `out` from it with the shifted ranges, without
    calibrating again. Returns center.center_ranges' record; when nothing can be centred nothing is written."""
    from onnxruntime.quantization.calibrate import load_tensors_data, save_tensors_data

    ranges = load_tensors_data(cache_dir / f"ranges-{cache_key(fp32, calib, cfg)}-{method}.json")
    model = onnx.load(str(fp32))
    record = center.center_ranges(model, ranges)
    if record["activations"]:
        onnx.save(model, str(prepared))
        with tempfile.TemporaryDirectory() as tmp:
            save_tensors_data(ranges, Path(tmp) / f"ranges-{cache_key(prepared, calib, cfg)}-{method}.json")
            quantize(prepared, out, calib, cfg, cache_dir, Path(tmp))
    return record


class Quantize:
    """Post-training quantization of `Build.source` into model.int8.onnx; for the tensorrt target the result is
    checked against TensorRT's operator table and Q/DQ rules (errors fail the build, lost fusions warn)."""

    name = "quantize"

    def applies(self, b: Build) -> bool:
        return b.recipe.quantize.enabled

    def run(self, b: Build) -> str:
        q = b.recipe.quantize
        b.int8_onnx = b.workdir / "model.int8.onnx"
        previous = b.previous / "calibration-cache" if b.previous else None
        b.report["quantize"] = quantize(b.source, b.int8_onnx, b.calibration.calib.inputs, q,
                                        b.workdir / "calibration-cache", previous)  # fmt: skip
        b.report["quantize"]["source"] = b.source.name
        notes = f"{q.target}, {q.calibration.method}"
        if b.report["quantize"]["calibration"]["cache_reused"]:
            notes += ", cached ranges reused"
        if q.target == "tensorrt" and q.center_activations and q.conv_inputs_only:
            notes += _center(b)
        b.int8_changed()
        if q.target == "tensorrt":
            _check_for_tensorrt(b)
        return notes


def _center(b: Build) -> str:
    """The tensorrt form with its activations centred (center.py): b.source becomes the centred fp32 model."""
    prepared = b.workdir / PREPARED
    tmp = prepared.with_suffix(".tmp")  # the source may be `prepared` (equalized, or from QAT)
    record = b.report["center_activations"] = quantize_centred(
        b.source, b.int8_onnx, tmp, b.calibration.calib.inputs, b.recipe.quantize, b.workdir / "calibration-cache",
        b.report["quantize"]["calibration"]["method_used"])  # fmt: skip
    if record["activations"]:
        record["max_abs_logit_diff"] = check_prepared(b, b.source, tmp)
        tmp.replace(prepared)
        b.source = prepared
        b.report["quantize"]["source"] = prepared.name
    return f", {record['activations']} activations centred"


def _check_for_tensorrt(b: Build) -> None:
    from ...runtimes.tensorrt import qdq_check

    model = onnx.load(str(b.int8_onnx))
    c = b.report["qdq_check"] = qdq_check.summary(model, qdq_check.check(model))
    c["errors"] += [f"fp32 model: {v}" for v in qdq_check.operators(onnx.load(str(b.fp32_onnx)))]
    c["passed"] = not c["errors"]
    b.report["failures"] += [f"TensorRT Q/DQ rule: {e}" for e in c["errors"]]
    if c["warnings"]:
        b.warn(f"{len(c['warnings'])} Q/DQ placements cost TensorRT a fusion (builds, runs slower), "
               f"first: {c['warnings'][0]}")  # fmt: skip
