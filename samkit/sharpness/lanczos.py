"""Lanczos with full reorthogonalisation, for the top eigenvalues and for spectral quadrature.

Given a symmetric operator A (here the Hessian, one HVP per step) and a start vector, Lanczos builds an
orthonormal Krylov basis V = [v_1 .. v_m] in which A is tridiagonal, T = Vᵀ A V:

    v_1 = start / ||start||
    for j = 1 .. m:
        w     = A v_j                                  # one HVP
        α_j   = v_jᵀ w
        w    -= V_j (V_jᵀ w); w -= V_j (V_jᵀ w)       # full reorthogonalisation, twice (CGS2)
        β_j   = ||w||;  v_{j+1} = w / β_j
    T = tridiag(β, α, β);  T = S diag(θ) Sᵀ           # solved in float64, whatever the model's dtype
    Ritz pairs (θ_i, V s_i) with residual ||A V s_i − θ_i V s_i|| = |β_m S[m, i]|

Full reorthogonalisation keeps V orthonormal to working precision, so no spurious copies of converged
eigenvalues appear (the classic failure of plain Lanczos) and the residual estimates are trustworthy.
It costs m stored vectors of length n. When β_j vanishes (the Krylov space is invariant), the process
restarts with a random vector orthogonal to V if a generator is given (so that k up to n eigenvalues
can be found), otherwise it stops: SLQ wants the quadrature of its own start vector only.

The top-k driver stops as soon as the k largest Ritz values all satisfy the relative residual test

    ||A u_i − θ_i u_i|| ≤ tol · max(|θ_i|, eps^(2/3) · max_j |θ_j|)

(ARPACK's criterion), which guarantees each θ_i lies within tol·|θ_i| of an eigenvalue of A. Power
iteration (``power_iteration.py``) uses the same test on its iterate, so HVP counts compare directly.

That test cannot see an eigenvalue the Krylov space has not reached. A single start vector meets each
eigenspace in one direction only, so a repeated eigenvalue (λ1 = λ2) appears once and the next Ritz value
(λ3) passes the test in its place. For k ≥ 2 the driver therefore checks its answer by locking:

    U = the k converged Ritz vectors (rows), Θ their values
    repeat:
        μ, u = top Ritz pair of a new Lanczos run kept orthogonal to U     (A on the complement of U)
        if μ ≤ θ_k (within tol): done                                      (nothing above θ_k was missed)
        lock u as well (U += u), Θ = the k largest of Θ ∪ {μ}
    for each pair found by a check run: one more HVP for its true residual ||A u − μ u||

The check costs about one more top-1 run; its steps count towards ``max_iter`` (the residual HVPs of
found pairs come on top). It is skipped when the first run spans R^n (then T holds every eigenvalue with
its multiplicity). Power iteration with deflation finds repeated eigenvalues by construction.

References: C. Lanczos 1950; G. H. Golub and C. F. Van Loan, Matrix Computations, ch. 10;
Ghorbani, Krishnan and Xiao, "An investigation into neural net optimization via Hessian eigenvalue
density", ICML 2019 (Lanczos and SLQ for neural network Hessians).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from samkit.sharpness.probes import gaussian

Matvec = Callable[[Tensor], Tensor]


def relative_tolerance_met(residuals: Tensor, values: Tensor, scale: float, tol: float, dtype) -> bool:
    """The shared stopping rule of Lanczos and power iteration (see the module docstring)."""
    floor = torch.finfo(dtype).eps ** (2 / 3) * scale
    return bool((residuals <= tol * torch.clamp(values.abs(), min=floor)).all())


@dataclass
class EigenResult:
    """k largest eigenvalues (descending, float64 CPU), their vectors (rows, in the operator's dtype),
    the HVPs spent, the iterations run, whether the tolerance was met, and the final residual norms."""

    eigenvalues: Tensor
    eigenvectors: Tensor
    hvps: int
    iterations: int
    converged: bool
    residuals: list = field(default_factory=list)


class LanczosProcess:
    """The Lanczos recurrence of the module docstring, one ``step()`` (one HVP) at a time."""

    def __init__(
        self,
        matvec: Matvec,
        start: Tensor,
        *,
        max_steps: int,
        generator: Optional[torch.Generator] = None,
        locked: Optional[Tensor] = None,
    ):
        # locked: orthonormal rows the basis is kept orthogonal to (the process then works on A restricted
        # to their complement, P A P with P = I − UᵀU).
        self.locked = locked if locked is not None and locked.shape[0] > 0 else None
        self.n = start.numel()
        if self.locked is not None:
            start = self._deflate(start)
        norm = torch.linalg.vector_norm(start)
        if not norm > 0:
            raise ValueError("the Lanczos start vector must be nonzero")
        self.matvec = matvec
        self.capacity = min(max_steps, self.n - (0 if self.locked is None else self.locked.shape[0]))
        # The basis grows by doubling: a run that converges early never holds max_steps vectors of length n.
        self.basis = start.new_zeros(min(self.capacity, 16), self.n)
        self.basis[0] = start / norm
        self.generator = generator
        self.alphas: list[float] = []
        self.off_diagonal: list[float] = []  # T's sub-diagonal: β_j, or 0 where the process restarted
        self.block_ends: list[tuple[int, float]] = []  # (row, β) where a Krylov block ended
        self.last_beta = 0.0
        self.exhausted = False
        self.hvps = 0

    @property
    def steps(self) -> int:
        return len(self.alphas)

    def _set_row(self, row: int, vector: Tensor) -> None:
        if row >= self.basis.shape[0]:
            grown = self.basis.new_zeros(min(self.capacity, 2 * self.basis.shape[0]), self.n)
            grown[: self.basis.shape[0]] = self.basis
            self.basis = grown
        self.basis[row] = vector

    def _deflate(self, w: Tensor) -> Tensor:
        locked = self.locked
        assert locked is not None, "_deflate is only called with locked rows"
        for _ in range(2):
            w = w - locked.T @ (locked @ w)
        return w

    def _orthogonalize(self, w: Tensor, rows: int) -> Tensor:
        basis = self.basis[:rows]
        for _ in range(2):
            if self.locked is not None:
                w = w - self.locked.T @ (self.locked @ w)
            w = w - basis.T @ (basis @ w)
        return w

    def step(self) -> None:
        if self.exhausted:
            raise RuntimeError("the Lanczos process is exhausted (its basis is full or the space is invariant)")
        j = self.steps
        w = self.matvec(self.basis[j])
        self.hvps += 1
        alpha_tensor = torch.dot(w, self.basis[j])
        w_norm_tensor = torch.linalg.vector_norm(w)
        w = self._orthogonalize(w, j + 1)
        beta_tensor = torch.linalg.vector_norm(w)
        # read back together: one device synchronisation per step
        alpha, beta, w_norm = alpha_tensor.item(), beta_tensor.item(), w_norm_tensor.item()
        if not (abs(alpha) < float("inf") and beta < float("inf")):
            raise ValueError(
                f"a Hessian-vector product is not finite (alpha={alpha}, beta={beta}); the loss or its "
                "curvature overflows at these weights"
            )
        self.alphas.append(alpha)
        self.last_beta = beta
        if j + 1 == self.capacity:
            self.block_ends.append((j, beta))
            self.exhausted = True
            return
        # Below sqrt(eps)·||A v_j|| the remainder of w is rounding noise: the Krylov space is invariant.
        if beta <= torch.finfo(w.dtype).eps ** 0.5 * w_norm:
            self.block_ends.append((j, beta))
            if self.generator is None:
                self.exhausted = True
                return
            w = self._orthogonalize(gaussian(self.n, self.generator, dtype=w.dtype, device=w.device), j + 1)
            beta = 0.0
            self._set_row(j + 1, w / torch.linalg.vector_norm(w))
        else:
            self._set_row(j + 1, w / beta)
        self.off_diagonal.append(beta)

    def tridiagonal(self) -> Tensor:
        """T (m × m, float64, CPU)."""
        m = self.steps
        t = torch.diag(torch.tensor(self.alphas, dtype=torch.float64))
        if m > 1:
            off = torch.tensor(self.off_diagonal[: m - 1], dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        return t

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values (ascending), the eigenvectors S of T (columns), and each pair's residual norm."""
        values, vectors = torch.linalg.eigh(self.tridiagonal())
        ends = self.block_ends if self.exhausted else self.block_ends + [(self.steps - 1, self.last_beta)]
        residuals = torch.zeros_like(values)
        for row, beta in ends:
            residuals += (beta * vectors[row]) ** 2
        return values, vectors, residuals.sqrt()


def _top_pairs(
    matvec: Matvec,
    start: Tensor,
    k: int,
    *,
    tol: float,
    max_steps: int,
    generator: torch.Generator,
    dtype: torch.dtype,
    scale: float = 0.0,
    locked: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, bool, LanczosProcess]:
    """One Lanczos run until its k largest Ritz pairs pass the residual test, or it is exhausted.

    Returns the values (descending, float64 CPU), the Ritz vectors (rows), their residual norms, whether
    the test passed, and the process (for its HVP and step counts).
    """
    process = LanczosProcess(matvec, start, max_steps=max_steps, generator=generator, locked=locked)
    while True:
        process.step()
        if process.steps < k and not process.exhausted:
            continue
        values, vectors, residuals = process.ritz()
        top = torch.arange(values.numel() - 1, values.numel() - 1 - k, -1)
        floor_scale = max(values.abs().max().item(), scale)
        converged = relative_tolerance_met(residuals[top], values[top], floor_scale, tol, dtype)
        if converged or process.exhausted:
            break
    basis = process.basis[: process.steps]
    ritz_vectors = vectors[:, top].T.to(dtype=basis.dtype, device=basis.device) @ basis
    return values[top].clone(), ritz_vectors, residuals[top].clone(), converged, process


def lanczos_eigenpairs(
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
    """The k largest (algebraic) eigenpairs of a symmetric operator on R^n, by Lanczos.

    Stops when all k pass the relative residual test and (for k ≥ 2) a check run on the complement of
    their vectors finds nothing above the k-th (see the module docstring), when ``max_iter`` HVPs are
    spent, or when the basis spans R^n (then the result is exact).
    """
    values, vectors, residuals, converged, process = _top_pairs(
        matvec, gaussian(n, generator, dtype=dtype, device=device), k,
        tol=tol, max_steps=max_iter, generator=generator, dtype=dtype,
    )
    hvps = steps = process.hvps
    scale = values.abs().max().item()
    spans_everything = process.exhausted and process.steps == n
    # Every pair found so far (k from the first run, then one per check run that found a missed one).
    found_values, found_vectors, found_residuals = values, vectors, residuals
    from_check = torch.zeros(k, dtype=torch.bool)
    while k >= 2 and converged and not spans_everything and found_vectors.shape[0] < n:
        if hvps >= max_iter:
            converged = False  # no HVP left to check that no eigenvalue above the k-th was missed
            break
        mu, u, r, check_converged, check = _top_pairs(
            matvec, gaussian(n, generator, dtype=dtype, device=device), 1,
            tol=tol, max_steps=max_iter - hvps, generator=generator, dtype=dtype, scale=scale, locked=found_vectors,
        )
        hvps += check.hvps
        steps += check.hvps
        if not check_converged:
            converged = False  # μ is only a lower bound until it converges: nothing is proved either way
            break
        kth = values[-1].item()
        if mu[0].item() <= kth + tol * max(abs(kth), torch.finfo(dtype).eps ** (2 / 3) * scale):
            break
        found_values = torch.cat([found_values, mu])
        found_vectors = torch.cat([found_vectors, u])
        found_residuals = torch.cat([found_residuals, r])
        from_check = torch.cat([from_check, torch.ones(1, dtype=torch.bool)])
        order = torch.argsort(found_values, descending=True)[:k]
        values, vectors, residuals = found_values[order], found_vectors[order], found_residuals[order]
    if bool(from_check.any()):
        # A check run's residual is that of A on the complement of U: measure the true one (one HVP each).
        order = torch.argsort(found_values, descending=True)[:k]
        residuals = residuals.clone()
        for i, index in enumerate(order.tolist()):
            if from_check[index]:
                u = found_vectors[index]
                residuals[i] = torch.linalg.vector_norm(matvec(u) - found_values[index].item() * u).item()
                hvps += 1
        converged = converged and relative_tolerance_met(residuals, values, scale, tol, dtype)
    return EigenResult(
        eigenvalues=values.clone(),
        eigenvectors=vectors,
        hvps=hvps,
        iterations=steps,
        converged=converged,
        residuals=residuals.tolist(),
    )
