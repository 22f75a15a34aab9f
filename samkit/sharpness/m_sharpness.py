"""m-sharpness: how much the loss can rise within a ρ-ball, averaged over micro-batches of size m.

Foret et al. (SAM, arXiv 2010.01412, §4.2 and Fig. 3) show that this measure, with small m, correlates
with generalization better than full-batch sharpness. For disjoint micro-batches B_1..B_J of exactly m
examples each:

    m-sharpness = (1/J) Σ_j [ max_{||ε|| ≤ ρ} L_{B_j}(w + ε) − L_{B_j}(w) ]

kind="worst": the max by projected normalized-gradient ascent, in the coordinates δ = ε / T:

    δ = 0;  best = 0                           # ε = 0 is in the ball, so the value is ≥ 0
    repeat `steps` times:
        g = ∇_δ L(w + T δ) = T ∇L(w + T δ)
        δ = δ + ρ g / ||g||;  δ = δ · min(1, ρ / ||δ||)     # step 1 gives SAM's (ASAM's) ε̂ exactly
        best = max(best, L(w + T δ) − L(w))
kind="average": the mean rise under random ε on the sphere of radius ρ, antithetic pairs
    (1/S) Σ_s [ (L(w + T ρ u_s) + L(w − T ρ u_s)) / 2 − L(w) ],  u_s uniform on the unit sphere,
    which cancels the gradient term exactly: on a quadratic it is ρ² u_sᵀ(T H T)u_s / 2 with no noise
    from the slope.

T = I, or T = diag(|w| + eta) with adaptive=True (the scale-invariant ball of ASAM, Kwon et al.,
arXiv 2102.11600: ||T⁻¹ ε|| ≤ ρ). The last micro-batch of a batch is left out when it has fewer than m
examples, so every term is over exactly m examples.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Union, overload

import torch
from torch import Tensor, nn

from samkit.sharpness.batches import check_finite, split_micro_batches
from samkit.sharpness.checks import (
    check_bool,
    check_choice,
    check_int,
    check_model_and_loss,
    check_nonnegative_float,
    check_positive_float,
    check_seed,
)
from samkit.sharpness.hvp import HessianOperator, assign_, flatten, gradient
from samkit.sharpness.model_state import measuring
from samkit.sharpness.probes import make_generator, unit_gaussian

KINDS = ("worst", "average")


class _MicroBatchLoss:
    """L_{B_j} at any weights w0 + ε, with the micro-batch's RNG fixed before each forward pass."""

    def __init__(self, op: HessianOperator, inputs: Tensor, targets: Tensor, index: int, w0: Tensor, rho: float):
        self.op, self.inputs, self.targets, self.index, self.w0, self.rho = op, inputs, targets, index, w0, rho
        self.forwards = 0
        self.backwards = 0

    def _loss(self, perturbation: Tensor | None) -> Tensor:
        assign_(self.op.params, self.w0 if perturbation is None else self.w0 + perturbation)
        self.forwards += 1
        return self.op.batch_loss(self.index, self.inputs, self.targets)

    def _checked(self, loss: Tensor, perturbation: Tensor | None) -> float:
        where = "at the model's weights" if perturbation is None else f"at a point of the rho={self.rho} ball"
        return check_finite(loss.item(), where=f"on micro-batch {self.index} {where}")

    @torch.no_grad()
    def value(self, perturbation: Tensor | None) -> float:
        return self._checked(self._loss(perturbation), perturbation)

    def value_and_gradient(self, perturbation: Tensor | None) -> tuple[float, Tensor]:
        with torch.enable_grad():
            loss = self._loss(perturbation)
            self.backwards += 1
            return self._checked(loss, perturbation), flatten(gradient(loss, self.op.params))


def _worst(batch: _MicroBatchLoss, scale: Tensor | None, rho: float, steps: int) -> tuple[float, float]:
    delta = torch.zeros_like(batch.w0)
    base, best = None, 0.0
    for _ in range(steps):
        value, grad = batch.value_and_gradient(None if base is None else delta if scale is None else scale * delta)
        if base is None:
            base = value
        best = max(best, value - base)
        if scale is not None:
            grad = scale * grad
        norm = torch.linalg.vector_norm(grad)
        if not norm > 0:  # a stationary point of this micro-batch: the ascent has nowhere to go
            return base, best
        delta = delta + (rho / norm) * grad
        delta = delta * torch.clamp(rho / torch.linalg.vector_norm(delta), max=1.0)
    assert base is not None, "steps >= 1, so the loop set base"
    best = max(best, batch.value(delta if scale is None else scale * delta) - base)
    return base, best


def _average(batch: _MicroBatchLoss, scale: Tensor | None, rho: float, samples: int, generator) -> tuple[float, float]:
    base = batch.value(None)
    total = 0.0
    for _ in range(samples):
        eps = rho * unit_gaussian(batch.w0.numel(), generator, dtype=batch.w0.dtype, device=batch.w0.device)
        if scale is not None:
            eps = scale * eps
        total += (batch.value(eps) + batch.value(-eps)) / 2 - base
    return base, total / samples


