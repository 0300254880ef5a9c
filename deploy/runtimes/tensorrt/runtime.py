"""TensorRT engines behind the Runtime interface: named I/O tensors, `execute_async_v3`, CUDA-event timing.

Device memory and streams come from cuda-python (`cuda.bindings.runtime`), not torch: JetPack's
torch wheels on PyPI are CPU-only, while cuda-python is small, matches the CUDA runtime API that
TensorRT's own samples use, and installs on x86 and Jetson alike.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ...errors import DeployError
from ..base import Latency, Runtime


def _ok(result):
    """cuda-python returns (error, *values): raise on an error, return the value(s)."""
    from cuda.bindings import runtime as cudart

    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        raise DeployError(f"CUDA error: {cudart.cudaGetErrorString(err)[1].decode()}")
    return values[0] if len(values) == 1 else values


def unavailable() -> str | None:
    """Why TensorRT cannot run here (one line), or None when it can."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (it ships with JetPack and NVIDIA's TensorRT images; see docker/)"
    if importlib.util.find_spec("cuda") is None or importlib.util.find_spec("cuda.bindings") is None:
        # cuda.bindings is in 12.6.1 on; 13.x needs a CUDA 13 driver, which JetPack 6 lacks
        return "cuda-python is not installed (pip install 'cuda-python>=12.6.1,<13')"
    from cuda.bindings import runtime as cudart

    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or not count:
        return f"no CUDA device ({cudart.cudaGetErrorString(err)[1].decode()})"
    return None


def environment(device: int = 0) -> dict:
    """TensorRT version and GPU identity: what decides whether an engine can be loaded."""
    import tensorrt as trt
    from cuda.bindings import runtime as cudart

    props = _ok(cudart.cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {
        "tensorrt": trt.__version__,
        "gpu": name.rstrip("\x00").strip(),
        "compute_capability": f"{props.major}.{props.minor}",
        "cuda_runtime": _ok(cudart.cudaRuntimeGetVersion()),
    }


def chunks(n: int, min_batch: int, max_batch: int) -> list[tuple[int, int, int]]:
    """(start, stop, batch run) covering `n` images with the engine profile's batch range: chunks of at most
    `max_batch`, one shorter than `min_batch` run padded up to it (TensorRT refuses a shape outside the profile)."""
    return [(i, min(i + max_batch, n), max(min(i + max_batch, n) - i, min_batch)) for i in range(0, n, max_batch)]


def run_in_profile(batch: np.ndarray, min_batch: int, max_batch: int, run) -> np.ndarray:
    """`run` (one engine execution) over `batch` within the profile: chunked, short chunks zero-padded, and the
    padding's outputs sliced off."""
    outs = []
    for start, stop, size in chunks(len(batch), min_batch, max_batch):
        x = batch[start:stop]
        if size > len(x):
            x = np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)])
        outs.append(run(x)[: stop - start])
    return np.concatenate(outs)


