"""Power iteration with deflation: the baseline that Lanczos is measured against.

What PyHessian does (tol 1e-3, 100 iterations per eigenvalue, largest by |λ|), made to return the k
largest ALGEBRAIC eigenvalues and to stop on the same relative residual test as ``lanczos.py``:

    σ = 0; found = []
    repeat until k found:
        v = random unit vector
        repeat (at most max_iter HVPs):
            v = v − Σ_found u_j (u_jᵀ v);  v /= ||v||          # kept orthogonal to the found (as PyHessian)
            w = H v − σ v                                        # shifted operator: one HVP
            θ = vᵀ w;  r = ||(I − Σ_found u_j u_jᵀ)(w − θ v)||     # the deflated operator's residual
            stop if r ≤ tol · max(|θ + σ|, eps^(2/3) · scale)
            v = w / ||w||
        if θ < 0 and σ = 0:   # the dominant remaining eigenvalue is the most negative one, λ_min:
            σ = θ; search again   # H − λ_min I ⪰ 0, so its dominant eigenvalue is the largest algebraic
        else: found += (θ + σ, v)

The stopping test is on the residual with its components along the found u_j removed (that of the
deflated operator, as in PyHessian): the true residual ||H v − (θ + σ) v|| of a later pair also holds
the couplings u_jᵀ H v = r_jᵀ v, as large as the earlier pairs' own residuals, which no iteration on v
can reduce. The eigenvalue error from them is second order (tested to 1e-6 against exact spectra);
``residuals`` reports the TRUE residual, so it can exceed tol·|λ_i| for i ≥ 2.

``max_iter`` bounds the HVPs spent on EACH eigenvalue (PyHessian's meaning), so up to
(k + 1) · max_iter HVPs in all; Lanczos' ``max_iter`` bounds the total. The convergence rate is
(λ_{i+1} / λ_i) per HVP, which is why Lanczos, whose rate depends on the gap relative to the whole
spectrum, needs far fewer HVPs at the same tolerance (tested, and measured in the benchmarks).

Reference: Yao, Gholami, Keutzer and Mahoney, "PyHessian: neural networks through the lens of the
Hessian", IEEE BigData 2020 (power iteration with deflation for the top-k Hessian eigenvalues).
"""

from __future__ import annotations

import torch
from torch import Tensor

from samkit.sharpness.lanczos import EigenResult, Matvec, relative_tolerance_met
from samkit.sharpness.probes import unit_gaussian


def _orthogonal_to(v: Tensor, vectors: list[Tensor]) -> Tensor:
    """``v`` with its components along ``vectors`` (orthonormal) removed, twice, then normalized."""
    basis = torch.stack(vectors)
    for _ in range(2):
        v = v - basis.T @ (basis @ v)
    return v / torch.linalg.vector_norm(v)


def power_eigenpairs(
    matvec: Matvec,
    n: int,
    k: int,
    *,
    tol: float,
    max_iter: int,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
) -> EigenResult:
    """The k largest (algebraic) eigenpairs of a symmetric operator on R^n, by deflated power iteration."""
    values: list[float] = []
    vectors: list[Tensor] = []
    residuals: list[float] = []
    shift = 0.0
    hvps = 0
    all_converged = True
    while len(values) < k:
        v = unit_gaussian(n, generator, dtype=dtype, device=device)
        theta, residual, converged = 0.0, float("inf"), False
        for _ in range(max_iter):
            if vectors:
                v = _orthogonal_to(v, vectors)
            w = matvec(v) - shift * v  # v ⊥ every found u_j, so the deflation term (λ_j − σ) u_j (u_jᵀ v) is 0
            hvps += 1
            theta = torch.dot(v, w).item()
            full = w - theta * v  # H v − (θ + σ) v: the true residual
            residual = torch.linalg.vector_norm(full).item()
            deflated = full if not vectors else full - torch.stack(vectors).T @ (torch.stack(vectors) @ full)
            scale = max([abs(theta + shift), abs(shift)] + [abs(x) for x in values])
            deflated_norm = torch.linalg.vector_norm(deflated)
            if relative_tolerance_met(deflated_norm.cpu(), torch.tensor(theta + shift), scale, tol, dtype):
                converged = True
                break
            norm = torch.linalg.vector_norm(w)
            if not torch.isfinite(norm):
                raise ValueError("a Hessian-vector product is not finite; the loss curvature overflows")
            v = w / norm
        if theta < 0 and shift == 0.0 and converged:
            shift = theta
            continue
        all_converged = all_converged and converged
        values.append(theta + shift)
        vectors.append(v)
        residuals.append(residual)
    order = sorted(range(k), key=lambda i: -values[i])
    return EigenResult(
        eigenvalues=torch.tensor([values[i] for i in order], dtype=torch.float64),
        eigenvectors=torch.stack([vectors[i] for i in order]),
        hvps=hvps,
        iterations=hvps,
        converged=all_converged,
        residuals=[residuals[i] for i in order],
    )
