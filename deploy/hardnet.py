"""HarDNet (Chao et al., ICCV 2019, arXiv:1909.00948): harmonic dense blocks, HarDNet-68 and HarDNet-39DS.

torchvision and timm have no HarDNet, so this is the paper's network (its Table 1 and section 3): in a
harmonic dense block layer l takes the outputs of layers l - 2^n for every 2^n dividing l (layer 0 is
the block input), has k·m^n channels for the largest such n (rounded to even), and the block outputs the
concatenation of its odd layers and its last one. Each block is followed by a 1x1 transition conv; the
DS variant replaces the 3x3 convs by 1x1 + depthwise 3x3 and the max pools by stride-2 depthwise convs.
Module names follow the authors' code (PingoLH/Pytorch-HarDNet), so their ImageNet weights load as they are.
"""

from __future__ import annotations

import torch
from torch import nn

# Per variant: stem widths, transition widths, growth rates k, multiplier m, layers per block, downsampling after
# the block, depthwise-separable, classifier dropout; and the authors' ImageNet weights (torch hub file names).
ARCHS = {
    "hardnet68": dict(stem=(32, 64), transitions=(128, 256, 320, 640, 1024), growth=(14, 16, 20, 40, 160), m=1.7,
                      layers=(8, 16, 16, 16, 4), down=(1, 0, 1, 1, 0), ds=False, dropout=0.1),
    "hardnet39ds": dict(stem=(24, 48), transitions=(96, 320, 640, 1024), growth=(16, 20, 64, 160), m=1.6,
                        layers=(4, 16, 8, 4), down=(1, 1, 1, 0), ds=True, dropout=0.05),
}  # fmt: skip
WEIGHTS = {
    "hardnet68": "https://ping-chao.com/hardnet/hardnet68-5d684880.pth",
    "hardnet39ds": "https://ping-chao.com/hardnet/hardnet39ds-0e6c6fa9.pth",
}


class ConvLayer(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False)
        self.norm = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU6(inplace=True)


class DWConvLayer(nn.Sequential):
    """A depthwise 3x3 conv and BN, no activation."""

    def __init__(self, c: int, stride: int = 1):
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False)
        self.norm = nn.BatchNorm2d(c)


class CombConvLayer(nn.Sequential):
    """The DS variant's layer: a 1x1 conv (BN, ReLU6), then a depthwise 3x3 (BN)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.layer1 = ConvLayer(c_in, c_out, kernel=1)
        self.layer2 = DWConvLayer(c_out)


def links(layer: int) -> list[int]:
    """The earlier layers that layer `layer` (1-based; 0 = the block input) reads: layer - 2^n for 2^n | layer."""
    return [layer - 2**n for n in range(layer.bit_length()) if layer % 2**n == 0]


def widths(c_in: int, k: int, m: float, n_layers: int) -> list[int]:
    """Output channels of the block input (layer 0) and its layers: k·m^n, n = len(links) - 1, rounded to even."""
    return [c_in] + [int(int(k * m ** (len(links(layer)) - 1) + 1) / 2) * 2 for layer in range(1, n_layers + 1)]


class HarDBlock(nn.Module):
    def __init__(self, c_in: int, k: int, m: float, n_layers: int, ds: bool = False):
        super().__init__()
        w = widths(c_in, k, m, n_layers)
        self.links = [links(layer) for layer in range(1, n_layers + 1)]
        layer = CombConvLayer if ds else ConvLayer
        self.layers = nn.ModuleList(layer(sum(w[i] for i in link), w[n]) for n, link in enumerate(self.links, 1))
        self.outputs = [n for n in range(1, n_layers + 1) if n % 2 == 1 or n == n_layers]
        self.out_channels = sum(w[n] for n in self.outputs)

    def forward(self, x):
        outs = [x]
        for link, layer in zip(self.links, self.layers):
            inputs = [outs[i] for i in link]
            outs.append(layer(torch.cat(inputs, 1) if len(inputs) > 1 else inputs[0]))
        return torch.cat([outs[n] for n in self.outputs], 1)


class HarDNet(nn.Module):
    """`arch`: a key of ARCHS. One `base` list of layers, as in the authors' code."""

    def __init__(self, arch: str = "hardnet68", num_classes: int = 1000):
        super().__init__()
        a = ARCHS[arch]
        stem0, stem1 = a["stem"]
        base: list[nn.Module] = [ConvLayer(3, stem0, 3, 2), ConvLayer(stem0, stem1, 1 if a["ds"] else 3)]
        base.append(DWConvLayer(stem1, 2) if a["ds"] else nn.MaxPool2d(3, 2, 1))
        c = stem1
        for k, n, out, down in zip(a["growth"], a["layers"], a["transitions"], a["down"]):
            block = HarDBlock(c, k, a["m"], n, a["ds"])
            base += [block, ConvLayer(block.out_channels, out, kernel=1)]
            c = out
            if down:
                base.append(DWConvLayer(c, 2) if a["ds"] else nn.MaxPool2d(2, 2))
        base.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(a["dropout"]), nn.Linear(c, num_classes)))
        self.base = nn.ModuleList(base)

    def forward(self, x):
        for layer in self.base:
            x = layer(x)
        return x
