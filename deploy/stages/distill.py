"""Knowledge distillation: fine-tune a (pruned) student toward a teacher's softened logits."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from .. import distributed, models
from .. import recipe as recipes
from ..core.context import Build
from ..errors import DeployError
from ..recipe import DistillConfig, TrainConfig
from . import summary


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha: float, temperature: float,
            label_smoothing: float = 0.0) -> torch.Tensor:  # fmt: skip
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels).

    KL is taken from the teacher's distribution to the student's (Hinton et al. 2015); T^2 keeps the soft
    term's gradients on the scale of the hard term's. Unlabeled samples (label -1) get the KD term only."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True, reduction="batchmean")
    loss = alpha * t * t * kl
    labeled = labels >= 0
    if alpha < 1 and labeled.any():
        loss = loss + (1 - alpha) * F.cross_entropy(student[labeled], labels[labeled], label_smoothing=label_smoothing)
    return loss


def kd_objective(teacher: nn.Module, loop: TrainConfig, alpha: float, temperature: float):
    """train.fit's loss (logits, x, y) -> kd_loss against `teacher`, frozen on the training device."""
    from ..train import device_for

    teacher = teacher.to(device_for(loop), memory_format=torch.channels_last).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = teacher(x)
        return kd_loss(logits, t, y, alpha, temperature, loop.label_smoothing)

    return loss


def teacher_model(cfg: DistillConfig, before_pruning: nn.Module, num_classes: int) -> nn.Module:
    """The teacher: a registered model (recipe name or YAML) with cfg.teacher_weights, else the unpruned model."""
    if cfg.teacher is None:
        return before_pruning
    spec = recipes.load(cfg.teacher).model
    if spec.num_classes != num_classes and not cfg.teacher_weights:
        raise DeployError(f"teacher {cfg.teacher} has {spec.num_classes} classes, the student {num_classes}; "
                          "set distill.teacher_weights to a checkpoint with the student's classes")  # fmt: skip
    spec = spec.model_copy(update={"num_classes": num_classes, **({"weights": cfg.teacher_weights} if cfg.teacher_weights else {})})
    return models.build(spec)


def distill(student: nn.Module, teacher: nn.Module, dataset, cfg: DistillConfig, train: TrainConfig,
            val=None) -> list[dict]:  # fmt: skip
    """Train `student` in place for cfg.epochs with the KD loss on `dataset`; images labeled -1 (an unlabeled
    folder) get the KD term only."""
    from ..train import fit, subset
    from .prune.groups import adapt_bn

    loop = train.model_copy(update={"epochs": cfg.epochs, "lr": cfg.lr, "batch_size": cfg.batch_size,
                                    "augment": cfg.augment})  # fmt: skip
    history = fit(student, dataset, loop, kd_objective(teacher, loop, cfg.alpha, cfg.temperature), val=val)
    if distributed.is_main():  # ranks > 0 of a torchrun job discard their copy (core/runner.py)
        # BN statistics from the weights' final state, on up to 2048 training images (see prune.adapt_bn)
        batches = torch.utils.data.DataLoader(subset(dataset, 2048, loop.seed), batch_size=loop.batch_size)
        adapt_bn(student, (x for x, _ in batches))
    return history


class Distill:
    """Under torchrun every process trains (the others on rank 0's student and teacher); only rank 0 records and
    saves the result (core/runner.py)."""

    name = "distill"

    def applies(self, b: Build) -> bool:
        return b.recipe.distill.enabled

    def may_train(self, b: Build) -> bool:
        return b.recipe.distill.enabled

    def run(self, b: Build) -> str:
        from .. import sources
        from .prune.groups import pruned_checkpoint

        r = b.recipe
        if b.options.train is None:
            raise DeployError("the distill stage needs training images: pass --train DIR")
        if not distributed.is_main():
            student, teacher = distributed.from_main(None)
            distill(student, teacher, sources.training(b.options.train, r), r.distill, r.train)
            return ""
        summary.start(b)
        teacher = teacher_model(r.distill, b.original or b.model, r.model.num_classes)
        if teacher is b.model:  # no pruning: a copy, or kd_objective would freeze the student itself
            teacher = copy.deepcopy(teacher)
        distributed.from_main((b.model, teacher))
        images = sources.training(b.options.train, r)
        history = distill(b.model, teacher, images, r.distill, r.train)
        b.report["distill"] = {"images": len(images), "history": history, "world_size": distributed.world_size(),
                               "teacher": r.distill.teacher or "the model before pruning"}  # fmt: skip
        torch.save(pruned_checkpoint(b.model), b.workdir / "model.distilled.pth")
        summary.record(b, "distill")
        return f"{len(history)} epochs on {len(images)} images, final loss {history[-1]['loss']:.4f}"
