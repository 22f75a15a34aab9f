"""The Hessian trace by Hutchinson's estimator with Rademacher probes.

For v with independent ±1 entries, E[v vᵀ] = I, so E[vᵀ H v] = tr(H) exactly:

    for s = 1 .. samples:
        v_s ~ Rademacher^n            (private generator seeded with `seed`)
        t_s = v_sᵀ (H v_s)            (one HVP)
    trace ≈ mean(t_s),  standard error = std(t_s) / sqrt(samples)

Rademacher probes minimise the variance among i.i.d. probes: Var[vᵀHv] = 2 Σ_{i≠j} H_ij², so a
diagonal Hessian is recovered exactly by a single sample.

Reference: M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian
smoothing splines", 1990; Avron and Toledo, "Randomized algorithms for estimating the trace of an
implicit symmetric positive semi-definite matrix", JACM 2011.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator, Literal, Union, overload

import torch
from torch import Tensor, nn

from samkit.sharpness.checks import check_bool, check_int, check_model_and_loss, check_seed
from samkit.sharpness.hvp import HessianOperator
from samkit.sharpness.model_state import measuring
from samkit.sharpness.probes import make_generator, rademacher


def hutchinson(op: Callable[[Tensor], Tensor], probes: Iterable[Tensor]) -> Tensor:
    """vᵀ(H v) for each probe v (one HVP each), as a float64 CPU tensor; their mean estimates tr(H)."""
    return torch.tensor([torch.dot(v, op(v)).item() for v in probes], dtype=torch.float64)


def rademacher_probes(n: int, samples: int, generator: torch.Generator, *, dtype, device) -> Iterator[Tensor]:
    for _ in range(samples):
        yield rademacher(n, generator, dtype=dtype, device=device)


# info=True returns (trace, details), otherwise the trace alone: the overloads let a type checker tell which.
@overload
def hessian_trace(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: Any,
    *,
    samples: int = ...,
    seed: int = ...,
    train_mode: bool = ...,
    info: Literal[False] = ...,
) -> float: ...


@overload
def hessian_trace(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: Any,
    *,
    samples: int = ...,
    seed: int = ...,
    train_mode: bool = ...,
    info: Literal[True],
) -> tuple[float, dict]: ...


@overload
def hessian_trace(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: Any,
    *,
    samples: int = ...,
    seed: int = ...,
    train_mode: bool = ...,
    info: bool = ...,
) -> Union[float, tuple[float, dict]]: ...


def hessian_trace(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: Any,
    *,
    samples: int = 100,
    seed: int = 0,
    train_mode: bool = False,
    info: bool = False,
) -> Union[float, tuple[float, dict]]:
    """Hutchinson estimate of tr(∇²L) for the mean loss over ``data``; ``samples`` HVPs.

    Args:
        model, loss_fn, data, seed, train_mode: as in ``hessian_eigenvalues``.
        samples: number of Rademacher probes (one HVP each); the standard error falls as 1/sqrt(samples).
        info: also return ``{"hvps", "std_error", "loss", "samples"}`` (plain numbers; ``std_error`` is
            the sample standard deviation over sqrt(samples), NaN for one sample).

    Returns:
        The estimate as a float (or ``(trace, info)``). The model is left exactly as found.

    Example::

        >>> model = torch.nn.Linear(3, 2)
        >>> data = (torch.randn(16, 3), torch.randint(0, 2, (16,)))
        >>> t = hessian_trace(model, torch.nn.functional.cross_entropy, data, samples=20)
    """
    check_model_and_loss(model, loss_fn)
    check_int("samples", samples, minimum=1)
    check_seed(seed)
    check_bool("train_mode", train_mode)
    check_bool("info", info)
    with measuring(model, train_mode=train_mode) as seed_forward:
        op = HessianOperator(model, loss_fn, data, seed_forward=seed_forward, seed=seed)
        loss = op.loss()
        generator = make_generator(seed, op.device)
        values = hutchinson(op, rademacher_probes(op.n, samples, generator, dtype=op.dtype, device=op.device))
    trace = values.mean().item()
    if not math.isfinite(trace):
        raise ValueError(f"the Hessian trace estimate is not finite ({trace}); the loss curvature overflows")
    if not info:
        return trace
    std_error = (values.std().item() / math.sqrt(samples)) if samples > 1 else float("nan")
    return trace, {"hvps": op.hvps, "std_error": std_error, "loss": loss, "samples": samples}