# info=True returns (value, details), otherwise the value alone: the overloads let a type checker tell which.
@overload
def m_sharpness(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: Any,
    *,
    rho: float = ...,
    micro_batch_size: int = ...,
    kind: str = ...,
    adaptive: bool = ...,
    eta: float = ...,
    steps: int = ...,
    samples: int = ...,
    seed: int = ...,
    train_mode: bool = ...,
    info: Literal[False] = ...,
) -> float: ...


@overload
def m_sharpness(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: Any,
    *,
    rho: float = ...,
    micro_batch_size: int = ...,
    kind: str = ...,
    adaptive: bool = ...,
    eta: float = ...,
    steps: int = ...,
    samples: int = ...,
    seed: int = ...,
    train_mode: bool = ...,
    info: Literal[True],
) -> tuple[float, dict]: ...


@overload
def m_sharpness(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: Any,
    *,
    rho: float = ...,
    micro_batch_size: int = ...,
    kind: str = ...,
    adaptive: bool = ...,
    eta: float = ...,
    steps: int = ...,
    samples: int = ...,
    seed: int = ...,
    train_mode: bool = ...,
    info: bool = ...,
) -> Union[float, tuple[float, dict]]: ...


def m_sharpness(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: Any,
    *,
    rho: float = 0.05,
    micro_batch_size: int = 128,
    kind: str = "worst",
    adaptive: bool = False,
    eta: float = 0.0,
    steps: int = 5,
    samples: int = 5,
    seed: int = 0,
    train_mode: bool = False,
    info: bool = False,
) -> Union[float, tuple[float, dict]]:
    """Mean over micro-batches of size m of [max_{||ε|| ≤ ρ} L(w + ε) − L(w)] (see the module docstring).

    Args:
        model, loss_fn, data, seed, train_mode: as in ``hessian_eigenvalues``; every batch is split into
            micro-batches of ``micro_batch_size`` consecutive examples (a shorter remainder is left out).
        rho: radius of the ball (SAM's default 0.05; ASAM's ball is larger, e.g. 0.5).
        micro_batch_size: m, the number of EXAMPLES per micro-batch (the SAM paper's m), not a count.
        kind: "worst" (projected gradient ascent; ≥ 0) or "average" (random ε on the sphere).
        adaptive: measure in ASAM's ball ||ε / (|w| + eta)|| ≤ rho instead of ||ε|| ≤ rho.
        eta: ASAM's offset, used only with ``adaptive=True``.
        steps: ascent steps for kind="worst" (1 reproduces SAM's ε̂; gradient evaluations per micro-batch).
        samples: antithetic pairs of random ε for kind="average" (2 forward passes each).
        info: also return ``{"per_micro_batch", "micro_batches", "left_out_examples", "loss",
            "forward_passes", "gradient_evaluations"}`` (plain numbers and lists).

    Returns:
        The m-sharpness as a float (or ``(value, info)``). The model is left exactly as found.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> data = (torch.randn(64, 4), torch.randint(0, 3, (64,)))
        >>> s = m_sharpness(model, torch.nn.functional.cross_entropy, data, micro_batch_size=16)
    """
    check_model_and_loss(model, loss_fn)
    check_positive_float("rho", rho)
    check_int("micro_batch_size", micro_batch_size, minimum=1)
    check_choice("kind", kind, KINDS)
    check_bool("adaptive", adaptive)
    check_nonnegative_float("eta", eta)
    check_int("steps", steps, minimum=1)
    check_int("samples", samples, minimum=1)
    check_seed(seed)
    check_bool("train_mode", train_mode)
    check_bool("info", info)
    values: list[float] = []
    losses: list[float] = []
    left_out = largest = 0
    forwards = backwards = 0
    with measuring(model, train_mode=train_mode) as seed_forward:
        op = HessianOperator(model, loss_fn, data, seed_forward=seed_forward, seed=seed)
        w0 = flatten([p.detach() for p in op.params]).clone()
        scale = (w0.abs() + eta) if adaptive else None
        generator = make_generator(seed, op.device)
        for _, inputs, targets, size in op.batches:
            largest = max(largest, size)
            micro_batches = split_micro_batches(inputs, targets, micro_batch_size)
            left_out += size - len(micro_batches) * micro_batch_size
            for micro_inputs, micro_targets in micro_batches:
                batch = _MicroBatchLoss(op, micro_inputs, micro_targets, len(values), w0, rho)
                if kind == "worst":
                    base, value = _worst(batch, scale, rho, steps)
                else:
                    base, value = _average(batch, scale, rho, samples, generator)
                values.append(value)
                losses.append(base)
                forwards += batch.forwards
                backwards += batch.backwards
    if not values:
        raise ValueError(
            f"micro_batch_size={micro_batch_size} is larger than every batch in data (the largest has {largest} "
            "examples); lower micro_batch_size or pass larger batches"
        )
    result = sum(values) / len(values)
    if not info:
        return result
    return result, {
        "per_micro_batch": values,
        "micro_batches": len(values),
        "left_out_examples": left_out,
        "loss": sum(losses) / len(losses),
        "forward_passes": forwards,
        "gradient_evaluations": backwards,
    }
