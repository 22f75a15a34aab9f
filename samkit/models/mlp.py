"""A multilayer perceptron on flattened images: the smallest model, with or without BatchNorm.

    x (N, C, H, W) -> flatten -> [Linear -> (BatchNorm1d) -> ReLU] x len(hidden) -> Linear -> logits (N, num_classes)

The BatchNorm variant (``mlp-bn``) is the cheapest model with running statistics, so the one where SAM's
BatchNorm handling (statistics from the clean pass only) matters and is cheap to train to 100 % train accuracy.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from samkit.models.init import init_weights


class MLP(nn.Module):
    """MLP(in_features, num_classes, hidden=(256, 256), batch_norm=False)."""

    def __init__(self, in_features: int, num_classes: int, *, hidden: Sequence[int] = (256, 256),
                 batch_norm: bool = False) -> None:
        super().__init__()
        widths = [in_features, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            layers.append(nn.Linear(width_in, width_out, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width_out))
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
