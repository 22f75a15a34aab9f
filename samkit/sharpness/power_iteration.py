"""Power iteration with deflation: the baseline that Lanczos is measured against.

What PyHessian does (tol 1e-3, 100 iterations per eigenvalue, largest by |λ|), made to return the k
largest ALGEBRAIC eigenvalues and to stop on the same relative residual test as ``lanczos.py``:

    σ = 0; found = []
    repeat until k found:
        v = random unit vector
        repeat (at most max_iter HVPs):
            w = H v − σ v − Σ_found (λ_j − σ) u_j (u_jᵀ v)      # shifted, deflated operator: one HVP
            θ = vᵀ w;  r = ||w − θ v||
            stop if r ≤ tol · max(|θ + σ|, eps^(2/3) · scale)
            v = w / ||w||
        if θ < 0 and σ = 0:   # the dominant remaining eigenvalue is the most negative one, λ_min:
            σ = θ; search again   # H − λ_min I ⪰ 0, so its dominant eigenvalue is the largest algebraic
        else: found += (θ + σ, v)

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
            w = matvec(v) - shift * v
            hvps += 1
            for value, u in zip(values, vectors):
                w -= (value - shift) * torch.dot(u, v) * u
            theta = torch.dot(v, w).item()
            residual = torch.linalg.vector_norm(w - theta * v).item()
            scale = max([abs(theta + shift), abs(shift)] + [abs(x) for x in values])
            if relative_tolerance_met(torch.tensor(residual), torch.tensor(theta + shift), scale, tol, dtype):
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
