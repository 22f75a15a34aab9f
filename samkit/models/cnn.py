"""A small CNN, with or without BatchNorm (``cnn`` / ``cnn-bn``).

Both exist because BatchNorm changes what SAM does (the perturbed second pass sees, and by default
updates, batch statistics): ``cnn`` is the BN-free control, ``cnn-bn`` the same network with BN.

    conv3x3(C -> 32) [BN] ReLU
    conv3x3(32 -> 64) [BN] ReLU, maxpool 2
    conv3x3(64 -> 128) [BN] ReLU
    global average pool -> Linear(128 -> num_classes)
Global average pooling makes it work on any image size >= 2 (8x8 digits, 28x28 Fashion-MNIST).
"""

from __future__ import annotations

from torch import Tensor, nn

from samkit.models.init import init_weights

CNN_WIDTHS = (32, 64, 128)


def _conv_block(width_in: int, width_out: int, batch_norm: bool) -> list[nn.Module]:
    conv = nn.Conv2d(width_in, width_out, 3, padding=1, bias=not batch_norm)
    return [conv, nn.BatchNorm2d(width_out), nn.ReLU(inplace=True)] if batch_norm else [conv, nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """SmallCNN(in_channels, num_classes, batch_norm=False)."""

    def __init__(self, in_channels: int, num_classes: int, *, batch_norm: bool = False) -> None:
        super().__init__()
        w1, w2, w3 = CNN_WIDTHS
        self.features = nn.Sequential(
            *_conv_block(in_channels, w1, batch_norm),
            *_conv_block(w1, w2, batch_norm),
            nn.MaxPool2d(2),
            *_conv_block(w2, w3, batch_norm),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(w3, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
