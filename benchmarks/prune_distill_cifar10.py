"""Pruning x fine-tuning on CIFAR-10, one run: what pruning costs and what KD buys back.

    python benchmarks/prune_distill_cifar10.py --cifar DIR [--checkpoint checkpoints/mobilenet_v3_small_cifar10.pth]
        [--ratios 0.3,0.5] [--epochs 3] [--train-images N] [--test-images N]

DIR holds train/ and test/ (extract ../shared/data/cifar10-jpeg.tar.gz). For the unpruned model and each
MACs ratio: no fine-tune, CE fine-tune and KD fine-tune (teacher = the unpruned model), with the same epochs,
images, learning rate and seed. Prints test top-1 (fp32 on ORT), params, MACs, ORT batch-1 p50 and throughput
at batch 32. Latency-aware pruning is not implemented yet, so it is not compared here.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np
import torch

from deploy import macs, models
from deploy import recipe as recipes
from deploy.recipe import ExportConfig
from deploy.runtimes.ort import OrtCpu
from deploy.stages import distill, prune
from deploy.stages.export_onnx import export
from deploy.train import eval_transform, fit, image_folder, subset, train_transform

ROOT = Path(__file__).resolve().parents[1]


def _measure(model, x, y, size, tmp: Path) -> dict:
    path = tmp / "m.onnx"
    export(model, path, ExportConfig(simplify=False), size)
    rt = OrtCpu(path)
    pred = np.concatenate([rt.infer(x[i : i + 250]).argmax(1) for i in range(0, len(x), 250)])
    lat = rt.benchmark((3, size, size), batch=32, warmup=20, runs=200)
    return {"top1": 100.0 * float((pred == y).mean()), **macs.count(model, size), "p50_ms": lat.p50_ms,
            "throughput": lat.throughput_ips}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cifar", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "mobilenet_v3_small_cifar10.pth")
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-images", type=int, help="fine-tune on this many training images (default: all)")
    ap.add_argument("--test-images", type=int, help="evaluate on this many test images (default: all 10,000)")
    args = ap.parse_args()

    recipe = recipes.load(str(ROOT / "recipes" / "cifar10" / "mobilenet_v3_small.yaml"))
    recipe = recipes.override(recipe, {"model.weights": str(args.checkpoint), "distill.epochs": args.epochs})
    size = recipe.preprocess.input_size
    teacher = models.build(recipe.model)
    test = subset(image_folder(args.cifar / "test", eval_transform(recipe.preprocess), 10, "test"), args.test_images, 0)
    x = torch.stack([test[i][0] for i in range(len(test))]).numpy()
    y = np.array([test[i][1] for i in range(len(test))])
    train = subset(image_folder(args.cifar / "train", train_transform(recipe.preprocess, recipe.distill.augment), 10,
                                "training"), args.train_images, 0)  # fmt: skip
    plain = subset(image_folder(args.cifar / "train", eval_transform(recipe.preprocess), 10, "training"), 512, 1)
    calib = torch.stack([plain[i][0] for i in range(len(plain))]).numpy()  # unlabeled, for BN re-estimation
    # CE fine-tuning gets exactly KD's loop settings: only the loss differs.
    loop = recipe.train.model_copy(update={"epochs": args.epochs, "lr": recipe.distill.lr,
                                           "batch_size": recipe.distill.batch_size})  # fmt: skip
    ce = torch.nn.CrossEntropyLoss(label_smoothing=loop.label_smoothing)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(("unpruned", "-", _measure(teacher, x, y, size, Path(tmp))))
        for ratio in (float(r) for r in args.ratios.split(",")):
            cfg = recipe.prune.model_copy(update={"enabled": True, "ratio": ratio})
            pruned, _ = prune.prune(teacher, cfg, size, calib)
            rows.append((f"pruned {ratio:.0%} MACs", "none", _measure(pruned, x, y, size, Path(tmp))))
            student = copy.deepcopy(pruned)  # CE and KD start from the same pruned weights
            fit(student, train, loop, lambda logits, _x, labels: ce(logits, labels))
            batches = torch.utils.data.DataLoader(subset(train, 2048, loop.seed), batch_size=loop.batch_size)
            prune.adapt_bn(student, (b for b, _ in batches))  # as distill() does after its loop
            rows.append((f"pruned {ratio:.0%} MACs", f"CE {args.epochs} ep", _measure(student, x, y, size, Path(tmp))))
            distill.distill(pruned, teacher, train, recipe.distill, recipe.train)
            rows.append((f"pruned {ratio:.0%} MACs", f"KD {args.epochs} ep", _measure(pruned, x, y, size, Path(tmp))))

    print(f"\nmobilenet_v3_small, CIFAR-10 test ({len(y)} images), {size}x{size}, ORT CPU fp32, "
          f"fine-tuning on {len(train)} images\n")  # fmt: skip
    print("| model | fine-tune | top-1 % | params M | MACs M | p50 ms | img/s (b32) |")
    print("|---|---|---|---|---|---|---|")
    for name, ft, m in rows:
        print(f"| {name} | {ft} | {m['top1']:.2f} | {m['params'] / 1e6:.3f} | {m['macs'] / 1e6:.1f} | "
              f"{m['p50_ms']:.3f} | {m['throughput']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
