"""ShuffleNet v1 (Zhang et al., CVPR 2018, arXiv:1707.01083): pointwise group convolutions and channel shuffle.

torchvision has only ShuffleNetV2 and timm none, so this is the paper's network from its Table 1: a 3x3
stride-2 conv with 24 channels and a max pool, then three stages of 4, 8 and 4 units and global pooling.
A unit is a 1x1 group conv to a bottleneck of a quarter of the output channels (BN, ReLU), the channel
shuffle (torchvision's), a 3x3 depthwise conv (BN) and a 1x1 group conv (BN), added to the input; the first
unit of a stage has stride 2 and concatenates a 3x3 average pool of its input instead. The first 1x1 conv of
stage 2 is not grouped (its input has only 24 channels). "ShuffleNet s×" scales every width by s; the
widths are rounded as in Megvii's code (ShuffleNet-Series): the stem up to a multiple of g, the stage
outputs to the nearest multiple of 4g, so bottlenecks split evenly into g groups.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import shufflenetv2

STEM = 24
STAGE2 = {1: 144, 2: 200, 3: 240, 4: 272, 8: 384}  # output channels of stage 2 at 1x, per group count g
REPEATS = (4, 8, 4)


def _conv_bn(c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]


class ShuffleUnit(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int, stride: int, group_first: bool = True):
        super().__init__()
        mid = c_out // 4
        self.groups, self.stride = groups, stride
        self.gconv1 = nn.Sequential(*_conv_bn(c_in, mid, groups=groups if group_first else 1), nn.ReLU(inplace=True))
        self.dwconv = nn.Sequential(*_conv_bn(mid, mid, 3, stride, groups=mid))
        self.gconv2 = nn.Sequential(*_conv_bn(mid, c_out - c_in if stride == 2 else c_out, groups=groups))
        self.pool = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()

    def forward(self, x):
        y = self.gconv2(self.dwconv(shufflenetv2.channel_shuffle(self.gconv1(x), self.groups)))
        return F.relu(torch.cat([self.pool(x), y], 1) if self.stride == 2 else x + y)


def stage_widths(groups: int, width: float) -> tuple[int, list[int]]:
    """The stem's and the three stages' output channels of ShuffleNet `width`× with `groups` groups."""
    if groups not in STAGE2:
        raise ValueError(f"ShuffleNet v1 has g in {sorted(STAGE2)}, got {groups}")
    if width <= 0:
        raise ValueError(f"width multiplier must be > 0, got {width}")
    stem = groups * math.ceil(STEM * width / groups)
    unit = 4 * groups
    return stem, [unit * max(1, round(STAGE2[groups] * 2**s * width / unit)) for s in range(3)]


class ShuffleNetV1(nn.Module):
    def __init__(self, groups: int = 3, width: float = 1.0, num_classes: int = 1000):
        super().__init__()
        stem, stages = stage_widths(groups, width)
        self.stem = nn.Sequential(*_conv_bn(3, stem, 3, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        units, c = [], stem
        for s, (repeats, out) in enumerate(zip(REPEATS, stages)):
            for i in range(repeats):
                units.append(ShuffleUnit(c, out, groups, 2 if i == 0 else 1, group_first=s > 0 or i > 0))
                c = out
        self.features = nn.Sequential(*units)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(self.stem(x))), 1))


def _cells(groups: int, n: int) -> list[list[list[int]]]:
    """cells[j][k]: the bottleneck channels i of shuffle group j (i < n) that the shuffle sends to position i·g + j,
    in chunk k (the input of group k of the second 1x1 group conv)."""
    cells = [[[] for _ in range(groups)] for _ in range(groups)]
    for j in range(groups):
        for i in range(n):
            cells[j][(i * groups + j) // n].append(i)
    return cells


@torch.no_grad()
def narrow_into(unit: ShuffleUnit, narrow: ShuffleUnit, kind: str) -> None:
    """Fill `narrow` (`unit` with fewer bottleneck channels, as pruning shaped it) with `unit`'s weights so that it
    computes `unit` without the dropped channels. The shuffle sends channel i of group j to the chunk of position
    i·g + j, so a channel is kept only where the narrower unit's shuffle sends its r-th channel of group j to the
    same chunk: each (group, chunk) cell keeps as many channels as it has there, the most important ones (`kind`:
    l1, l2 or bn_scale). Raises ValueError where a cell would need more channels than it has."""
    g, conv1, bn1, dw, bn2, conv2 = unit.groups, unit.gconv1[0], unit.gconv1[1], unit.dwconv[0], unit.dwconv[1], unit.gconv2[0]
    n, n_new = conv1.out_channels // g, narrow.gconv1[0].out_channels // g
    pos = torch.arange(g * n).view(g, n).t().reshape(-1)  # pos[p]: the channel the shuffle puts at position p
    at = torch.empty_like(pos)
    at[pos] = torch.arange(g * n)  # at[c]: the position of channel c
    col = conv2.weight.view(g, -1, n).transpose(1, 2).reshape(g * n, -1)  # input position -> its weights
    if kind == "bn_scale":
        score = bn1.weight.abs() + bn2.weight.abs()[at]
    else:
        p = 1 if kind == "l1" else 2
        score = sum(w.abs().pow(p).flatten(1).sum(1) for w in (conv1.weight, dw.weight[at], col[at]))
    keep = []  # kept channels c = j·n + i, group by group
    for j, (old, new) in enumerate(zip(_cells(g, n), _cells(g, n_new))):
        for k in range(g):
            if len(new[k]) > len(old[k]):
                raise ValueError(f"{n} -> {n_new} channels per group cannot keep the shuffle's chunks")
            cell = torch.tensor(old[k], dtype=torch.long) + j * n
            keep += sorted(cell[score[cell].argsort(descending=True)[: len(new[k])]].tolist())
    keep = torch.tensor(keep)
    shuffled = at[keep].view(g, n_new).t().reshape(-1)  # old positions, in the narrow unit's shuffled order
    narrow.gconv1[0].weight.copy_(conv1.weight[keep])
    narrow.dwconv[0].weight.copy_(dw.weight[shuffled])
    for new_bn, bn, idx in ((narrow.gconv1[1], bn1, keep), (narrow.dwconv[1], bn2, shuffled)):
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new_bn, name).copy_(getattr(bn, name)[idx])
    per_chunk = shuffled.view(g, n_new) - torch.arange(g).unsqueeze(1) * n  # columns kept in each group's chunk
    w = conv2.weight.view(g, -1, n, *conv2.kernel_size)
    narrow.gconv2[0].weight.copy_(torch.cat([w[k][:, per_chunk[k]] for k in range(g)]))
