"""A multilayer perceptron on flattened images: the smallest model, no BatchNorm.

    x (N, C, H, W) -> flatten -> [Linear -> ReLU] x len(hidden) -> Linear -> logits (N, num_classes)
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from samkit.models.init import init_weights


class MLP(nn.Module):
    """MLP(in_features, num_classes, hidden=(256, 256))."""

    def __init__(self, in_features: int, num_classes: int, *, hidden: Sequence[int] = (256, 256)) -> None:
        super().__init__()
        widths = [in_features, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(width_in, width_out), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
