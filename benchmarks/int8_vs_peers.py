"""Our int8 against onnxruntime's quantize_static, same model, same calibration images, one run.

    python benchmarks/int8_vs_peers.py --data ../shared/data [--cifar DIR] [--models efficientnet_lite0]
        [--cifar-models mobilenet_v3_small,mobilenet_v2,shufflenet_v2_x1_0,efficientnet_b0] [--qat-images 10000]

Models: the ImageNet ones of --models (imagenet-sample/calib for calibration, val/ for evaluation; a model
without offline weights is measured for latency only) and, with --cifar (train/ and test/ of CIFAR-10 JPEGs),
the committed CIFAR-10 checkpoints of --cifar-models (256 training images for calibration, the 10,000 test
images).
Variants: fp32; quantize_static with its defaults (per-tensor) and with per_channel=True; ours = `deploy
build --int8` for each target (its quantize, bias-correction and verify stages as a user runs them; with no
--val the build holds out verify.heldout of the calibration images for its own check, so it calibrates on
fewer images than the peers, which get all of them), and with
--cifar also ours with QAT (`--qat on`, --qat-images training images). Top-1 with exact Q/DQ arithmetic (what
TensorRT and VNNI/AMX CPUs compute; on this CPU's kernels too when they are not exact), drop, agreement with
fp32, batch-1 time and batch-32 throughput (all variants of a model in alternating rounds, best of each:
interleaved_best_ms), build time (the int8 stages, not export or verify).
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
from deploy.core.context import BuildOptions
from deploy.core.runner import build
from deploy.runtimes.base import interleaved_best_ms
from deploy.runtimes.ort import OrtCpu, exact_int8_kernels
from deploy import metrics

ROOT = Path(__file__).resolve().parents[1]
INT8_STAGES = {"equalize", "quantize", "bias_correction", "qat", "quantize_qat", "mixed_precision"}


def _peer(fp32: Path, out: Path, calib: np.ndarray, per_channel: bool) -> float:
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter({"input": calib[i : i + 1]} for i in range(len(calib)))

        def get_next(self):
            return next(self.it, None)

    start = time.perf_counter()
    quantize_static(str(fp32), str(out), Reader(), per_channel=per_channel)
    return time.perf_counter() - start


def _ours(r: recipe.Recipe, opts: BuildOptions, overrides: dict) -> tuple[Path, Path, float]:
    """(fp32 ONNX, int8 ONNX, seconds of the int8 stages) of a real build."""
    r = recipe.override(r, {"quantize.enabled": True, "verify.max_top1_drop": None, "verify.latency.runs": 5,
                            **overrides})  # fmt: skip
    report, _ = build(r, opts)
    seconds = sum(s["seconds"] for s in report["stages"] if s["name"] in INT8_STAGES)
    return opts.out / "model.fp32.onnx", opts.out / "model.int8.onnx", seconds


def bench_model(label: str, r: recipe.Recipe, calib_dir: Path, val: data.ImageSet | None, work: Path,
                train: Path | None, qat_images: int) -> list[dict]:  # fmt: skip
    variants: dict[str, tuple[Path, float]] = {}
    for target in ("ort-cpu", "tensorrt"):
        fp32, int8, seconds = _ours(r, BuildOptions(calib=calib_dir, out=work / target), {"quantize.target": target})
        variants.setdefault("fp32", (fp32, 0.0))
        variants[f"ours {target}"] = (int8, seconds)
        if train is not None:
            qat = {"quantize.target": target, "quantize.qat.mode": "on", "quantize.qat.images": qat_images}
            _, int8, seconds = _ours(r, BuildOptions(calib=calib_dir, out=work / f"{target}-qat", train=train), qat)
            variants[f"ours {target} + QAT"] = (int8, seconds)
    # the peers calibrate on the same preprocessed images our build drew
    calib = data.calibration_data(calib_dir, data.Preprocessor(r.preprocess), r.quantize.calibration.samples,
                                  r.quantize.calibration.seed, 0).calib.inputs  # fmt: skip
    for name, per_channel in (("quantize_static defaults", False), ("quantize_static per-channel", True)):
        out = work / f"{name.replace(' ', '_')}.onnx"
        variants[name] = (out, _peer(variants["fp32"][0], out, calib, per_channel))

    shape = (3, r.preprocess.input_size, r.preprocess.input_size)
    rts = [OrtCpu(path, threads=1) for path, _ in variants.values()]
    b1 = interleaved_best_ms(rts, shape, batch=1, rounds=20, runs=10)
    b32 = interleaved_best_ms(rts, shape, batch=32, rounds=5, runs=4)
    rows, ref = [], None
    for (name, (path, seconds)), ms1, ms32 in zip(variants.items(), b1, b32):
        row = {"model": label, "variant": name, "ms": ms1, "ips": 32e3 / ms32, "build_s": seconds}
        if val is not None:
            exact = metrics.logits(OrtCpu(path, reference=True), val, 64, name)
            ref = exact if name == "fp32" else ref
            agreement = metrics.compare(ref, exact, None)["agreement"]
            row.update(top1=metrics.accuracy(exact, val.labels)["top1"], agreement=agreement)
            if not exact_int8_kernels():
                kernels = metrics.logits(OrtCpu(path), val, 64, name)
                row["top1_kernels"] = metrics.accuracy(kernels, val.labels)["top1"]
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder holding imagenet-sample/")
    p.add_argument("--cifar", type=Path, help="CIFAR-10 JPEGs (train/, test/): adds the CIFAR-10 models")
    p.add_argument("--cifar-models", default="mobilenet_v3_small,mobilenet_v2,shufflenet_v2_x1_0,efficientnet_b0",
                   help="CIFAR-10 recipes (recipes/cifar10/) measured when checkpoints/<name>_cifar10.pth exists")
    p.add_argument("--models", default="efficientnet_lite0", help="ImageNet models, comma-separated")
    p.add_argument("--qat-images", type=int, default=10000, help="training images for the QAT variants; 0 = none")
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in filter(None, args.models.split(",")):
            r = recipe.load(name)
            try:
                models.build(r.model)
                val = data.labeled_set(args.data / "imagenet-sample" / "val", data.Preprocessor(r.preprocess), 1000)
            except DeployError:  # no offline weights: latency only, with random weights
                r, val = recipe.override(r, {"model.weights": models.RANDOM_WEIGHTS}), None
            rows += bench_model(name, r, args.data / "imagenet-sample" / "calib", val, Path(tmp) / name, None, 0)
        for name in filter(None, args.cifar_models.split(",") if args.cifar else []):
            weights = ROOT / "checkpoints" / f"{name}_cifar10.pth"
            if not weights.is_file():
                print(f"skipping CIFAR-10 {name}: no {weights}")
                continue
            r = recipe.override(recipe.load(str(ROOT / "recipes" / "cifar10" / f"{name}.yaml")),
                                {"model.weights": str(weights)})  # fmt: skip
            val = data.labeled_set(args.cifar / "test", data.Preprocessor(r.preprocess), 10)
            rows += bench_model(f"{name} CIFAR-10", r, args.cifar / "train", val, Path(tmp) / f"cifar-{name}",
                                args.cifar / "train" if args.qat_images else None, args.qat_images)  # fmt: skip

    kernels = exact_int8_kernels()
    print(f"\nexact int8 kernels on this CPU (VNNI/AMX): {kernels}; latency: 1 thread, best of interleaved rounds")
    head = "| model | variant | top-1 % | drop | agreement % |" + ("" if kernels else " top-1 ORT kernels |")
    print(head + " batch-1 ms | vs fp32 | img/s @32 | vs fp32 | int8 build s |")
    print("|" + "---|" * (head.count("|") + 4))
    fp32 = {row["model"]: row for row in rows if row["variant"] == "fp32"}
    for row in rows:
        base = fp32[row["model"]]
        acc = (f"{row['top1']:.2f} | {base['top1'] - row['top1']:.2f} | {row['agreement']:.2f} |"
               if "top1" in row else "n/a | n/a | n/a |")  # fmt: skip
        acc += "" if kernels else f" {row.get('top1_kernels', float('nan')):.2f} |"
        print(f"| {row['model']} | {row['variant']} | {acc} {row['ms']:.3f} | {base['ms'] / row['ms']:.2f}x | "
              f"{row['ips']:.0f} | {row['ips'] / base['ips']:.2f}x | {row['build_s']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
