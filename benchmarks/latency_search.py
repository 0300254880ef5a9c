"""The latency-aware pruning search at a given input size (issue 18: mobilenet_v2 at 224 px to 0.7 in under 20 min,
final latency within 5% of the table's prediction), one search per run.

    python benchmarks/latency_search.py --cifar DIR [--recipe mobilenet_v2] [--size 224] [--budget 0.7]
        [--table FILE | --whole] [--images 64]

DIR holds train/ (extract ../shared/data/cifar10-jpeg.tar.gz); the committed CIFAR-10 checkpoint of --recipe
runs at --size, with --images training images for the KL proxy and BatchNorm re-estimation. --table is the
look-up table file (default: a fresh one in a temporary folder: a cold table); --whole times every candidate
whole instead. Prints wall time, steps, the measured latency ratio, the table's predictions of the final
latency (from the step before, as the search uses it, and scaled from the unpruned model alone) and MACs removed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from deploy import models
from deploy import recipe as recipes
from deploy.recipe import PruneConfig
from deploy.stages.prune.latency import prune_latency
from deploy.train import eval_transform, image_folder, subset

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cifar", type=Path, required=True)
    ap.add_argument("--recipe", default="mobilenet_v2")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--budget", type=float, default=0.7)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--table", type=Path, help="look-up table file (default: a fresh one)")
    ap.add_argument("--whole", action="store_true", help="time every candidate whole (no look-up table)")
    args = ap.parse_args()

    recipe = recipes.load(str(ROOT / "recipes" / "cifar10" / f"{args.recipe}.yaml"))
    recipe = recipes.override(recipe, {"model.weights": str(ROOT / "checkpoints" / f"{args.recipe}_cifar10.pth"),
                                       "preprocess.resize": args.size, "preprocess.input_size": args.size})
    model = models.build(recipe.model).eval()
    images = subset(image_folder(args.cifar / "train", eval_transform(recipe.preprocess), 10, "training"),
                    args.images, 1)  # fmt: skip
    data = torch.stack([images[i][0] for i in range(len(images))]).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        table = None if args.whole else str(args.table or Path(tmp) / "table.json")
        cfg = PruneConfig(enabled=True, mode="latency", latency_budget=args.budget, latency_table=table)
        start = time.perf_counter()
        _, rec = prune_latency(model, cfg, args.size, data)
        wall = time.perf_counter() - start
    print(f"{args.recipe} at {args.size} px, budget {args.budget}: {wall / 60:.1f} min, {len(rec['steps'])} steps, "
          f"measured {rec['latency_ratio']:.3f} ({rec['latency_before_ms']:.3f} -> {rec['latency_after_ms']:.3f} ms), "
          f"MACs removed {rec['macs_reduction']:.1%}")
    if "table" in rec:
        t = rec["table"]
        print(f"table: {t['layers']} layers ({t['timed_this_run']} timed this run); final latency predicted "
              f"{t['predicted_after_ms']:.3f} ms ({t['prediction_error']:+.1%}) from the step before, "
              f"{t['predicted_from_unpruned_ms']:.3f} ms ({t['prediction_error_from_unpruned']:+.1%}) scaled from "
              "the unpruned model")
        for i, s in enumerate(rec["steps"], 1):
            print(f"  step {i}: {s['group']} {s['channels'][0]} -> {s['channels'][1]}, predicted "
                  f"{s.get('predicted_ratio', float('nan')):.3f}, measured {s.get('latency_ratio', float('nan')):.3f}")


if __name__ == "__main__":
    main()
