"""Runs ON the device (Python 3.8+, numpy, onnxruntime; nothing of this package): logits of the shipped models on
the shipped images, start-up time, batch-1 latency, throughput, fp32/int8 in alternating rounds, and what the
device is. Prints one JSON object on stdout.

    python3 device_runner.py DIR --protocol N [--threads T] --warmup W --runs R --batch B --eval-batch E --deadline S
        [--engine VERSION]
    python3 device_runner.py DIR --protocol N --time A.onnx,B.onnx,... --sessions S --rounds R --runs N --deadline S

DIR holds model.fp32.onnx, model.int8.onnx (optional), images.npy and base.py (deploy/runtimes/base.py: the
timing code the build itself uses). --engine: also build a TensorRT engine there with tensorrt.json's settings
and measure it; that needs edge-deploy[engine] VERSION installed on the device (its TensorRT code) and TensorRT.
--time: only the batch-1 latency of each model (the latency-aware pruning search), S sessions each, all timed
in alternating rounds; prints each session's best time (ms)."""

import argparse
import base64
import io
import json
import os
import platform
import signal
import sys
import time

import numpy as np

PROTOCOL = 1


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--protocol", type=int, required=True)
    p.add_argument("--threads", type=int)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--runs", type=int, required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--engine", metavar="VERSION", help="the host's edge-deploy version")
    p.add_argument("--time", help="comma-separated model files in DIR: time them only")
    p.add_argument("--sessions", type=int, default=1)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--deadline", type=int, required=True, help="seconds before this process is killed (SIGALRM)")
    args = p.parse_args()
    if args.protocol != PROTOCOL:
        json.dump({"protocol": PROTOCOL, "error": f"the host speaks protocol {args.protocol}"}, sys.stdout)
        return 3
    signal.alarm(args.deadline)
    try:
        import onnxruntime as ort
    except ImportError as err:
        json.dump({"protocol": PROTOCOL, "error": f"cannot import onnxruntime ({err})"}, sys.stdout)
        return 3
    sys.path.insert(0, args.dir)
    from base import Runtime, interleaved_best_ms

    class OrtCpu(Runtime):
        """The build's ORT CPU session options (deploy/runtimes/ort.py)."""

        def __init__(self, path: str, threads: int):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads = threads
            opts.inter_op_num_threads = 1
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.log_severity_level = 3
            self.name = "onnxruntime-cpu"
            self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            self.input_name = self.session.get_inputs()[0].name

        def infer(self, batch: np.ndarray) -> np.ndarray:
            return self.session.run(None, {self.input_name: batch})[0]

    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    if args.time:
        sessions = [OrtCpu(os.path.join(args.dir, f), threads) for f in args.time.split(",") for _ in range(args.sessions)]
        inp = sessions[0].session.get_inputs()[0].shape
        best = interleaved_best_ms(sessions, tuple(inp[1:]), 1, args.rounds, args.runs)
        json.dump({"protocol": PROTOCOL, "best_ms": best, "environment": _environment(ort, threads)}, sys.stdout)
        return 0
    images = np.load(os.path.join(args.dir, "images.npy"))
    shape = images.shape[1:]
    models, runtimes = {}, []
    for precision in ("fp32", "int8"):
        path = os.path.join(args.dir, f"model.{precision}.onnx")
        if not os.path.isfile(path):
            continue
        start = time.perf_counter()
        rt = OrtCpu(path, threads)
        rt.infer(images[:1])
        startup = time.perf_counter() - start
        logits = np.concatenate(
            [rt.infer(images[i : i + args.eval_batch]) for i in range(0, len(images), args.eval_batch)]
        )
        latency = rt.benchmark(shape, args.batch, args.warmup, args.runs).to_dict()
        models[precision] = {"startup_s": startup, "latency": latency, "logits": _npy(logits)}
        runtimes.append(rt)
    out = {"protocol": PROTOCOL, "environment": _environment(ort, threads), "models": models}
    if len(runtimes) == 2:
        out["interleaved_best_ms"] = interleaved_best_ms(runtimes, shape, batch=1)
    if args.engine:
        try:
            models["engine"] = _engine(args, images)
        except Exception as err:  # noqa: BLE001 - one line back to the host, whatever TensorRT raised
            json.dump({"protocol": PROTOCOL, "error": f"TensorRT engine: {str(err).splitlines()[0][:300]}"}, sys.stdout)
            return 3
    json.dump(out, sys.stdout)
    return 0


def _engine(args, images: np.ndarray) -> dict:
    """Build the engine with the installed edge-deploy's TensorRT code (the version the host runs), then its
    start-up (deserialize + first inference), logits and latency."""
    from pathlib import Path

    import deploy
    from deploy.recipe import TensorRTConfig
    from deploy.runtimes.tensorrt import TensorRTEngine
    from deploy.runtimes.tensorrt.builder import build_engine
    from deploy.runtimes.tensorrt.sidecar import engine_path

    if deploy.__version__ != args.engine:
        raise RuntimeError(f"the device has edge-deploy {deploy.__version__}, the host {args.engine}: install the "
                           "same version there")  # fmt: skip
    folder = Path(args.dir)
    cfg = TensorRTConfig.model_validate_json((folder / "tensorrt.json").read_text())
    source = folder / ("model.int8.onnx" if cfg.precision == "int8" else "model.fp32.onnx")
    if not source.is_file():
        raise RuntimeError(f"tensorrt.precision {cfg.precision} needs {source.name}, which the build does not have")
    start = time.perf_counter()
    build_engine(source, folder, cfg)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    rt = TensorRTEngine(engine_path(folder, cfg.precision))
    rt.infer(images[:1])
    startup = time.perf_counter() - start
    batch = min(args.eval_batch, cfg.batch.max)
    logits = np.concatenate([rt.infer(images[i : i + batch]) for i in range(0, len(images), batch)])
    latency = rt.benchmark(images.shape[1:], min(args.batch, cfg.batch.max), args.warmup, args.runs).to_dict()
    return {"precision": cfg.precision, "onnx": source.name, "build_s": build_s, "startup_s": startup,
            "latency": latency, "logits": _npy(logits)}  # fmt: skip


def _npy(array: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()


def _environment(ort, threads: int) -> dict:
    try:
        import tensorrt

        trt = tensorrt.__version__
    except ImportError:
        trt = None
    return {
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "machine": platform.machine(),
        "os": _os_name(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
        "tensorrt": trt,
    }


def _cpu_name() -> str:
    """x86: the model name; Arm: the board (a Jetson names itself in the device tree), else the CPU part."""
    for path, key in (
        ("/proc/cpuinfo", "model name"),
        ("/proc/device-tree/model", None),
        ("/proc/cpuinfo", "Hardware"),
    ):
        try:
            with open(path, errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        if key is None:
            return text.strip("\x00\n ")
        for line in text.splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _os_name() -> str:
    try:
        with open("/etc/os-release") as f:
            fields = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
        return f"{fields['PRETTY_NAME'].strip(chr(34))} ({platform.release()})"
    except (OSError, KeyError):
        return platform.platform()


if __name__ == "__main__":
    sys.exit(main())
