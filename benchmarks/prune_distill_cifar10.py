"""Pruning x fine-tuning on CIFAR-10, one run: what pruning costs and what KD buys back.

    python benchmarks/prune_distill_cifar10.py --cifar DIR [--checkpoint checkpoints/mobilenet_v3_small_cifar10.pth]
        [--ratios 0.3,0.5] [--epochs 3] [--train-images N] [--test-images N] [--latency-vs 0.3] [--torch-threads 1]

DIR holds train/ and test/ (extract ../shared/data/cifar10-jpeg.tar.gz). For the unpruned model and each
MACs ratio: no fine-tune, CE fine-tune and KD fine-tune (teacher = the unpruned model), with the same epochs,
images, learning rate and seed. Prints test top-1 (fp32 on ORT), params, MACs, ORT batch-1 p50 and throughput
at batch 32.

Then latency-aware pruning (prune.mode latency, deploy/stages/prune_latency.py) against uniform pruning by
--latency-vs MACs: one NetAdapt-style search, snapshotted where it first has the uniform model's MACs (which
is faster?) and where it first reaches the uniform model's latency (which is more accurate?); all four models
timed interleaved in one run (batch 1, one ORT thread), and the snapshots fine-tuned with KD like the others.
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
from deploy.runtimes.base import interleaved_best_ms
from deploy.runtimes.ort import OrtCpu
from deploy.stages import distill, prune
from deploy.stages.export_onnx import export
from deploy.stages.prune.latency import MAX_STEPS, SESSIONS, LatencySearch
from deploy.stages.prune.timing import LocalTimer
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


def _latency_aware(teacher, uniform, cfg, size, calib) -> dict[str, torch.nn.Module]:
    """Snapshots of one latency-aware search: at the uniform model's MACs and at its measured latency."""
    sessions = [[OrtCpu(_onnx(m, size), threads=1) for _ in range(2)] for m in (teacher, uniform)]
    best = interleaved_best_ms([s for pair in sessions for s in pair], (3, size, size), 1, rounds=20, runs=10)
    uniform_ratio = (best[2] + best[3]) / (best[0] + best[1])
    uniform_macs = macs.count(uniform, size)["macs"]
    search, snaps = LatencySearch(teacher, cfg, size, calib, LocalTimer(size, SESSIONS)), {}
    try:
        while len(snaps) < 2 and len(search.steps) < MAX_STEPS:
            base_ms, ms = search.latency()
            for name, reached in (("latency-aware, same MACs", macs.count(search.model, size)["macs"] <= uniform_macs),
                                  ("latency-aware, same latency", ms / base_ms <= uniform_ratio)):  # fmt: skip
                if reached and name not in snaps:
                    snaps[name] = copy.deepcopy(search.model).to(memory_format=torch.contiguous_format)
                    prune.adapt_bn(snaps[name], (calib[i : i + 64] for i in range(0, len(calib), 64)))
                    snaps[name].eval()
                    print(f"{name}: after {len(search.steps)} steps, latency {ms / base_ms:.3f} of unpruned "
                          f"(uniform: {uniform_ratio:.3f})", flush=True)  # fmt: skip
            if len(snaps) < 2 and search.step() is None:
                break
    finally:
        search.close()
    return snaps


def cifar_data(cifar: Path, recipe, train_images: int | None, test_images: int | None):
    """Test images and labels (arrays), the augmented training subset, and 512 other training images (unlabeled,
    for the KL proxy and BatchNorm re-estimation)."""
    pre = recipe.preprocess
    test = subset(image_folder(cifar / "test", eval_transform(pre), 10, "test"), test_images, 0)
    x = torch.stack([test[i][0] for i in range(len(test))]).numpy()
    y = np.array([test[i][1] for i in range(len(test))])
    train = subset(image_folder(cifar / "train", train_transform(pre, recipe.distill.augment), 10, "training"),
                   train_images, 0)  # fmt: skip
    plain = subset(image_folder(cifar / "train", eval_transform(pre), 10, "training"), 512, 1)
    return x, y, train, torch.stack([plain[i][0] for i in range(len(plain))]).numpy()


