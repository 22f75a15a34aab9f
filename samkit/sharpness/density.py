"""The Hessian eigenvalue density by stochastic Lanczos quadrature (SLQ).

The spectral density φ(t) = (1/n) Σ_i δ(t − λ_i) is estimated from a few Lanczos runs:

    for r = 1 .. runs:
        v_r = Rademacher / sqrt(n)               (the same probes as hessian_trace with this seed)
        T_r = Lanczos(H, v_r, m steps)           (no restarts: m HVPs, fewer if the space is invariant)
        T_r = S diag(θ) Sᵀ  ->  nodes θ_i, weights τ_i = S[0, i]² / runs
    φ(t) ≈ Σ_{r,i} τ_i N(t; θ_i, σ²)            (Gaussian broadening of the quadrature)

Gauss quadrature with m nodes integrates polynomials of degree ≤ 2m − 1 exactly for each probe, so the
weights sum to 1 and Σ τ_i θ_i = mean_r v_rᵀ H v_r / n: the first moment is exactly the Hutchinson trace
estimate over n (both are tested).

References: Golub and Meurant, "Matrices, moments and quadrature", 1994; Lin, Saad and Yang,
"Approximating spectral densities of large matrices", SIAM Review 2016; Ghorbani, Krishnan and Xiao,
ICML 2019 (SLQ on neural network Hessians).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from samkit.sharpness.checks import check_bool, check_int, check_model_and_loss, check_positive_float, check_seed
from samkit.sharpness.hvp import HessianOperator
from samkit.sharpness.lanczos import LanczosProcess
from samkit.sharpness.model_state import measuring
from samkit.sharpness.probes import make_generator, rademacher


@dataclass
class Spectrum:
    """An SLQ estimate of the Hessian's eigenvalue density.

    Attributes:
        nodes: quadrature nodes (Ritz values of every run), float64 CPU.
        weights: their weights, float64 CPU, summing to 1.
        n: number of trainable parameters (the Hessian's size).
        runs, iterations: as asked; hvps: the HVPs spent (≤ runs · iterations); loss: L(w).
    """

    nodes: Tensor
    weights: Tensor
    n: int
    runs: int
    iterations: int
    hvps: int
    loss: float

    def moment(self, power: int = 1) -> float:
        """Σ τ_i θ_i^power ≈ tr(H^power) / n."""
        check_int("power", power, minimum=0)
        return float((self.weights * self.nodes**power).sum())

    def default_sigma(self) -> float:
        """The broadening used when none is given: 1 % of the nodes' range (of their scale if they coincide)."""
        spread = float(self.nodes.max() - self.nodes.min())
        return 0.01 * (spread if spread > 0 else max(float(self.nodes.abs().max()), 1.0))

    def grid(self, points: int = 1000, *, sigma: Optional[float] = None) -> Tensor:
        """An evenly spaced float64 grid covering every node ± 5 σ."""
        check_int("points", points, minimum=2)
        sigma = self.default_sigma() if sigma is None else check_positive_float("sigma", sigma)
        return torch.linspace(
            float(self.nodes.min()) - 5 * sigma, float(self.nodes.max()) + 5 * sigma, points, dtype=torch.float64
        )

    def density(self, grid: Any, *, sigma: Optional[float] = None) -> Tensor:
        """φ(t) at each point of ``grid`` (tensor, array or list), Gaussian-broadened with width ``sigma``."""
        sigma = self.default_sigma() if sigma is None else check_positive_float("sigma", sigma)
        t = torch.as_tensor(grid, dtype=torch.float64).reshape(-1, 1)
        gauss = torch.exp(-((t - self.nodes) ** 2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
        return gauss @ self.weights

    def plot(self, path, *, title: Optional[str] = None, sigma: Optional[float] = None) -> Path:
        """Write the density (log scale) as a PNG; returns the path."""
        from samkit.sharpness.plotting import plot_spectrum

        return plot_spectrum(self, path, title=title, sigma=sigma)


def slq(
    op: Callable[[Tensor], Tensor], n: int, *, iterations: int, runs: int, generator: torch.Generator, dtype, device
) -> tuple[Tensor, Tensor]:
    """Nodes and weights of ``runs`` Lanczos quadratures of ``iterations`` steps each."""
    nodes, weights = [], []
    for _ in range(runs):
        process = LanczosProcess(op, rademacher(n, generator, dtype=dtype, device=device), max_steps=iterations)
        while not process.exhausted and process.steps < iterations:
            process.step()
        values, vectors, _ = process.ritz()
        nodes.append(values)
        weights.append(vectors[0] ** 2 / runs)
    return torch.cat(nodes), torch.cat(weights)


def hessian_spectrum(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: Any,
    *,
    iterations: int = 80,
    runs: int = 1,
    seed: int = 0,
    train_mode: bool = False,
) -> Spectrum:
    """Stochastic Lanczos quadrature of the Hessian's eigenvalue density (``runs · iterations`` HVPs).

    Args:
        model, loss_fn, data, seed, train_mode: as in ``hessian_eigenvalues``.
        iterations: Lanczos steps per run (nodes per run; capped at the parameter count).
        runs: independent probes; more runs smooth the bulk of the density.

    Returns:
        A ``Spectrum`` (``.nodes``, ``.weights``, ``.density(grid)``, ``.moment(p)``, ``.plot(path)``).
        The model is left exactly as found.

    Example::

        >>> model = torch.nn.Linear(3, 2)
        >>> data = (torch.randn(16, 3), torch.randint(0, 2, (16,)))
        >>> s = hessian_spectrum(model, torch.nn.functional.cross_entropy, data, iterations=5)
        >>> round(float(s.weights.sum()), 6)
        1.0
    """
    check_model_and_loss(model, loss_fn)
    check_int("iterations", iterations, minimum=1)
    check_int("runs", runs, minimum=1)
    check_seed(seed)
    check_bool("train_mode", train_mode)
    with measuring(model, train_mode=train_mode) as seed_forward:
        op = HessianOperator(model, loss_fn, data, seed_forward=seed_forward, seed=seed)
        loss = op.loss()
        nodes, weights = slq(
            op,
            op.n,
            iterations=iterations,
            runs=runs,
            generator=make_generator(seed, op.device),
            dtype=op.dtype,
            device=op.device,
        )
    return Spectrum(nodes=nodes, weights=weights, n=op.n, runs=runs, iterations=iterations, hvps=op.hvps, loss=loss)
