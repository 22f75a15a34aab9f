"""One call for every flatness number of a model, as plain floats and lists (for a CLI, JSON, a trainer).

    loss            L(w)
    eigenvalues     λ1 ≥ ... ≥ λk by Lanczos (hessian_eigenvalues); lambda_max = λ1
    lambda_ratio    λ1 / λk (λ1/λ5 with the default k = 5; the SAM paper's figure reports it), None if λk ≤ 0
    trace           Hutchinson estimate of tr(H) and its standard error (hessian_trace)
    m_sharpness     worst (projected ascent) and average (random ε) over micro-batches of size m
    hvps            HVPs spent in all (eigenvalues + trace), and each part

Every part uses the same ``seed``, ``train_mode`` and data (a generator is read into a list once), and the
model is left exactly as found.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import Tensor, nn

from samkit.sharpness.batches import reusable
from samkit.sharpness.checks import trainable_parameters
from samkit.sharpness.eigenvalues import hessian_eigenvalues
from samkit.sharpness.m_sharpness import m_sharpness
from samkit.sharpness.trace import hessian_trace


def flatness_report(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: Any,
    *,
    k: int = 5,
    seed: int = 0,
    rho: float = 0.05,
    micro_batch_size: int = 128,
    tol: float = 1e-4,
    max_iter: int = 100,
    trace_samples: int = 100,
    sharpness_steps: int = 5,
    sharpness_samples: int = 5,
    adaptive: bool = False,
    train_mode: bool = False,
    method: str = "lanczos",
) -> dict:
    """The flatness of ``model`` at its current weights, as a dict of plain numbers.

    Args:
        model, loss_fn, data, seed, train_mode: as in ``hessian_eigenvalues``.
        k, tol, max_iter, method: passed to ``hessian_eigenvalues`` (tol 1e-4 here: a report, not a test).
        trace_samples: Rademacher probes for ``hessian_trace``.
        rho, micro_batch_size, adaptive: passed to both ``m_sharpness`` calls.
        sharpness_steps: ascent steps for the worst case; sharpness_samples: random pairs for the average.

    Returns:
        ``{"loss", "num_parameters", "k", "eigenvalues", "lambda_max", "lambda_ratio", "eigenvalues_converged",
        "trace", "trace_std_error", "m_sharpness_worst", "m_sharpness_average", "rho", "micro_batch_size",
        "micro_batches", "hvps", "hvps_eigenvalues", "hvps_trace", "seed", "train_mode"}``: floats, ints,
        bools, a list of floats, and ``lambda_ratio`` None when λk ≤ 0.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> data = (torch.randn(64, 4), torch.randint(0, 3, (64,)))
        >>> r = flatness_report(model, torch.nn.functional.cross_entropy, data, micro_batch_size=16)
        >>> sorted(r)[:3]
        ['eigenvalues', 'eigenvalues_converged', 'hvps']
    """
    data = reusable(data)  # a generator would be used up by the first of the four measurements
    values, eig = hessian_eigenvalues(
        model, loss_fn, data, k, tol=tol, max_iter=max_iter, method=method, info=True, seed=seed, train_mode=train_mode
    )
    trace, trace_info = hessian_trace(
        model, loss_fn, data, samples=trace_samples, info=True, seed=seed, train_mode=train_mode
    )
    # both m-sharpness calls measure the same ball (rho, micro_batch_size, adaptive) on the same data and seed
    worst, worst_info = m_sharpness(
        model, loss_fn, data, kind="worst", steps=sharpness_steps, info=True,
        rho=rho, micro_batch_size=micro_batch_size, adaptive=adaptive, seed=seed, train_mode=train_mode,
    )
    average = m_sharpness(
        model, loss_fn, data, kind="average", samples=sharpness_samples,
        rho=rho, micro_batch_size=micro_batch_size, adaptive=adaptive, seed=seed, train_mode=train_mode,
    )
    eigenvalues = [float(v) for v in values]
    ratio: Optional[float] = eigenvalues[0] / eigenvalues[-1] if eigenvalues[-1] > 0 else None
    return {
        "loss": float(eig.loss),
        "num_parameters": sum(p.numel() for p in trainable_parameters(model)),
        "k": k,
        "eigenvalues": eigenvalues,
        "lambda_max": eigenvalues[0],
        "lambda_ratio": ratio,
        "eigenvalues_converged": bool(eig.converged),
        "trace": float(trace),
        "trace_std_error": float(trace_info["std_error"]),
        "m_sharpness_worst": float(worst),
        "m_sharpness_average": float(average),
        "rho": float(rho),
        "micro_batch_size": micro_batch_size,
        "micro_batches": worst_info["micro_batches"],
        "hvps": eig.hvps + trace_info["hvps"],
        "hvps_eigenvalues": eig.hvps,
        "hvps_trace": trace_info["hvps"],
        "seed": seed,
        "train_mode": train_mode,
    }