def _onnx(model, size) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        export(model, Path(tmp) / "m.onnx", ExportConfig(simplify=False), size)
        return (Path(tmp) / "m.onnx").read_bytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cifar", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "mobilenet_v3_small_cifar10.pth")
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-images", type=int, help="fine-tune on this many training images (default: all)")
    ap.add_argument("--test-images", type=int, help="evaluate on this many test images (default: all 10,000)")
    ap.add_argument("--latency-vs", type=float, default=0.3, help="compare latency-aware pruning with uniform "
                    "pruning by this MACs ratio (0 = skip)")  # fmt: skip
    # On a 2-core machine shared with other jobs, 2 OpenMP threads ran a training step 3-4x slower than 1 (spinning)
    ap.add_argument("--torch-threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)

    recipe = recipes.load(str(ROOT / "recipes" / "cifar10" / "mobilenet_v3_small.yaml"))
    recipe = recipes.override(recipe, {"model.weights": str(args.checkpoint), "distill.epochs": args.epochs})
    size = recipe.preprocess.input_size
    teacher = models.build(recipe.model)
    x, y, train, calib = cifar_data(args.cifar, recipe, args.train_images, args.test_images)
    # CE fine-tuning gets exactly KD's loop settings: only the loss differs.
    loop = recipe.train.model_copy(update={"epochs": args.epochs, "lr": recipe.distill.lr,
                                           "batch_size": recipe.distill.batch_size})  # fmt: skip
    ce = torch.nn.CrossEntropyLoss(label_smoothing=loop.label_smoothing)

    rows, compared = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(("unpruned", "-", _measure(teacher, x, y, size, Path(tmp))))
        ratios = [float(r) for r in args.ratios.split(",")]
        if args.latency_vs and args.latency_vs not in ratios:
            ratios.append(args.latency_vs)
        for ratio in ratios:
            cfg = recipe.prune.model_copy(update={"enabled": True, "ratio": ratio, "scope": "uniform"})
            pruned, _ = prune.prune(teacher, cfg, size, calib)
            if ratio == args.latency_vs:
                compared[f"uniform {ratio:.0%} MACs"] = copy.deepcopy(pruned)
                latency_cfg = cfg.model_copy(update={"mode": "latency"})
                compared.update(_latency_aware(teacher, pruned, latency_cfg, size, calib))
            rows.append((f"pruned {ratio:.0%} MACs", "none", _measure(pruned, x, y, size, Path(tmp))))
            student = copy.deepcopy(pruned)  # CE and KD start from the same pruned weights
            fit(student, train, loop, lambda logits, _x, labels: ce(logits, labels))
            batches = torch.utils.data.DataLoader(subset(train, 2048, loop.seed), batch_size=loop.batch_size)
            prune.adapt_bn(student, (b for b, _ in batches))  # as distill() does after its loop
            rows.append((f"pruned {ratio:.0%} MACs", f"CE {args.epochs} ep", _measure(student, x, y, size, Path(tmp))))
            distill.distill(pruned, teacher, train, recipe.distill, recipe.train)
            rows.append((f"pruned {ratio:.0%} MACs", f"KD {args.epochs} ep", _measure(pruned, x, y, size, Path(tmp))))
        for name, model in list(compared.items())[1:]:
            rows.append((name, "none", _measure(model, x, y, size, Path(tmp))))
            student = copy.deepcopy(model)
            distill.distill(student, teacher, train, recipe.distill, recipe.train)
            rows.append((name, f"KD {args.epochs} ep", _measure(student, x, y, size, Path(tmp))))

    print(f"\nmobilenet_v3_small, CIFAR-10 test ({len(y)} images), {size}x{size}, ORT CPU fp32, "
          f"fine-tuning on {len(train)} images\n")  # fmt: skip
    print("| model | fine-tune | top-1 % | params M | MACs M | p50 ms | img/s (b32) |")
    print("|---|---|---|---|---|---|---|")
    for name, ft, m in rows:
        print(f"| {name} | {ft} | {m['top1']:.2f} | {m['params'] / 1e6:.3f} | {m['macs'] / 1e6:.1f} | "
              f"{m['p50_ms']:.3f} | {m['throughput']:.0f} |")  # fmt: skip
    if compared:
        _print_latency(teacher, compared, size)


def _print_latency(teacher, compared: dict, size: int, sessions: int = 3) -> None:
    """All models timed in alternating rounds, each loaded `sessions` times (placement in memory moves a
    session's time by up to ~1.5%): the mean over sessions of each session's fastest batch-1 run."""
    models_ = {"unpruned": teacher, **compared}
    rts = [OrtCpu(_onnx(m, size), threads=1) for m in models_.values() for _ in range(sessions)]
    best = interleaved_best_ms(rts, (3, size, size), 1, rounds=30, runs=10)
    ms = {name: float(np.mean(best[i * sessions : (i + 1) * sessions])) for i, name in enumerate(models_)}
    uniform = ms[next(iter(compared))]
    print(f"\nlatency, ORT CPU fp32, batch 1, 1 thread, all models interleaved ({sessions} sessions each)\n")
    print("| model | MACs M | params M | ms | vs unpruned | vs uniform |")
    print("|---|---|---|---|---|---|")
    for name, model in models_.items():
        c = macs.count(model, size)
        print(f"| {name} | {c['macs'] / 1e6:.2f} | {c['params'] / 1e6:.3f} | {ms[name]:.4f} | "
              f"{ms[name] / ms['unpruned']:.3f} | {ms[name] / uniform:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
