"""Calibration quality: how many calibration images and which range method, on two real models.

    python benchmarks/calibration_study.py --data ../shared/data --cifar DIR [--target ort-cpu]
        [--percentiles 99.99,99.999] [--bias-correction] [--adaround] [--split] [--cifar-counts '' to skip CIFAR-10]

- EfficientNet-Lite0 (real ImageNet weights): 64 / 128 / 200 images from imagenet-sample/calib, evaluated on
  the 800 imagenet-sample/val images.
- a model trained on CIFAR-10 (--cifar-model, default mobilenet_v3_small at 64x64; its checkpoint in checkpoints/):
  64 / 256 / 1024 images from DIR/train, evaluated on --cifar-test images of DIR/test drawn with a seed.

Each count is crossed with each method (minmax, percentile at each of --percentiles, entropy: onnxruntime's; mse:
our range search, deploy/stages/int8/calibration.py) through deploy.stages.int8.quantize with the model's recipe
otherwise unchanged, then (--bias-correction) deploy.stages.int8.bias_correction as the build does by default;
--adaround adds a row per method with deploy.stages.int8.adaround before the bias correction; for --target
tensorrt the activations are centred as the build does (deploy.stages.int8.center; --center off|both).
Prints top-1 drop, top-1 agreement with fp32 and logit SQNR, with exact Q/DQ arithmetic (what TensorRT and
VNNI/AMX CPUs compute) and on this CPU's ORT kernels, and the quantization time. With --split, exact arithmetic
only, on two halves of the evaluation images (seeded shuffle, seed 0): split A to choose a default on, split B
to report it on."""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path
from typing import get_args

import numpy as np
import onnx

from deploy import data, metrics, models, recipe
from deploy.evalset import EvalSet
from deploy.runtimes.ort import OrtCpu, exact_int8_kernels
from deploy.stages import export_onnx, fold_bn
from deploy.stages.int8 import quantize
from deploy.stages.int8.adaround import adaround as adaround_weights
from deploy.stages.int8.bias_correction import correct_bias
from deploy.stages.int8.equalize import equalize as equalize_graph

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


def _runs(methods: list[str], percentiles: list[float] | None) -> list[tuple[str, float | None]]:
    """(method, percentile) pairs: percentile once per value of --percentiles (the recipe's without), others once."""
    return [(m, p) for m in methods for p in ((percentiles or [None]) if m == "percentile" else [None])]


