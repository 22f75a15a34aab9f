"""Wide residual networks WRN-D-W (Zagoruyko & Komodakis 2016, arXiv 1605.07146): the SAM paper's
family (WRN-28-10 on CIFAR and Fashion-MNIST).

    n = (D - 4) / 6 pre-activation basic blocks per group (D = 6n + 4: 10, 16, 22, 28, 40, ...)
    conv3x3(C -> 16)
    group 1: n blocks 16  -> 16 W, stride 1
    group 2: n blocks 16 W -> 32 W, stride 2
    group 3: n blocks 32 W -> 64 W, stride 2
    BN -> ReLU -> global average pool -> Linear(64 W -> num_classes)
    block(x):  a = ReLU(BN(x)); y = conv3x3(a, stride); y = conv3x3(dropout(ReLU(BN(y))))
               return y + (x if shape kept else conv1x1(a, stride))   # shortcut from the activation,
                                                                      # as in the authors' code
WRN-28-10 with 3 input channels and 10 classes has 36.5 M parameters. ``batch_norm=False`` replaces
every BN by the identity: the BN-free WRN of the SAM paper's Hessian-spectrum figure.
Global average pooling makes it work on 8x8 and 28x28 inputs alike.
"""

from __future__ import annotations

from torch import Tensor, nn

from samkit.models.init import init_weights


def _norm(width: int, batch_norm: bool) -> nn.Module:
    return nn.BatchNorm2d(width) if batch_norm else nn.Identity()


class WideBasicBlock(nn.Module):
    def __init__(self, width_in: int, width_out: int, stride: int, *, dropout: float, batch_norm: bool) -> None:
        super().__init__()
        self.bn1 = _norm(width_in, batch_norm)
        self.conv1 = nn.Conv2d(width_in, width_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _norm(width_out, batch_norm)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(width_out, width_out, 3, stride=1, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(width_in, width_out, 1, stride=stride, bias=False)
            if width_in != width_out or stride != 1
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        activated = nn.functional.relu(self.bn1(x))
        y = self.conv1(activated)
        y = self.conv2(self.dropout(nn.functional.relu(self.bn2(y))))
        return y + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nn.Module):
    """WideResNet(depth, widen_factor, in_channels, num_classes, dropout=0.0, batch_norm=True)."""

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        in_channels: int,
        num_classes: int,
        *,
        dropout: float = 0.0,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"WRN widen_factor must be >= 1, got {widen_factor}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        blocks_per_group = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        layers = []
        for group, stride in enumerate((1, 2, 2)):
            for b in range(blocks_per_group):
                width_in = widths[group] if b == 0 else widths[group + 1]
                layers.append(WideBasicBlock(width_in, widths[group + 1], stride if b == 0 else 1,
                                             dropout=dropout, batch_norm=batch_norm))
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Sequential(
            _norm(widths[3], batch_norm), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.classifier = nn.Linear(widths[3], num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.head(self.blocks(self.stem(x))))
