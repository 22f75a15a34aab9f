"""Deep pyramidal residual networks, bottleneck version (Han, Kim & Kim 2017, arXiv 1610.02915): the
"PyramidNet" rows of the SAM paper's Table 1 (PyramidNet-272, alpha = 200), without ShakeDrop.

    D = 9n + 2 layers: n bottleneck blocks per group, 3 groups, N = 3n blocks (11, 20, ..., 110, ..., 272)
    the width grows by alpha / N at every block: block k (1..N) has d_k = round(16 + alpha k / N) channels
    inside and 4 d_k at its output (rounded, as the SAM authors' code and most re-implementations do; the
    paper truncates, which gives ~0.2 M fewer parameters at 272/200)
    conv3x3(C -> 16) BN
    block(x) = BN(conv1x1(ReLU(BN(conv3x3(ReLU(BN(conv1x1(BN(x), d))), d, stride))), 4d)) + shortcut(x)
               (no ReLU after the addition nor before the first conv of a block)
    shortcut:  2x2 average pooling where the block has stride 2 (first block of groups 2 and 3),
               then zero channels appended up to 4 d (parameter-free)
    BN -> ReLU -> global average pool -> Linear(4 d_N -> num_classes)
PyramidNet-272 (alpha 200) for 3-channel 32x32 images and 10 classes has about 26 M parameters. Global average
pooling makes it run on any image size; ``pyramidnet-11-24`` (one block per group) is a seconds-fast variant.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from samkit.models.init import init_weights

STEM_WIDTH = 16
EXPANSION = 4


def pyramid_widths(depth: int, alpha: int) -> list[int]:
    """d_k for k = 1..N: the bottleneck width of every block, in order."""
    if depth < 11 or (depth - 2) % 9 != 0:
        raise ValueError(f"PyramidNet (bottleneck) depth must be 9n + 2 with n >= 1 (11, 20, ..., 110, 164, 272), "
                         f"got {depth}")
    if isinstance(alpha, bool) or not isinstance(alpha, int) or alpha < 0:
        raise ValueError(f"PyramidNet alpha (the total width increase) must be an int >= 0, got {alpha!r}")
    blocks = 3 * ((depth - 2) // 9)
    return [int(round(STEM_WIDTH + alpha * k / blocks)) for k in range(1, blocks + 1)]


class PyramidBottleneck(nn.Module):
    def __init__(self, width_in: int, width: int, stride: int) -> None:
        super().__init__()
        width_out = EXPANSION * width
        self.branch = nn.Sequential(
            nn.BatchNorm2d(width_in),
            nn.Conv2d(width_in, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width_out, 1, bias=False),
            nn.BatchNorm2d(width_out),
        )
        self.stride = stride
        self.extra_channels = width_out - width_in
        if self.extra_channels < 0:
            raise ValueError(f"a PyramidNet block cannot narrow ({width_in} -> {width_out} channels)")

    def shortcut(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = F.avg_pool2d(x, self.stride, self.stride, ceil_mode=True)
        if self.extra_channels:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.branch(x) + self.shortcut(x)


class PyramidNet(nn.Module):
    """PyramidNet(depth, alpha, in_channels, num_classes): the bottleneck PyramidNet of the module doc."""

    def __init__(self, depth: int, alpha: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        widths = pyramid_widths(depth, alpha)
        per_group = len(widths) // 3
        self.stem = nn.Sequential(nn.Conv2d(in_channels, STEM_WIDTH, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(STEM_WIDTH))
        layers, width_in = [], STEM_WIDTH
        for k, width in enumerate(widths):
            stride = 2 if k in (per_group, 2 * per_group) else 1
            layers.append(PyramidBottleneck(width_in, width, stride))
            width_in = EXPANSION * width
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.BatchNorm2d(width_in), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())
        self.classifier = nn.Linear(width_in, num_classes)
        self.depth, self.alpha = depth, alpha
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.head(self.blocks(self.stem(x))))
