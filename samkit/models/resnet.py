"""The CIFAR ResNets of He et al. 2016 (arXiv 1512.03385, Sec. 4.2): ResNet-20/32/44/56/110, the
architecture of the SAM paper's label-noise experiments (ResNet-32).

    n = (D - 2) / 6 basic blocks per stage (D = 6n + 2: 20, 32, 44, 56, 110)
    conv3x3(C -> 16) BN ReLU
    stage 1: n blocks, 16 channels, stride 1
    stage 2: n blocks, 32 channels, first stride 2
    stage 3: n blocks, 64 channels, first stride 2
    global average pool -> Linear(64 -> num_classes)
    block(x) = ReLU(BN(conv3x3(ReLU(BN(conv3x3(x, stride))))) + shortcut(x))
    shortcut: identity; where the shape changes, option A of the paper (parameter-free): take every
              second pixel and zero-pad the new channels
ResNet-20 has 0.27 M parameters, ResNet-32 0.46 M (the paper's Table 6).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from samkit.models.init import init_weights


class BasicBlock(nn.Module):
    def __init__(self, width_in: int, width_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width_in, width_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width_out)
        self.conv2 = nn.Conv2d(width_out, width_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width_out)
        self.stride = stride
        self.extra_channels = width_out - width_in

    def shortcut(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels:
            half = self.extra_channels // 2
            x = F.pad(x, (0, 0, 0, 0, half, self.extra_channels - half))
        return x

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class CifarResNet(nn.Module):
    """CifarResNet(depth, in_channels, num_classes)."""

    def __init__(self, depth: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"ResNet depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110), got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)
        )
        layers, width_in = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for b in range(blocks_per_stage):
                layers.append(BasicBlock(width_in, width, stride if b == 0 else 1))
                width_in = width
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(64, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.blocks(self.stem(x))))
