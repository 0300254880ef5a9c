"""Calibration quality: how many calibration images and which range method, on two real models.

    python benchmarks/calibration_study.py --data ../shared/data --cifar DIR [--target ort-cpu]

- EfficientNet-Lite0 (real ImageNet weights): 64 / 128 / 200 images from imagenet-sample/calib, evaluated on
  the 800 imagenet-sample/val images.
- mobilenet_v3_small trained on CIFAR-10 (checkpoints/, 64x64): 64 / 256 / 1024 images from DIR/train,
  evaluated on 2000 images of DIR/test drawn with a seed.

Each count is crossed with each method (minmax, percentile, entropy: onnxruntime's; mse: our range search,
deploy/stages/mse_calibration.py) through deploy.stages.int8.quantize with the model's recipe otherwise unchanged.
Prints top-1 drop, top-1 agreement with fp32 and logit SQNR, with exact Q/DQ arithmetic (what TensorRT and
VNNI/AMX CPUs compute) and on this CPU's ORT kernels, and the quantization time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from deploy import data, models, recipe
from deploy.runtimes.ort import OrtCpu, exact_int8_kernels
from deploy import metrics
from deploy.stages import export_onnx, fold_bn
from deploy.stages.int8 import quantize

ROOT = Path(__file__).resolve().parents[1]


def _subset(root: Path, n: int, work: Path) -> Path:
    """A labeled folder of `n` images of `root` drawn with seed 0 (symlinks, class folders kept)."""
    paths = data.list_images(root, "test")
    out = work / "test-subset"
    for i in np.sort(np.random.default_rng(0).choice(len(paths), n, replace=False)):
        dst = out / paths[i].parent.name / paths[i].name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(paths[i])
    return out


def study(name: str, r: recipe.Recipe, calib_root: Path, val: data.ImageSet, counts: list[int], methods: list[str],
          target: str, work: Path) -> list[dict]:  # fmt: skip
    model, _ = fold_bn.fold_batchnorm(models.build(r.model).eval())
    fp32 = work / f"{name}.onnx"
    export_onnx.export(model, fp32, r.export, r.preprocess.input_size)
    ref = metrics.logits(OrtCpu(fp32), val, 64, f"{name} fp32")
    fp32_top1 = metrics.accuracy(ref, val.labels)["top1"]
    pre = data.Preprocessor(r.preprocess)
    rows = []
    for n in counts:
        calib = data.calibration_data(calib_root, pre, n, 0, 0).calib.inputs
        for method in methods:
            cfg = recipe.override(r, {"quantize.enabled": True, "quantize.target": target,
                                      "quantize.calibration.method": method}).quantize  # fmt: skip
            out = work / f"{name}-{n}-{method}.onnx"
            start = time.perf_counter()
            info = quantize.quantize(fp32, out, calib, cfg, work / f"cache-{name}-{n}-{method}", None)
            row = {"model": name, "images": len(calib), "method": info["calibration"]["method_used"],
                   "seconds": time.perf_counter() - start, "fp32": fp32_top1}  # fmt: skip
            for how, exact in (("exact", True), ("kernels", False)):
                got = metrics.logits(OrtCpu(out, reference=exact), val, 64, f"{name} {n} {method} {how}")
                row[how] = metrics.compare(ref, got, val.labels)
            rows.append(row)
            print(f"  {name} {len(calib):5d} {method:10s} agreement {row['exact']['agreement']:.2f}% "
                  f"({row['seconds']:.0f} s)", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder holding imagenet-sample/")
    p.add_argument("--cifar", type=Path, required=True, help="CIFAR-10 JPEGs: train/<class>/, test/<class>/")
    p.add_argument("--target", default="ort-cpu", choices=["ort-cpu", "tensorrt"])
    p.add_argument("--methods", default="minmax,percentile,entropy,mse")
    p.add_argument("--lite0-counts", default="64,128,200")
    p.add_argument("--cifar-counts", default="64,256,1024")
    p.add_argument("--cifar-test", type=int, default=2000)
    args = p.parse_args()
    methods = args.methods.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.lite0_counts:
            r = recipe.load("efficientnet_lite0")
            val = data.labeled_set(args.data / "imagenet-sample/val", data.Preprocessor(r.preprocess), 1000)
            rows += study("efficientnet_lite0", r, args.data / "imagenet-sample/calib", val,
                          [int(c) for c in args.lite0_counts.split(",")], methods, args.target, work)  # fmt: skip
        if args.cifar_counts:
            r = recipe.load(str(ROOT / "recipes/cifar10/mobilenet_v3_small.yaml"))
            r = recipe.override(r, {"model.weights": str(ROOT / "checkpoints/mobilenet_v3_small_cifar10.pth")})
            test = _subset(args.cifar / "test", args.cifar_test, work)
            val = data.labeled_set(test, data.Preprocessor(r.preprocess), r.model.num_classes)
            rows += study("mobilenet_v3_small_cifar10", r, args.cifar / "train", val,
                          [int(c) for c in args.cifar_counts.split(",")], methods, args.target, work)  # fmt: skip

    print(f"\ntarget {args.target}; exact int8 kernels on this CPU (VNNI/AMX): {exact_int8_kernels()}")
    print("| model | fp32 top-1 | calib images | method | top-1 drop exact | agreement exact | SQNR exact dB "
          "| top-1 drop kernels | agreement kernels | SQNR kernels dB | quantize s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        e, k = row["exact"], row["kernels"]
        print(f"| {row['model']} | {row['fp32']:.2f} | {row['images']} | {row['method']} | {e['top1_drop']:.2f} "
              f"| {e['agreement']:.2f} | {e['sqnr_db']:.2f} | {k['top1_drop']:.2f} | {k['agreement']:.2f} "
              f"| {k['sqnr_db']:.2f} | {row['seconds']:.0f} |")


if __name__ == "__main__":
    main()
