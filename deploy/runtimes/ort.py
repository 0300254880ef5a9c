"""ONNX Runtime on the CPU: the runtime that always works."""

from __future__ import annotations

import os
import platform
from functools import cache
from pathlib import Path

import numpy as np

from .base import Runtime


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@cache
def exact_int8_kernels() -> bool:
    """Whether this CPU has int8 dot-product instructions (x86 VNNI/AMX, Arm dotprod).

    Without them, ORT's x86 U8S8 kernels use VPMADDUBSW, whose int16 pair sums saturate
    (255 * 127 * 2 > 32767) so int8 results drift from exact Q/DQ arithmetic; see
    https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html (reduce_range).
    """
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine().lower() in ("arm64", "aarch64")  # Apple silicon has dotprod
    flags = set(cpuinfo.split())
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"})


class OrtCpu(Runtime):
    """ORT's CPU execution provider. `reference=True` turns graph optimizations off, so Q/DQ nodes are
    evaluated one by one in float: the exact arithmetic of the QDQ model (what TensorRT and VNNI CPUs
    compute), at the cost of speed; use it for accuracy, never for latency.

    Its threads stop spinning when a run returns (ORT's session.force_spinning_stop): otherwise an idle session's
    workers spin on the cores for a while after each run, which on a 2-core machine made sessions timed in
    alternating rounds at 2 threads 2x slower at the median (docs/int8.md); a single session measured the same
    either way."""

    def __init__(self, model: Path | bytes, threads: int | None = None, reference: bool = False):
        import onnxruntime as ort

        self.threads = threads or default_threads()
        self.name = "onnxruntime-cpu (reference Q/DQ arithmetic)" if reference else "onnxruntime-cpu"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_DISABLE_ALL if reference else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        )
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        source = str(model) if isinstance(model, Path) else model
        self.session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]
