"""`deploy train`: the command line of the training loop in deploy/train.py (imported only when it runs).

Under torchrun every process runs this command: the messages and the checkpoint are rank 0's
(docs/distributed.md)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model on an ImageFolder dataset (CPU, or CUDA when present)")
    p.set_defaults(func=run)
    p.add_argument("model", help="a model name from `deploy list`, or a recipe YAML file")
    p.add_argument("--train", type=Path, required=True, help="training images, one subfolder per class")
    p.add_argument("--val", type=Path, help="validation images, evaluated after every epoch")
    p.add_argument("--out", type=Path, required=True, help="checkpoint written after every epoch")
    p.add_argument("--num-classes", type=int, help="classes of the head")
    p.add_argument("--weights", help="start from this checkpoint instead of random weights")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--optimizer", choices=["sgd", "adamw"])
    p.add_argument("--schedule", choices=["cosine", "onecycle"])
    p.add_argument("--subset", type=int, help="train on this many images drawn with --seed")
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, help="DataLoader worker processes")
    p.add_argument("--resume", action="store_true", help="continue from the state saved next to --out")
    p.add_argument("--force", action="store_true", help="replace an existing --out checkpoint")


def run(args: argparse.Namespace) -> int:
    import torch
    from torch import nn

    from .. import distributed, models
    from .. import recipe as recipes
    from ..console import info
    from ..errors import DeployError
    from ..train import device_for, eval_transform, fit, image_folder, subset, train_transform

    if args.out.exists() and not (args.force or args.resume):
        raise DeployError(f"{args.out} exists; pass --force to replace it (or --resume to continue its training)")
    if args.out.is_dir():
        raise DeployError(f"--out {args.out} is a folder; give the checkpoint's file name")
    recipe = recipes.load(args.model)
    overrides = {"model.num_classes": args.num_classes, "model.weights": args.weights, "train.epochs": args.epochs,
                 "train.batch_size": args.batch_size, "train.lr": args.lr, "train.optimizer": args.optimizer,
                 "train.schedule": args.schedule, "train.subset": args.subset, "train.seed": args.seed,
                 "train.workers": args.workers}  # fmt: skip
    recipe = recipes.override(recipe, {k: v for k, v in overrides.items() if v is not None})
    cfg = recipe.train
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed too
    model = models.build(recipe.model) if recipe.model.weights else models.architecture(recipe.model)
    train_set = image_folder(args.train, train_transform(recipe.preprocess, cfg.augment), recipe.model.num_classes, "training")
    train_set = subset(train_set, cfg.subset, cfg.seed)
    val = image_folder(args.val, eval_transform(recipe.preprocess), recipe.model.num_classes, "validation") if args.val else None
    ce = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    main, ws = distributed.is_main(), distributed.world_size()
    if main:
        info(f"training {recipe.model.name} on {len(train_set)} images for {cfg.epochs} epochs ({device_for(cfg)}"
             + (f", {ws} processes" if ws > 1 else "") + ")")  # fmt: skip
    try:
        history = fit(model, train_set, cfg, lambda logits, x, y: ce(logits, y), val=val, out=args.out,
                      resume=args.resume, meta={"recipe": recipe.model_dump(mode="json")})  # fmt: skip
    except KeyboardInterrupt:
        if main:
            info(f"interrupted: {args.out} holds the last completed epoch; continue with --resume")
        raise
    last = history[-1] if history else {}
    if main:
        print(f"{args.out}: {last.get('epoch', 0)} epochs"
              + (f", val top-1 {last['val_top1']:.2f}%" if "val_top1" in last else ""))  # fmt: skip
    return 0
