"""The Lanczos basis stays orthonormal where one Gram-Schmidt pass per step would not.

A spectrum spread over twelve decades makes the Krylov space nearly invariant after each converged
eigenvalue: A v_j is then almost inside span(V), so subtracting V (Vᵀ A v_j) once cancels almost all of it
and leaves the rounding error of that subtraction as a large part of the remainder. A single classical
Gram-Schmidt pass lets that error through, so V loses orthogonality completely (|VᵀV − I| reaches 1: a
basis vector comes back) and T grows spurious copies of eigenvalues. The second pass (CGS2) removes it.
Run for n steps, T = Vᵀ A V holds A's whole spectrum, checked against a dense float64 eigvalsh.

Measured on this n = 40 matrix: one pass leaves |VᵀV − I| = 1.0 in both dtypes and Ritz errors of 1.6e-10
(float64) and 8.7e-3 (float32); two passes leave 3e-16 / 1.4e-7 and 2e-16 / 3.5e-8.
"""

from __future__ import annotations

import pytest
import torch

from samkit.sharpness.lanczos import LanczosProcess

N = 40
SPECTRUM = [10.0 ** (-12 * i / (N - 1)) for i in range(N)]  # 1 down to 1e-12, geometric

# dtype: (bound on |VᵀV − I|, bound on |θ_i − λ_i|): about 100 ulps of the dtype at ||A|| = 1
TOLERANCES = {torch.float64: (1e-13, 1e-13), torch.float32: (1e-5, 1e-6)}


def matrix_with_spectrum(eigenvalues: list[float], seed: int = 3) -> torch.Tensor:
    """Q diag(eigenvalues) Qᵀ in float64 with a seeded random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), dtype=torch.float64, generator=g))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_basis_stays_orthonormal_over_a_spectrum_of_twelve_decades(dtype):
    a = matrix_with_spectrum(SPECTRUM).to(dtype)
    start = torch.randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(dtype)
    process = LanczosProcess(lambda v: a @ v, start, max_steps=N)
    while not process.exhausted:
        process.step()
    assert process.steps == N  # no early stop: every step's remainder was judged non-negligible

    orthogonality_tol, value_tol = TOLERANCES[dtype]
    basis = process.basis[:N].double()
    loss = (basis @ basis.T - torch.eye(N, dtype=torch.float64)).abs().max().item()
    assert loss <= orthogonality_tol, f"|VᵀV − I| = {loss:.3g} > {orthogonality_tol:g}"

    # A's own spectrum (of the matrix as stored in dtype), by a dense float64 solver
    reference = torch.linalg.eigvalsh(a.double())
    ritz = torch.linalg.eigvalsh(process.tridiagonal())
    error = (ritz - reference).abs().max().item()
    assert error <= value_tol, f"max |θ_i − λ_i| = {error:.3g} > {value_tol:g}"
