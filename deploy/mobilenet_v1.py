"""MobileNetV1 (Howard et al., 2017, arXiv:1704.04861) with the width multiplier α.

torchvision has no MobileNetV1, and timm's `mobilenetv1_*` are later re-designs (other stem and head
widths), so this is the paper's network written from its Table 1: a 3x3 stride-2 convolution, the 13
depthwise-separable blocks, global average pooling and a fully connected classifier. The resolution
multiplier ρ is the input size (224 for ρ = 1); the network is fully convolutional up to the pooling.
"""

from __future__ import annotations

from torch import nn

STEM = 32
# (stride of the depthwise 3x3, output channels of the pointwise 1x1) for each separable block.
# Table 1 prints "Conv dw / s2" for the 13th block, but its input and output are both 7x7: stride 1.
BLOCKS = [(1, 64), (2, 128), (1, 128), (2, 256), (1, 256), (2, 512),
          (1, 512), (1, 512), (1, 512), (1, 512), (1, 512), (2, 1024), (1, 1024)]  # fmt: skip
KERNEL = 3


def channels(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class DepthwiseSeparable(nn.Sequential):
    """A 3x3 depthwise convolution (one filter per channel) then a 1x1 pointwise one, each with BN and ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__(_conv_bn_relu(c_in, c_in, KERNEL, stride, groups=c_in), _conv_bn_relu(c_in, c_out, 1, 1))


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int = 1000, width: float = 1.0, dropout: float = 0.0):
        super().__init__()
        if width <= 0:
            raise ValueError(f"width multiplier must be > 0, got {width}")
        c = channels(STEM, width)
        layers: list[nn.Module] = [_conv_bn_relu(3, c, KERNEL, 2)]
        for stride, out in BLOCKS:
            layers.append(DepthwiseSeparable(c, channels(out, width), stride))
            c = channels(out, width)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c, num_classes))

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


def paper_macs(width: float, resolution: int, num_classes: int = 1000) -> float:
    """Multiply-adds by the paper's closed form (section 3.3), scaled by α and ρ = resolution / 224.

    A depthwise-separable layer costs D_K²·αM·(ρD_F)² + αM·αN·(ρD_F)², D_F being the feature map it
    writes; the stem is a standard convolution (D_K²·3·αN·(ρD_F)²) and the classifier αM·classes.
    """
    rho = resolution / 224
    d_f = 112  # stem output at 224x224
    macs = KERNEL**2 * 3 * (width * STEM) * (rho * d_f) ** 2
    m = STEM
    for stride, n in BLOCKS:
        d_f //= stride
        macs += KERNEL**2 * (width * m) * (rho * d_f) ** 2 + (width * m) * (width * n) * (rho * d_f) ** 2
        m = n
    return macs + width * m * num_classes
