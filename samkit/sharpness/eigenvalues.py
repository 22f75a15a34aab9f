"""The k largest Hessian eigenvalues of a model's loss: λ1 ≥ λ2 ≥ ... ≥ λk.

SAM's geometric evidence (Foret et al., arXiv 2010.01412, Fig. 3): at the end of training the top Hessian
eigenvalue of a SAM-trained WRN is far smaller than an SGD-trained one (λmax 1.0 vs 24.2, λmax/λ5 2.6 vs
11.4). This computes those numbers for any model, matrix-free:

    with the model in eval mode (or train mode, if asked), restored afterwards:
        H v  by double backward over all batches of data            (hvp.py)
        Lanczos with full reorthogonalisation (default)             (lanczos.py)
        or power iteration with deflation, for comparison          (power_iteration.py)
        until ||H u_i − λ_i u_i|| ≤ tol · |λ_i| for the k largest
        and (Lanczos, k ≥ 2) a run orthogonal to u_1..u_k finds nothing above λ_k
        (a single Krylov sequence sees a repeated eigenvalue once; the check finds the other copies)

The k largest are algebraic (a negative eigenvalue of large magnitude is not "large"), unlike PyHessian,
which returns the largest by |λ|.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Literal, Union, overload

from torch import Tensor, nn

from samkit.sharpness.checks import (
    check_bool,
    check_choice,
    check_int,
    check_model_and_loss,
    check_positive_float,
    check_seed,
    trainable_parameters,
)
from samkit.sharpness.hvp import HessianOperator
from samkit.sharpness.lanczos import EigenResult, lanczos_eigenpairs
from samkit.sharpness.model_state import measuring
from samkit.sharpness.power_iteration import power_eigenpairs
from samkit.sharpness.probes import make_generator

METHODS = {"lanczos": lanczos_eigenpairs, "power": power_eigenpairs}


@dataclass
class EigenInfo:
    """What ``hessian_eigenvalues(..., info=True)`` spent and reached.

    Attributes:
        method: "lanczos" or "power".
        hvps: Hessian-vector products computed (each over ALL batches of data; the same unit for both methods).
        iterations: Lanczos steps (the first run and the check runs), or power iterations summed over the
            eigenvalues. Equal to ``hvps`` except after Lanczos found a repeated eigenvalue: one more HVP
            each measures the new pair's residual.
        converged: whether every returned pair met ``tol`` (and, Lanczos with k ≥ 2, the check for missed
            repeated eigenvalues found none above λ_k).
        tol: the relative residual tolerance asked for.
        residuals: the true ||H u_i − λ_i u_i|| for each returned pair (|λ_i − λ| ≤ residual for some
            eigenvalue λ). Power iteration tests pairs after the first on the deflated operator, so theirs
            can exceed tol·|λ_i| by the earlier pairs' residuals (the eigenvalue error is second order).
        loss: L(w), the loss at the weights the Hessian is taken at.
        eigenvectors: the unit eigenvectors u_i as rows (k × n, parameter dtype and device, in the order
            of ``model.parameters()`` restricted to the trainable ones).
    """

    method: str
    hvps: int
    iterations: int
    converged: bool
    tol: float
    residuals: list
    loss: float
    eigenvectors: Tensor


# info=True returns (values, EigenInfo), otherwise the values alone: the overloads let a type checker tell which.
@overload
def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: Any,
    k: int = ...,
    *,
    tol: float = ...,
    max_iter: int = ...,
    method: str = ...,
    seed: int = ...,
    train_mode: bool = ...,
    info: Literal[False] = ...,
) -> Tensor: ...


@overload
def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: Any,
    k: int = ...,
    *,
    tol: float = ...,
    max_iter: int = ...,
    method: str = ...,
    seed: int = ...,
    train_mode: bool = ...,
    info: Literal[True],
) -> tuple[Tensor, EigenInfo]: ...


@overload
def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: Any,
    k: int = ...,
    *,
    tol: float = ...,
    max_iter: int = ...,
    method: str = ...,
    seed: int = ...,
    train_mode: bool = ...,
    info: bool = ...,
) -> Union[Tensor, tuple[Tensor, EigenInfo]]: ...


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: Any,
    k: int = 1,
    *,
    tol: float = 1e-6,
    max_iter: int = 100,
    method: str = "lanczos",
    seed: int = 0,
    train_mode: bool = False,
    info: bool = False,
) -> Union[Tensor, tuple[Tensor, EigenInfo]]:
    """The k largest (algebraic) eigenvalues of the Hessian of the mean loss over ``data``, descending.

    Args:
        model: the network; the Hessian is over its parameters with ``requires_grad=True``.
        loss_fn: ``loss_fn(model(inputs), targets)`` -> scalar tensor (e.g. ``F.cross_entropy``).
        data: an ``(inputs, targets)`` batch, or an iterable of batches (mean loss over all examples).
        k: how many eigenvalues (1 <= k <= number of trainable scalars).
        tol: relative residual tolerance, ||H u − λ u|| ≤ tol·|λ| for every returned pair, hence
            each value within relative ``tol`` of a true eigenvalue. The same test for both methods
            (power: on the operator deflated by the pairs already found, as PyHessian).
            In float32 the HVPs themselves carry ~1e-6 relative error; ask for tol >= 1e-5 there.
        max_iter: Lanczos: the most Lanczos steps (HVPs) in all, the check for missed repeated
            eigenvalues included. Power: the most HVPs per eigenvalue (as PyHessian).
            Reaching it without meeting ``tol`` gives a RuntimeWarning and ``info.converged = False``.
        method: "lanczos" (full reorthogonalisation; default) or "power" (deflated power iteration).
        seed: seeds the random start vectors (a private generator; the global RNG is untouched).
        train_mode: evaluate the model in train mode (batch-statistics BatchNorm, dropout with a mask
            fixed per batch) instead of eval mode. Either way the model's modes are restored.
        info: also return an ``EigenInfo`` (HVPs spent, convergence, residuals, eigenvectors).

    Returns:
        A float64 CPU tensor of shape (k,), descending; with ``info=True``, ``(eigenvalues, EigenInfo)``.
        The model is left exactly as found (weights bit-exact, modes, requires_grad, .grad, buffers).

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> data = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
        >>> top = hessian_eigenvalues(model, torch.nn.functional.cross_entropy, data, k=3, tol=1e-4)
        >>> top.shape
        torch.Size([3])
    """
    check_model_and_loss(model, loss_fn)
    check_int("k", k, minimum=1)
    check_positive_float("tol", tol)
    check_int("max_iter", max_iter, minimum=1)
    check_choice("method", method, tuple(METHODS))
    check_seed(seed)
    check_bool("train_mode", train_mode)
    check_bool("info", info)
    n = sum(p.numel() for p in trainable_parameters(model))
    if k > n:
        raise ValueError(f"k must be <= the number of trainable parameters ({n}), got k={k}")
    if method == "lanczos" and max_iter < k:
        raise ValueError(
            f"max_iter must be >= k for Lanczos (it needs k steps for k Ritz values), got {max_iter} < {k}"
        )
    with measuring(model, train_mode=train_mode) as seed_forward:
        op = HessianOperator(model, loss_fn, data, seed_forward=seed_forward, seed=seed)
        loss = op.loss()
        generator = make_generator(seed, op.device)
        result: EigenResult = METHODS[method](
            op, op.n, k, tol=tol, max_iter=max_iter, generator=generator, dtype=op.dtype, device=op.device
        )
    if not result.converged:
        relative = [r / max(abs(v), 1e-300) for r, v in zip(result.residuals, result.eigenvalues.tolist())]
        unchecked = method == "lanczos" and all(r <= tol for r in relative)
        reason = (
            "the pairs met tol, but the check for missed repeated eigenvalues did not finish"
            if unchecked
            else f"relative residuals {[float(f'{r:.3g}') for r in relative]}"
        )
        warnings.warn(
            f"hessian_eigenvalues ({method}) stopped after {result.hvps} HVPs without reaching tol={tol}: "
            f"{reason}; raise max_iter or tol",
            RuntimeWarning,
            stacklevel=2,
        )
    if not info:
        return result.eigenvalues
    return result.eigenvalues, EigenInfo(
        method=method,
        hvps=result.hvps,
        iterations=result.iterations,
        converged=result.converged,
        tol=tol,
        residuals=result.residuals,
        loss=loss,
        eigenvectors=result.eigenvectors,
    )
