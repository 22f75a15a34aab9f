"""Hessian-vector products of the mean loss over ``data`` by double backward (Pearlmutter's trick).

The Hessian H = ∇²L(w) of all trainable parameters, flattened to one vector w ∈ R^n, is never formed:

    for each batch b:
        g_b = autograd.grad(L_b(w), w, create_graph=True)     # first backward, keeps the graph
        Hv += |B_b| · autograd.grad(g_b · v, w)               # second backward: ∇(g_b · v) = H_b v
    Hv /= Σ_b |B_b|

One call of ``HessianOperator`` is one HVP of the full-data Hessian, whatever the number of batches;
``op.hvps`` counts them, so Lanczos and power iteration report comparable costs. ``torch.autograd.grad``
is used throughout, so the parameters' ``.grad`` are never written. The operator computes in the
parameters' dtype and on their device; it does not change the model's mode (see ``model_state``).

Reference: B. A. Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 1994.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, cast

import torch
from torch import Tensor, nn

from samkit.sharpness.batches import Batches, batch_loss, check_finite
from samkit.sharpness.checks import trainable_parameters


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """One vector holding ``tensors`` one after another (the parameter order of ``model.parameters()``)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Views of ``vector`` shaped like ``like``."""
    return [chunk.view_as(t) for chunk, t in zip(vector.split([t.numel() for t in like]), like)]


@torch.no_grad()
def assign_(params: Sequence[Tensor], vector: Tensor) -> None:
    """Write ``vector`` into ``params`` in place."""
    for p, chunk in zip(params, unflatten(vector, params)):
        p.copy_(chunk)


def gradient(loss: Tensor, params: Sequence[Tensor], *, create_graph: bool = False) -> list[Tensor]:
    """∇loss for every parameter (zeros where the loss does not depend on it); ``.grad`` is not touched."""
    return list(torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True, materialize_grads=True))


def forward_seed(seed: int, index: int) -> int:
    """The global-RNG seed used before the forward pass of batch ``index`` (fixes dropout masks)."""
    return seed * 1_000_003 + index


class HessianOperator:
    """v ↦ H v for the mean loss of ``model`` over ``data`` (the model is used in its current mode).

    Args:
        model: the network; its trainable parameters (``requires_grad=True``) span R^n.
        loss_fn: ``loss_fn(model(inputs), targets)`` must return a scalar tensor.
        data: an ``(inputs, targets)`` batch or an iterable of batches (see ``samkit.sharpness.batches``).
        seed_forward: called with a per-batch seed before every forward pass (``measuring`` provides it);
            ``None`` leaves the global RNG alone.
        seed: the base of those per-batch seeds.

    Attributes:
        n: number of trainable scalars.  hvps: HVPs computed so far.  params: the trainable parameters.

    Example::

        >>> model = torch.nn.Linear(3, 2).double()
        >>> data = (torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))
        >>> op = HessianOperator(model, torch.nn.functional.cross_entropy, data)
        >>> hv = op(torch.ones(op.n, dtype=torch.float64)); op.hvps
        1
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        data: Any,
        *,
        seed_forward: Callable[[int], None] | None = None,
        seed: int = 0,
    ):
        self.model = model
        self.loss_fn = loss_fn
        self.params = trainable_parameters(model)
        self.n = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.batches = Batches(data, self.device)
        self.hvps = 0
        self._seed_forward = seed_forward
        self._seed = seed

    def batch_loss(self, index: int, inputs: Any, targets: Any) -> Tensor:
        """The scalar loss of one batch, after fixing the global RNG for this batch."""
        if self._seed_forward is not None:
            self._seed_forward(forward_seed(self._seed, index))
        return batch_loss(self.model, self.loss_fn, inputs, targets, index=index)

    @torch.no_grad()
    def loss(self) -> float:
        """L(w): the mean loss over all examples; raises on an empty data set or a non-finite loss."""
        total, count = 0.0, 0
        for index, inputs, targets, size in self.batches:
            value = self.batch_loss(index, inputs, targets).item()
            check_finite(value, where=f"on batch {index} at the model's weights")
            total += size * value
            count += size
        return total / count

    def __call__(self, vector: Tensor) -> Tensor:
        """H v for a flat ``vector`` of length ``n`` (parameter dtype and device)."""
        if vector.shape != (self.n,):
            raise ValueError(f"vector must have shape ({self.n},), got {tuple(vector.shape)}")
        pieces = unflatten(vector.to(dtype=self.dtype, device=self.device), self.params)
        result = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        count = 0
        with torch.enable_grad():
            for index, inputs, targets, size in self.batches:
                grads = gradient(self.batch_loss(index, inputs, targets), self.params, create_graph=True)
                # a tensor: trainable_parameters refuses a model without parameters, so the sum is never 0
                dot = cast(Tensor, sum((g * piece).sum() for g, piece in zip(grads, pieces)))
                if dot.requires_grad:  # a loss linear in every parameter has H = 0
                    result.add_(flatten(gradient(dot, self.params)), alpha=size)
                count += size
        self.hvps += 1
        return result.div_(count)