class TensorRTEngine(Runtime):
    """A serialized engine with its sidecar; refuses, in one line, an engine built for another GPU/TensorRT."""

    def __init__(self, engine: Path):
        import tensorrt as trt
        from cuda.bindings import runtime as cudart

        from .sidecar import incompatibility, read_sidecar

        why = unavailable()
        if why:
            raise DeployError(why)
        self.sidecar = read_sidecar(engine)
        mismatch = incompatibility(self.sidecar, environment())
        if mismatch:
            raise DeployError(mismatch)
        self.threads = 1
        self.name = f"tensorrt-{trt.__version__} {self.sidecar['precision']} on {self.sidecar['gpu']}"
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        dla_core = self.sidecar["plan"].get("dla_core")
        if dla_core is not None:  # an engine with DLA layers runs them on the core the runtime names
            runtime.DLA_core = dla_core
        self.engine = runtime.deserialize_cuda_engine(engine.read_bytes())
        if self.engine is None:
            raise DeployError(f"TensorRT could not deserialize {engine}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise DeployError(f"{engine}: expected one input and one output tensor, got {inputs} and {outputs}")
        self.input, self.output = inputs[0], outputs[0]
        self.in_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input)))
        self.out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output)))
        min_shape, _, max_shape = self.engine.get_tensor_profile_shape(self.input, 0)
        self.min_batch, self.max_batch = int(min_shape[0]), int(max_shape[0])
        self._set_shape(tuple(max_shape))
        out_max = tuple(self.context.get_tensor_shape(self.output))
        self.stream = _ok(cudart.cudaStreamCreate())
        self._in = _ok(cudart.cudaMalloc(int(np.prod(max_shape)) * self.in_dtype.itemsize))
        self._out = _ok(cudart.cudaMalloc(int(np.prod(out_max)) * self.out_dtype.itemsize))
        self.context.set_tensor_address(self.input, int(self._in))
        self.context.set_tensor_address(self.output, int(self._out))

    def _set_shape(self, shape: tuple[int, ...]) -> None:
        if not self.context.set_input_shape(self.input, shape):  # False: outside the engine's profile
            raise DeployError(f"TensorRT refused input shape {shape}: the engine's profile takes batch "
                              f"{self.min_batch}..{self.max_batch}")  # fmt: skip

    def _enqueue(self, x: np.ndarray) -> np.ndarray:
        """Copy in, execute, copy out on the stream; the caller synchronizes."""
        from cuda.bindings import runtime as cudart

        self._set_shape(x.shape)
        out = np.empty(tuple(self.context.get_tensor_shape(self.output)), self.out_dtype)
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _ok(cudart.cudaMemcpyAsync(self._in, x.ctypes.data, x.nbytes, h2d, self.stream))
        if not self.context.execute_async_v3(int(self.stream)):
            raise DeployError("TensorRT execute_async_v3 failed")
        _ok(cudart.cudaMemcpyAsync(out.ctypes.data, self._out, out.nbytes, d2h, self.stream))
        return out

    def infer(self, batch: np.ndarray) -> np.ndarray:
        from cuda.bindings import runtime as cudart

        def run(x: np.ndarray) -> np.ndarray:
            out = self._enqueue(np.ascontiguousarray(x, dtype=self.in_dtype))
            _ok(cudart.cudaStreamSynchronize(self.stream))
            return out

        return run_in_profile(batch, self.min_batch, self.max_batch, run).astype(np.float32, copy=False)

    def benchmark(self, input_shape: tuple[int, ...], batch: int, warmup: int, runs: int) -> Latency:
        """Batch-1 percentiles timed with CUDA events (copies in and out included), after warm-up; throughput at
        `batch`, within the engine profile's batch range. An engine whose profile starts above 1 times its
        smallest batch (what one request costs, padded) for the percentiles."""
        from cuda.bindings import runtime as cudart

        batch = min(max(batch, self.min_batch), self.max_batch)
        rng = np.random.default_rng(0)
        one = np.ascontiguousarray(rng.standard_normal((self.min_batch, *input_shape)), dtype=self.in_dtype)
        many = np.ascontiguousarray(rng.standard_normal((batch, *input_shape)), dtype=self.in_dtype)
        start, end = _ok(cudart.cudaEventCreate()), _ok(cudart.cudaEventCreate())

        def timed(x: np.ndarray, repeat: int) -> float:
            _ok(cudart.cudaEventRecord(start, self.stream))
            for _ in range(repeat):
                self._enqueue(x)
            _ok(cudart.cudaEventRecord(end, self.stream))
            _ok(cudart.cudaEventSynchronize(end))
            return float(_ok(cudart.cudaEventElapsedTime(start, end)))

        for _ in range(warmup):
            timed(one, 1)
        ms = np.array([timed(one, 1) for _ in range(runs)])
        timed(many, 1)
        batch_runs = max(3, -(-runs // batch))
        throughput = batch * batch_runs / (timed(many, batch_runs) / 1e3)
        _ok(cudart.cudaEventDestroy(start))
        _ok(cudart.cudaEventDestroy(end))
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return Latency(float(p50), float(p90), float(p99), float(ms.mean()), float(throughput), batch, runs, 1)

    def __del__(self):
        try:
            from cuda.bindings import runtime as cudart

            cudart.cudaFree(self._in)
            cudart.cudaFree(self._out)
            cudart.cudaStreamDestroy(self.stream)
        except (AttributeError, ImportError):
            pass
