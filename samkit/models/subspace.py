"""A line of networks (Wortsman et al., "Learning Neural Network Subspaces", ICML 2021, arXiv 2102.10472).

Two endpoints w1, w2 of one architecture, trained together; the network at α ∈ [0, 1] has the weights

    w(α) = (1 − α) w1 + α w2                 (every parameter: weights, biases, normalization affine)

and training draws α ~ U[0, 1] for each batch and descends on

    L(w(α)) + β cos²(w1, w2),    cos²(w1, w2) = <w1, w2>² / (||w1||² ||w2||²)

where the inner product and the norms run over the weight tensors of the Linear and Conv layers taken together
(one cosine for the whole network, not one per layer; biases and normalization parameters are left out), as
in the authors' code; the paper uses β = 1 for lines. The term keeps the endpoints from collapsing onto one
network: without it the line has no reason to be longer than needed.

``LineModel(start, end)`` holds the endpoints as two copies of the network (``endpoints[0]`` is w1, at α = 0)
and runs ``endpoints[0]``'s forward with the interpolated parameters (``torch.func.functional_call``), so the
buffers (BatchNorm's running statistics) are those of ``endpoints[0]``, shared by every point of the line. In
training mode the forward is at ``alpha`` (set per batch by the trainer); in eval mode at ``eval_alpha``
(default 0.5, the midpoint, the paper's headline network).

At α = 0 the forward computes 1·w1 + 0·w2 = w1 exactly, and w1's gradient is 1·g: with β = 0 the line trains
w1 bit for bit as ordinary training would (tests/models/test_subspace.py).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _check_alpha(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1] (0: the first endpoint, 1: the second), got {value!r}")
    return float(value)


class LineModel(nn.Module):
    """The segment between two networks of one architecture (see the module doc)."""

    def __init__(self, start: nn.Module, end: nn.Module, *, alpha: float = 0.0, eval_alpha: float = 0.5):
        super().__init__()
        shapes = [(name, tuple(p.shape)) for name, p in start.named_parameters()]
        if shapes != [(name, tuple(p.shape)) for name, p in end.named_parameters()]:
            raise ValueError("the two endpoints of a line must be the same architecture (same parameter names/shapes)")
        self.endpoints = nn.ModuleList([start, end])
        self.alpha = _check_alpha("alpha", alpha)
        self.eval_alpha = _check_alpha("eval_alpha", eval_alpha)
        self._names = [name for name, _ in shapes]
        self._weights = [
            f"{module_name}.weight" if module_name else "weight"
            for module_name, module in start.named_modules()
            if isinstance(module, WEIGHT_LAYERS)
        ]
        if not self._weights:
            raise ValueError(
                "a line needs Linear or Conv layers: the cos² term between the endpoints is over their weights"
            )

    def set_alpha(self, alpha: float) -> None:
        self.alpha = _check_alpha("alpha", alpha)

    def point(self, alpha: float) -> dict[str, Tensor]:
        """The parameters w(α) = (1 − α) w1 + α w2 by name (differentiable in both endpoints)."""
        alpha = _check_alpha("alpha", alpha)
        second = dict(self.endpoints[1].named_parameters())
        return {name: (1.0 - alpha) * p + alpha * second[name] for name, p in self.endpoints[0].named_parameters()}

    def forward(self, *inputs: Tensor) -> Tensor:
        alpha = self.alpha if self.training else self.eval_alpha
        return functional_call(self.endpoints[0], self.point(alpha), inputs)

    def weight_pairs(self) -> Iterator[tuple[Tensor, Tensor]]:
        """(w1, w2) of each Linear/Conv weight tensor, the tensors the cos² term runs over."""
        first, second = dict(self.endpoints[0].named_parameters()), dict(self.endpoints[1].named_parameters())
        for name in self._weights:
            yield first[name], second[name]

    def cos_squared(self) -> Tensor:
        """cos²(w1, w2) over all Linear/Conv weights together (a differentiable scalar)."""
        dot = first = second = torch.zeros((), device=next(self.parameters()).device)
        for a, b in self.weight_pairs():
            dot = dot + (a * b).sum()
            first = first + a.pow(2).sum()
            second = second + b.pow(2).sum()
        return dot.pow(2) / (first * second)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, eval_alpha={self.eval_alpha:g}, cos² over {len(self._weights)} weight tensors"


def line_length(model: LineModel) -> float:
    """||w2 − w1|| over every parameter: how far apart the endpoints are."""
    total = 0.0
    for a, b in zip(model.endpoints[0].parameters(), model.endpoints[1].parameters()):
        total += float((b.detach() - a.detach()).double().pow(2).sum())
    return math.sqrt(total)
