"""Our int8 against onnxruntime's quantize_static, same model, same data, one run.

    python benchmarks/int8_vs_peers.py --data ../shared/data [--models efficientnet_lite0,mobilenet_v3_small]

For each model: fp32 on ORT, our int8 for each target, and quantize_static with its defaults
(per-tensor) and with per_channel=True. Prints top-1 on this CPU's ORT kernels, top-1 with exact Q/DQ
arithmetic (what VNNI/AMX CPUs and TensorRT compute), agreement with fp32, batch-1 p50, throughput at
batch 32 and build time. Models without offline weights are measured for latency only (random weights).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from deploy import data, models, recipe
from deploy.errors import DeployError
from deploy.runtimes.ort import OrtCpu, exact_int8_kernels
from deploy.stages import export_onnx, fold_bn, quantize, verify


def _peer(fp32: Path, out: Path, calib: np.ndarray, per_channel: bool) -> None:
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter({"input": calib[i : i + 1]} for i in range(len(calib)))

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(fp32), str(out), Reader(), per_channel=per_channel)


def bench_model(name: str, root: Path, workdir: Path, threads: int | None) -> list[dict]:
    r = recipe.load(name)
    try:
        model = models.build(r.model)
        weights = "pretrained"
    except DeployError:
        model = models.architecture(r.model).eval()
        weights = "random (no offline weights): latency only"
    model, _ = fold_bn.fold_batchnorm(model)
    fp32 = workdir / f"{name}.fp32.onnx"
    export_onnx.export(model, fp32, r.export, r.preprocess.input_size)
    pre = data.Preprocessor(r.preprocess)
    calib = data.calibration_data(root / "calib", pre, r.quantize.calibration.samples, 0, 0).calib.inputs
    val = data.labeled_set(root / "val", pre, 1000) if weights == "pretrained" else None

    variants = {"fp32": (fp32, 0.0)}
    for target in ("ort-cpu", "tensorrt"):
        out = workdir / f"{name}.ours-{target}.onnx"
        cfg = recipe.override(r, {"quantize.enabled": True, "quantize.target": target}).quantize
        start = time.perf_counter()
        quantize.quantize(fp32, out, calib, cfg, workdir / f"cache-{name}-{target}", None)
        variants[f"ours {target}"] = (out, time.perf_counter() - start)
    for label, per_channel in (("quantize_static defaults", False), ("quantize_static per-channel", True)):
        out = workdir / f"{name}.{label.replace(' ', '_')}.onnx"
        start = time.perf_counter()
        _peer(fp32, out, calib, per_channel)
        variants[label] = (out, time.perf_counter() - start)

    rows, ref = [], None
    shape = (3, r.preprocess.input_size, r.preprocess.input_size)
    for label, (path, seconds) in variants.items():
        rt = OrtCpu(path, threads)
        lat = rt.benchmark(shape, batch=32, warmup=20, runs=300)
        row = {"model": name, "variant": label, "weights": weights, "p50_ms": lat.p50_ms,
               "throughput_ips": lat.throughput_ips, "build_s": seconds}  # fmt: skip
        if val is not None:
            got = verify.logits(rt, val.inputs, 32, label)
            exact = got if label == "fp32" else verify.logits(OrtCpu(path, threads, reference=True), val.inputs, 32, label)
            ref = got if label == "fp32" else ref
            row.update(
                top1=verify.accuracy(got, val.labels)["top1"],
                top1_exact=verify.accuracy(exact, val.labels)["top1"],
                agreement_exact=verify.compare(ref, exact, None)["agreement"],
            )
        rows.append(row)
        print(f"  {name:20s} {label:28s} done", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder holding imagenet-sample/")
    p.add_argument("--models", default="efficientnet_lite0,mobilenet_v3_small")
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows += bench_model(name, args.data / "imagenet-sample", Path(tmp), args.threads)

    print(f"\nexact int8 kernels on this CPU (VNNI/AMX): {exact_int8_kernels()}")
    print("| model | variant | top-1 ORT CPU | top-1 exact Q/DQ | agreement (exact) | p50 ms | vs fp32 | img/s @32 | vs fp32 | build s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    fp32 = {row["model"]: row for row in rows if row["variant"] == "fp32"}
    for row in rows:
        base = fp32[row["model"]]
        acc = (
            f"{row['top1']:.2f} | {row['top1_exact']:.2f} | {row['agreement_exact']:.2f}"
            if "top1" in row else "n/a | n/a | n/a"
        )  # fmt: skip
        print(f"| {row['model']} | {row['variant']} | {acc} | {row['p50_ms']:.2f} | {base['p50_ms'] / row['p50_ms']:.2f}x "
              f"| {row['throughput_ips']:.0f} | {row['throughput_ips'] / base['throughput_ips']:.2f}x | {row['build_s']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
