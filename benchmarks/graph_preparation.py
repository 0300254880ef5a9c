"""Cross-layer equalization and bias correction on EfficientNet-Lite0 (real weights), both targets.

    python benchmarks/graph_preparation.py --data ../shared/data [--calib 200] [--bc-images 64]

For each target: int8 as is, with bias correction (deploy/stages/bias_correction.py), with CLE
(deploy/stages/equalize.py) of the depthwise -> pointwise pairs or of every conv pair, ReLU6 rewritten
exactly or (all pairs) left alone, and CLE + bias correction. Prints top-1 drop, agreement with fp32 and
logit SQNR on the labeled validation images, with exact Q/DQ arithmetic and on this CPU's ORT kernels, and
the batch-1 time of the ort-cpu models on the kernels (exact ReLU6 equalization leaves a per-channel Min
that runs in float).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import onnx
import torch

from deploy import data, models, recipe
from deploy.runtimes.base import interleaved_best_ms
from deploy.runtimes.ort import OrtCpu, exact_int8_kernels
from deploy import metrics
from deploy.stages import export_onnx, fold_bn
from deploy.stages.int8 import quantize
from deploy.stages.int8.bias_correction import correct_bias
from deploy.stages.int8.equalize import equalize

VARIANTS = {  # name: ((CLE pairs, relu6) or None, bias correction)
    "plain": (None, False),
    "bias correction": (None, True),
    "CLE dw->pw": (("depthwise", "exact"), False),
    "CLE dw->pw + bias correction": (("depthwise", "exact"), True),
    "CLE all pairs": (("all", "exact"), False),
    "CLE all pairs + bias correction": (("all", "exact"), True),
    "CLE all pairs (ReLU6 skipped)": (("all", "skip"), False),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder holding imagenet-sample/")
    p.add_argument("--calib", type=int, default=200)
    p.add_argument("--bc-images", type=int, default=64)
    p.add_argument("--targets", default="ort-cpu,tensorrt")
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args()
    torch.manual_seed(0)
    r = recipe.load("efficientnet_lite0")
    pre = data.Preprocessor(r.preprocess)
    calib = data.calibration_data(args.data / "imagenet-sample/calib", pre, args.calib, 0, 0).calib.inputs
    val = data.labeled_set(args.data / "imagenet-sample/val", pre, 1000)
    rows, speed, cle, quantized = [], {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, _ = fold_bn.fold_batchnorm(models.build(r.model).eval())
        fp32 = work / "fp32.onnx"
        export_onnx.export(model, fp32, r.export, r.preprocess.input_size)
        ref = metrics.logits(OrtCpu(fp32), val, 32, "fp32")
        for target in args.targets.split(","):
            cfg = recipe.override(r, {"quantize.enabled": True, "quantize.target": target}).quantize
            for name in args.variants.split(","):
                how, bc = VARIANTS[name]
                tag = "-".join(how) if how else "fp32"
                source = work / f"{tag}.onnx"
                if how and how not in cle:
                    eq, cle[how] = equalize(onnx.load(str(fp32)), relu6=how[1], pairs=how[0])
                    onnx.save(eq, str(source))
                q = work / f"{target}-{tag}.onnx"
                if q not in quantized:
                    start = time.perf_counter()
                    quantize.quantize(source, q, calib, cfg, work / f"cache-{target}-{tag}", None)
                    quantized[q] = time.perf_counter() - start
                row = {"target": target, "variant": name, "quantize_s": quantized[q], "bc_s": None}
                if bc:
                    out = work / f"{target}-{tag}-bc.onnx"
                    row["bc_s"] = correct_bias(source, q, calib, out, images=args.bc_images)["seconds"]
                    q = out
                for kind, exact in (("exact", True), ("kernels", False)):
                    got = metrics.logits(OrtCpu(q, reference=exact), val, 32, f"{name} {kind}")
                    row[kind] = metrics.compare(ref, got, val.labels)
                if target == "ort-cpu":
                    speed[name] = q
                rows.append(row)
                print(f"  {target:9s} {name:32s} agreement {row['exact']['agreement']:.2f}%", flush=True)
        shape = (3, r.preprocess.input_size, r.preprocess.input_size)
        names = list(speed)
        times = interleaved_best_ms([OrtCpu(p, threads=1) for p in [fp32, *speed.values()]], shape, batch=1)

    print(f"\nEfficientNet-Lite0, {len(calib)} calibration images ({r.quantize.calibration.method}), {len(val)} "
          f"validation images, bias correction on {args.bc_images}; fp32 top-1 "
          f"{metrics.accuracy(ref, val.labels)['top1']:.2f}%; exact int8 kernels on this CPU: {exact_int8_kernels()}")
    for (pairs, relu6), rec in cle.items():
        spread = rec["range_spread"]["conv1_out"]
        print(f"CLE pairs={pairs} relu6={relu6}: {rec['pairs']} pairs {rec['kinds']}, {rec['per_channel_min']} "
              f"per-channel Min, conv1 output range spread (max/median) {spread['before'] or 0:.2f} -> "
              f"{spread['after'] or 0:.2f}, skipped {rec['skipped']}")
    print("\n| target | variant | top-1 drop exact | agreement exact | SQNR exact dB | top-1 drop kernels "
          "| agreement kernels | SQNR kernels dB | quantize s | bias correction s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        e, k = row["exact"], row["kernels"]
        bc_s = "" if row["bc_s"] is None else f"{row['bc_s']:.0f}"
        print(f"| {row['target']} | {row['variant']} | {e['top1_drop']:.2f} | {e['agreement']:.2f} "
              f"| {e['sqnr_db']:.2f} | {k['top1_drop']:.2f} | {k['agreement']:.2f} | {k['sqnr_db']:.2f} "
              f"| {row['quantize_s']:.0f} | {bc_s} |")
    print("\n| ort-cpu model | batch-1 ms (best of 100, 1 thread) | vs fp32 |")
    print("|---|---|---|")
    for n, ms in zip(["fp32", *names], times):
        print(f"| {n} | {ms:.2f} | {times[0] / ms:.2f}x |")


if __name__ == "__main__":
    main()
