"""Loss landscape pictures: the loss on a line or a plane through the trained weights.

Li, Xu, Taylor, Studer and Goldstein, "Visualizing the loss landscape of neural nets", NeurIPS 2018:
random directions are only comparable across networks after "filter normalization", which removes the
scale invariance of ReLU/BN networks:

    for each trainable parameter p (flattened into direction d ∈ R^n):
        d_p ~ N(0, I)                                  (private generator seeded with `seed`)
        if p.dim() > 1: for each filter i (slice p[i] along dim 0):  d_p[i] *= ||p[i]|| / ||d_p[i]||
        else:           d_p = 0                        (biases and BN parameters: "ignore biasbn")
    grid  α, β ∈ span · {−1, ..., 0, ..., 1}           (an odd number of steps, so 0 is on the grid)
    1-D:  L(w + α d1);   2-D:  L(w + α d1 + β d2)      (mean loss over all of data)

The grid's center is the trained weights themselves, bit for bit, so ``losses`` there equals L(w). A
popular library draws uniform [0, 1] directions and inverts the distance scaling; this does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from samkit.sharpness.checks import (
    check_bool,
    check_choice,
    check_int,
    check_model_and_loss,
    check_positive_float,
    check_seed,
)
from samkit.sharpness.hvp import HessianOperator, assign_, flatten
from samkit.sharpness.model_state import measuring
from samkit.sharpness.probes import gaussian, make_generator


@dataclass
class Landscape:
    """Losses on a grid through the trained weights.

    Attributes:
        coords: the grid along each direction, float64 (``steps`` values from −span to span; 0 in the middle).
        losses: float64, shape (steps,) for 1-D or (steps, steps) for 2-D, where
            ``losses[i, j] = L(w + coords[i] d1 + coords[j] d2)`` (non-finite where the loss overflows).
        center_loss: L(w), the loss at the trained weights (``losses`` at the center).
        dims: 1 or 2.  span: the grid's half-width.
        directions: the flat directions used (parameter dtype and device), reusable via ``directions=``.
        normalization: "filter" (Li et al.) or "none" (directions given by the caller).
    """

    coords: Tensor
    losses: Tensor
    center_loss: float
    dims: int
    span: float
    directions: list = field(repr=False)
    normalization: str = "filter"

    @property
    def center(self) -> int:
        """Index of 0 in ``coords``."""
        return (self.coords.numel() - 1) // 2

    def plot(self, path, *, title: Optional[str] = None) -> Path:
        """Write a PNG: the curve (1-D) or contour + 3-D surface (2-D), axes labelled, minimum marked."""
        from samkit.sharpness.plotting import plot_landscapes

        return plot_landscapes([self], path, titles=[title or ""])

    def as_dict(self) -> dict:
        """Plain lists and floats (for JSON)."""
        return {
            "coords": self.coords.tolist(),
            "losses": self.losses.tolist(),
            "center_loss": self.center_loss,
            "dims": self.dims,
            "span": self.span,
            "normalization": self.normalization,
        }


def filter_normalized_direction(params: Sequence[Tensor], generator: torch.Generator) -> Tensor:
    """A flat Gaussian direction rescaled filter by filter to ``params`` (zero on 1-D parameters)."""
    pieces = []
    for p in params:
        d = gaussian(tuple(p.shape), generator, dtype=p.dtype, device=p.device)
        if p.dim() <= 1:
            pieces.append(torch.zeros_like(d))
            continue
        filters = d.reshape(p.shape[0], -1)
        weight_norms = torch.linalg.vector_norm(p.detach().reshape(p.shape[0], -1), dim=1, keepdim=True)
        direction_norms = torch.linalg.vector_norm(filters, dim=1, keepdim=True)
        pieces.append(filters * (weight_norms / direction_norms.clamp_min(torch.finfo(p.dtype).tiny)))
    return flatten(pieces)


def _check_directions(directions: Any, dims: int, n: int, like: Tensor) -> list[Tensor]:
    if not isinstance(directions, (list, tuple)) or len(directions) != dims:
        raise ValueError(f"directions must be a list of {dims} flat tensors (one per dim), got {directions!r:.80}")
    checked = []
    for i, d in enumerate(directions):
        if not isinstance(d, Tensor) or d.shape != (n,):
            shape = tuple(d.shape) if isinstance(d, Tensor) else type(d).__name__
            raise ValueError(
                f"directions[{i}] must be a tensor of shape ({n},) (all trainable parameters, flat), got {shape}"
            )
        checked.append(d.detach().to(dtype=like.dtype, device=like.device))
    return checked


@torch.no_grad()
def _mean_loss(op: HessianOperator) -> float:
    total, count = 0.0, 0
    for index, inputs, targets, size in op.batches:
        total += size * op.batch_loss(index, inputs, targets).item()
        count += size
    return total / count


def loss_landscape(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: Any,
    *,
    dims: int = 2,
    steps: int = 41,
    span: float = 1.0,
    seed: int = 0,
    train_mode: bool = False,
    directions: Optional[Sequence[Tensor]] = None,
) -> Landscape:
    """The loss on a 1-D line or 2-D plane of filter-normalized random directions through the weights.

    Args:
        model, loss_fn, data, seed, train_mode: as in ``hessian_eigenvalues``.
        dims: 1 (a curve) or 2 (a surface).
        steps: grid points per direction; odd, so that the trained weights are the center.
            A 2-D grid costs steps² passes over data (41² = 1681 by default).
        span: the grid runs over [−span, span] in units of the (filter-normalized) direction.
        directions: ``dims`` flat tensors of length n to use instead of random ones (e.g. the top Hessian
            eigenvectors from ``hessian_eigenvalues(..., info=True)``); used as given, not normalized.

    Returns:
        A ``Landscape`` (``.coords``, ``.losses``, ``.plot(path)``). The model is left exactly as found.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> data = (torch.randn(64, 4), torch.randint(0, 3, (64,)))
        >>> land = loss_landscape(model, torch.nn.functional.cross_entropy, data, dims=1, steps=11)
        >>> land.losses.shape
        torch.Size([11])
    """
    check_model_and_loss(model, loss_fn)
    check_choice("dims", dims, (1, 2))
    check_int("steps", steps, minimum=3)
    if steps % 2 == 0:
        raise ValueError(
            f"steps must be odd so that the grid's center is the trained weights, got {steps}; use {steps + 1}"
        )
    check_positive_float("span", span)
    check_seed(seed)
    check_bool("train_mode", train_mode)
    half = (steps - 1) // 2
    coords = span * (torch.arange(steps, dtype=torch.float64) - half) / half
    with measuring(model, train_mode=train_mode) as seed_forward:
        op = HessianOperator(model, loss_fn, data, seed_forward=seed_forward, seed=seed)
        op.loss()  # raises early on an empty data set, a non-scalar or a non-finite loss at w
        w0 = flatten([p.detach() for p in op.params]).clone()
        if directions is None:
            generator = make_generator(seed, op.device)
            found = [filter_normalized_direction(op.params, generator) for _ in range(dims)]
            if not any(bool(d.any()) for d in found):
                raise ValueError(
                    "every trainable parameter is 1-D (biases, norms), so filter-normalized directions are all "
                    "zero; pass directions=[...] of your own"
                )
        else:
            found = _check_directions(directions, dims, op.n, w0)
        losses = torch.empty((steps,) * dims, dtype=torch.float64)
        for i, a in enumerate(coords.tolist()):
            if dims == 1:
                assign_(op.params, w0 + a * found[0])
                losses[i] = _mean_loss(op)
                continue
            shifted = w0 + a * found[0]
            for j, b in enumerate(coords.tolist()):
                assign_(op.params, shifted + b * found[1])
                losses[i, j] = _mean_loss(op)
    return Landscape(
        coords=coords,
        losses=losses,
        center_loss=float(losses[(half,) * dims]),
        dims=dims,
        span=float(span),
        directions=found,
        normalization="filter" if directions is None else "none",
    )
