"""A build's evaluation at scale: peak RSS and images/s for 2,000 / 10,000 / 50,000 validation images at 224 px.

    python benchmarks/scale.py --cifar DIR [--counts 2000,10000,50000] [--workers 1,2] [--size 224]

DIR holds train/ (extract ../shared/data/cifar10-jpeg.tar.gz): its 50,000 JPEGs in ten class folders are the
validation set of the 10-class CIFAR-10 mobilenet_v3_small recipe, upsampled to --size. Each row is one real
`deploy build --int8 --val DIR/train --val-limit N --workers W` in a fresh process: peak RSS is the largest of
the build and its decoding workers (getrusage), images/s the build's first evaluation pass (fp32 and int8 in
one pass: report.json validation.first_pass). Then training images/s with 1 vs 2 processes comes from
benchmarks/scale_train.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
         "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")  # fmt: skip


def recipe_file(tmp: Path, size: int) -> Path:
    from deploy import recipe as recipes

    r = recipes.override(recipes.load(str(ROOT / "recipes/cifar10/mobilenet_v3_small.yaml")), {
        "preprocess.input_size": size, "preprocess.resize": round(size * 256 / 224), "quantize.enabled": True,
        "model.weights": str(ROOT / "checkpoints/mobilenet_v3_small_cifar10.pth"), "verify.max_top1_drop": None,
        "verify.latency.runs": 20, "verify.latency.warmup": 5})  # fmt: skip
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(r.model_dump(mode="json")))
    return path


def one_build(recipe: Path, cifar: Path, n: int, workers: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "deploy", "build", str(recipe), "--calib", str(cifar / "train" / "airplane"),
           "--val", str(cifar / "train"), "--val-limit", str(n), "--workers", str(workers), "--out", str(out)]  # fmt: skip
    peak_kb = int(subprocess.run([sys.executable, "-c", PROBE, *cmd], check=True, capture_output=True,
                                 text=True).stdout.split()[-1])  # fmt: skip
    val = json.loads((out / "report.json").read_text())["validation"]
    return {"images": val["evaluated"], "workers": workers, "peak_rss_mb": peak_kb / 1024,
            "images_per_s": val["first_pass"]["images_per_s"], "models": "+".join(val["first_pass"]["models"])}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cifar", type=Path, required=True)
    p.add_argument("--counts", default="2000,10000,50000")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--size", type=int, default=224)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        recipe = recipe_file(Path(tmp), args.size)
        for w in map(int, args.workers.split(",")):
            for n in map(int, args.counts.split(",")):
                rows.append(one_build(recipe, args.cifar, n, w, Path(tmp) / f"build-{n}-{w}"))
                r = rows[-1]
                print(f"  {r['images']} images, {w} workers: {r['peak_rss_mb']:.0f} MB, {r['images_per_s']:.0f} img/s",
                      file=sys.stderr)  # fmt: skip
    print(f"\n| images ({args.size} px) | workers | peak RSS MB | vs smallest | eval images/s ({rows[0]['models']}) |")
    print("|---|---|---|---|---|")
    for r in rows:
        base = min(x["peak_rss_mb"] for x in rows if x["workers"] == r["workers"])
        print(f"| {r['images']:,} | {r['workers']} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / base:.3f} | "
              f"{r['images_per_s']:.0f} |")


if __name__ == "__main__":
    main()
