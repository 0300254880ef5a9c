"""Which channels to prune for a MACs target: uniform (the same ratio in every layer, L2) vs the KL choice
(prune.scope kl, the default), on the CIFAR-10 checkpoints, before and after distillation.

    python benchmarks/prune_scopes_cifar10.py --cifar DIR [--models mobilenet_v3_small,shufflenet_v2_x1_0,mobilenet_v2]
        [--ratio 0.3] [--epochs 3] [--train-images 5000] [--test-images 10000] [--torch-threads 1]

DIR holds train/ and test/ (extract ../shared/data/cifar10-jpeg.tar.gz). Tuning discipline: the KL proxy and
BatchNorm re-estimation see 512 training images, distillation the first --train-images of a seeded draw of the
training set; figures are top-1 on the test images (ORT CPU fp32), which nothing was chosen on.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from deploy import macs, models
from deploy import recipe as recipes
from deploy.recipe import ExportConfig
from deploy.runtimes.ort import OrtCpu
from deploy.stages import distill, prune
from deploy.stages.export_onnx import export
from prune_distill_cifar10 import cifar_data  # benchmarks/, on the path when run as a script

ROOT = Path(__file__).resolve().parents[1]


def top1(model, x: np.ndarray, y: np.ndarray, size: int, tmp: Path) -> float:
    export(model, tmp / "m.onnx", ExportConfig(simplify=False), size)
    rt = OrtCpu(tmp / "m.onnx")
    pred = np.concatenate([rt.infer(x[i : i + 250]).argmax(1) for i in range(0, len(x), 250)])
    return 100.0 * float((pred == y).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cifar", type=Path, required=True)
    ap.add_argument("--models", default="mobilenet_v3_small,shufflenet_v2_x1_0,mobilenet_v2")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-images", type=int, default=5000)
    ap.add_argument("--test-images", type=int, default=10000)
    # On a 2-core machine shared with other jobs, 2 OpenMP threads ran a training step 3-4x slower than 1 (spinning)
    ap.add_argument("--torch-threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)
    rows = []
    for name in args.models.split(","):
        r = recipes.load(str(ROOT / "recipes" / "cifar10" / f"{name}.yaml"))
        r = recipes.override(r, {"model.weights": str(ROOT / "checkpoints" / f"{name}_cifar10.pth"),
                                 "distill.epochs": args.epochs, "prune.enabled": True, "prune.ratio": args.ratio})  # fmt: skip
        size = r.preprocess.input_size
        teacher = models.build(r.model)
        x, y, train, calib = cifar_data(args.cifar, r, args.train_images, args.test_images)
        with tempfile.TemporaryDirectory() as tmp:
            base = top1(teacher, x, y, size, Path(tmp))
            for scope in ("uniform", "kl"):
                start = time.perf_counter()
                pruned, rec = prune.prune(teacher, r.prune.model_copy(update={"scope": scope}), size, calib)
                seconds = time.perf_counter() - start
                before = top1(pruned, x, y, size, Path(tmp))
                student = copy.deepcopy(pruned)
                distill.distill(student, teacher, train, r.distill, r.train)
                after = top1(student, x, y, size, Path(tmp))
                rows.append((name, scope, base, rec["macs_reduction"], macs.count(pruned, size)["macs"], before, after,
                             seconds))  # fmt: skip
                print(rows[-1], flush=True)
    print(f"\nPruned {args.ratio:.0%} of MACs; KD {args.epochs} epochs on {args.train_images} training images; top-1 on "
          f"{args.test_images} CIFAR-10 test images (ORT CPU fp32)\n")  # fmt: skip
    print("| model | channels chosen | unpruned | MACs removed | MACs M | no fine-tune | after KD | drop after KD | "
          "prune s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, scope, base, red, m, before, after, s in rows:
        print(f"| {name} | {scope} | {base:.2f} | {red:.3f} | {m / 1e6:.2f} | {before:.2f} | {after:.2f} | "
              f"{base - after:.2f} | {s:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
