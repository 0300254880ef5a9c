"""Distillation: the loss is what it claims, and a short run moves the student toward the teacher."""

import pytest
import torch
from torch.nn import functional as F

from deploy import models, recipe
from deploy.recipe import DistillConfig, PruneConfig, TrainConfig
from deploy.stages.distill import distill, kd_loss
from deploy.stages.prune import prune

SIZE = 64


def test_kd_loss_terms():
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    y = torch.tensor([0, 1, 2, 3, 4, -1])
    assert kd_loss(t, t, torch.full((6,), -1), 0.5, 4.0).abs() < 1e-6  # same logits, no labels: zero
    kl = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean")
    ce = F.cross_entropy(s[:5], y[:5])
    assert kd_loss(s, t, y, 0.7, 2.0) == pytest.approx((0.7 * 4 * kl + 0.3 * ce).item(), rel=1e-5)


class _Images(torch.utils.data.Dataset):
    """Unlabeled (label -1) random-texture images: distillation needs no labels."""

    def __init__(self, n):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 3, SIZE, SIZE, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], -1


def _kl(student, teacher, x):
    with torch.no_grad():
        return F.kl_div(F.log_softmax(student(x), 1), F.log_softmax(teacher(x), 1), log_target=True,
                        reduction="batchmean").item()  # fmt: skip


def test_short_distillation_moves_the_pruned_student_toward_the_teacher():
    torch.manual_seed(0)
    spec = recipe.load("mobilenet_v3_small").model.model_copy(update={"num_classes": 10})
    teacher = models.architecture(spec).eval()
    # Random init in eval mode gives vanishing activations: estimate BN statistics on random images first.
    for m in teacher.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    teacher.train()
    with torch.no_grad():
        teacher(torch.randn(32, 3, SIZE, SIZE))
    teacher.eval()
    with torch.no_grad():  # a confident teacher: torchvision's head init (std 0.01) gives near-uniform logits
        teacher.classifier[3].weight.normal_(0, 0.2)
    student, _ = prune(teacher, PruneConfig(enabled=True, ratio=0.5, by="channels"), SIZE)
    data = _Images(64)
    probe = data.x  # the KL on the distillation images, with the students in eval mode
    before = _kl(student, teacher, probe)
    history = distill(student, teacher, data, DistillConfig(enabled=True, epochs=3, lr=0.02, batch_size=16),
                      TrainConfig(workers=0, schedule="cosine"))  # fmt: skip
    after = _kl(student, teacher, probe)
    assert len(history) == 3 and history[-1]["loss"] < history[0]["loss"]
    assert after < 0.8 * before, (before, after)