def study(name: str, r: recipe.Recipe, calib_root: Path, val: EvalSet, counts: list[int], runs: list[tuple],
          target: str, bias_correction: bool, adaround: bool, equalize: bool, split: bool, centring: str,
          work: Path) -> list[dict]:  # fmt: skip
    model, _ = fold_bn.fold_batchnorm(models.build(r.model).eval())
    fp32 = work / f"{name}.onnx"
    export_onnx.export(model, fp32, r.export, r.preprocess.input_size)
    ref = metrics.logits(OrtCpu(fp32), val, 64, f"{name} fp32")
    if equalize:  # the build's equalize stage: the function is unchanged, only the weights' per-channel ranges
        eq, record = equalize_graph(onnx.load(str(fp32)), r.quantize.equalize.relu6, r.quantize.equalize.pairs)
        print(f"  {name}: equalized {record['pairs']} pairs {record['kinds']}, skipped {record['skipped']}")
        fp32 = work / f"{name}.equalized.onnx"
        onnx.save(eq, str(fp32))
    labels = val.labels
    # split A (tune) and split B (report): the val images in two halves by a seeded shuffle
    halves = dict(zip("AB", np.array_split(np.random.default_rng(0).permutation(len(labels)), 2))) if split else {}
    fp32_top1 = {"all": metrics.accuracy(ref, labels)["top1"]}
    fp32_top1.update({h: metrics.accuracy(ref[i], labels[i])["top1"] for h, i in halves.items()})
    pre = data.Preprocessor(r.preprocess)
    rows = []
    for n in counts:
        calib = data.calibration_data(calib_root, pre, n, 0, 0).calib.inputs
        for method, pct in runs:
            updates = {"quantize.enabled": True, "quantize.target": target, "quantize.calibration.method": method}
            cfg = recipe.override(r, updates | ({"quantize.calibration.percentile": pct} if pct else {})).quantize
            used = method if method != "percentile" else f"percentile-{cfg.calibration.percentile}"
            nearest = work / f"{name}-{n}-{used}.onnx"
            start = time.perf_counter()
            info = quantize.quantize(fp32, nearest, calib, cfg, work / f"cache-{name}-{n}-{used}", None)
            quantized = time.perf_counter() - start
            if info["calibration"]["method_used"] != method:  # the histogram methods' minmax fallback
                used = f"{used} (ran {info['calibration']['method_used']})"
            forms = [("", fp32, nearest)] if target != "tensorrt" or centring != "on" else []
            if target == "tensorrt" and centring != "off":  # the build's tensorrt form: activations centred (center.py)
                prepared, centred = work / f"{name}-{n}-{used}.centred-fp32.onnx", nearest.with_suffix(".centred.onnx")
                quantize.quantize_centred(fp32, centred, prepared, calib, cfg, work / f"cache-{name}-{n}-{used}",
                                          info["calibration"]["method_used"])  # fmt: skip
                forms.append((" centred", prepared, centred))
            # AdaRound first: it starts from the nearest model
            for (form, source, nearest), ada in itertools.product(forms, (True, False) if adaround else (False,)):
                out = nearest.with_suffix(".ada.onnx") if ada else nearest
                start = time.perf_counter() - quantized
                if ada:
                    adaround_weights(source, nearest, calib, out, cfg.adaround)
                if bias_correction:  # what the build does by default (quantize.bias_correction)
                    correct_bias(source, out, calib, out)
                label = used + form + (" + AdaRound" if ada else "")
                row = {"model": name, "images": len(calib), "method": label, "seconds": time.perf_counter() - start,
                       "fp32": fp32_top1}  # fmt: skip
                for how, exact in (("exact", True),) if split else (("exact", True), ("kernels", False)):
                    got = metrics.logits(OrtCpu(out, reference=exact), val, 64, f"{name} {n} {label} {how}")
                    row[how] = metrics.compare(ref, got, labels)
                row.update({h: metrics.compare(ref[i], got[i], labels[i]) for h, i in halves.items()})
                rows.append(row)
                shown = row["A" if split else "exact"]["agreement"]
                print(f"  {name} {len(calib):5d} {label:30s} agreement {shown:.2f}%{' (split A)' if split else ''} "
                      f"({row['seconds']:.0f} s)", flush=True)  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder holding imagenet-sample/")
    p.add_argument(
        "--cifar", type=Path, help="CIFAR-10 JPEGs: train/<class>/, test/<class>/ (not with --cifar-counts '')"
    )
    p.add_argument("--target", default="ort-cpu", choices=get_args(recipe.Target))
    p.add_argument("--methods", default="minmax,percentile,entropy,mse")
    p.add_argument("--percentiles", help="percentile runs at each of these (e.g. 99.99,99.999); default the recipe's")
    p.add_argument("--bias-correction", action="store_true", help="correct biases after quantize, as the build does")
    p.add_argument("--adaround", action="store_true", help="each method also with AdaRound (before bias correction)")
    p.add_argument("--equalize", action="store_true", help="cross-layer equalization first (quantize.equalize)")
    p.add_argument("--split", action="store_true", help="report on two seeded halves of the val images, A and B")
    p.add_argument("--center", choices=["on", "off", "both"], default="on",
                   help="tensorrt: centred activations (quantize.center_activations, on in the build), or both forms")
    p.add_argument("--lite0-counts", default="64,128,200", help="'' skips EfficientNet-Lite0")
    p.add_argument("--cifar-counts", default="64,256,1024", help="'' skips CIFAR-10")
    p.add_argument("--cifar-test", type=int, default=2000)
    p.add_argument("--cifar-model", default="mobilenet_v3_small", help="a recipe of recipes/cifar10/ (its checkpoint "
                   "in checkpoints/)")  # fmt: skip
    args = p.parse_args()
    if args.cifar_counts and not args.cifar:
        p.error("--cifar DIR is needed unless --cifar-counts ''")
    runs = _runs(args.methods.split(","), [float(x) for x in args.percentiles.split(",")] if args.percentiles else None)
    options = (args.target, args.bias_correction, args.adaround, args.equalize, args.split, args.center)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.lite0_counts:
            r = recipe.load("efficientnet_lite0")
            val = data.labeled_set(args.data / "imagenet-sample/val", data.Preprocessor(r.preprocess), 1000)
            rows += study("efficientnet_lite0", r, args.data / "imagenet-sample/calib", val,
                          [int(c) for c in args.lite0_counts.split(",")], runs, *options, work)  # fmt: skip
        if args.cifar_counts:
            name = args.cifar_model
            r = recipe.load(str(ROOT / f"recipes/cifar10/{name}.yaml"))
            r = recipe.override(r, {"model.weights": str(ROOT / f"checkpoints/{r.model.name}_cifar10.pth")})
            test = _subset(args.cifar / "test", args.cifar_test, work)
            val = data.labeled_set(test, data.Preprocessor(r.preprocess), r.model.num_classes)
            rows += study(f"{name}_cifar10", r, args.cifar / "train", val,
                          [int(c) for c in args.cifar_counts.split(",")], runs, *options, work)  # fmt: skip

    cols = {"A": "split A (tune)", "B": "split B (report)"} if args.split else {"exact": "exact", "kernels": "kernels"}
    print(
        f"\ntarget {args.target}; bias correction {'on' if args.bias_correction else 'off'}; AdaRound rows: "
        f"{'yes' if args.adaround else 'no'}; equalization {'on' if args.equalize else 'off'}; centred activations "
        f"(tensorrt): {args.center}; "
        f"exact int8 kernels on this CPU (VNNI/AMX): {exact_int8_kernels()}"
    )
    if args.split:
        print(
            "exact Q/DQ arithmetic on both halves of the val images (seed 0); defaults are chosen on split A "
            "(tune) and reported on split B (report)"
        )
    print(
        "| model | calib images | method | "
        + " | ".join(f"fp32 top-1 {c} | top-1 drop {c} | agreement {c} | SQNR {c} dB" for c in cols.values())
        + f" | quantize{' + bias correction' if args.bias_correction else ''} s |"
    )
    print("|---|---|---|" + "---|" * (4 * len(cols) + 1))
    for row in rows:
        fp32 = [row["fp32"][h if args.split else "all"] for h in cols]
        print(f"| {row['model']} | {row['images']} | {row['method']} | " + " | ".join(
            f"{f:.2f} | {row[h]['top1_drop']:.2f} | {row[h]['agreement']:.2f} | {row[h]['sqnr_db']:.2f}"
            for f, h in zip(fp32, cols)) + f" | {row['seconds']:.0f} |")  # fmt: skip
    for name in dict.fromkeys(row["model"] for row in rows) if args.split else []:
        best = max((x for x in rows if x["model"] == name), key=lambda x: (x["A"]["agreement"], x["A"]["sqnr_db"]))
        a, b = best["A"], best["B"]
        print(
            f"\n{name}: best on split A (tune) by agreement, then SQNR: {best['images']} images, {best['method']} "
            f"(A: agreement {a['agreement']:.2f}%, {a['sqnr_db']:.2f} dB); on split B (report): agreement "
            f"{b['agreement']:.2f}%, SQNR {b['sqnr_db']:.2f} dB, top-1 drop {b['top1_drop']:.2f}"
        )


if __name__ == "__main__":
    main()
