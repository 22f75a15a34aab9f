"""hessian_eigenvalues against the dense Hessian of a tiny float64 MLP (torch.autograd.functional.hessian)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from samkit.sharpness import hessian_eigenvalues
from tests.sharpness.reference import dense_hessian, loss_fn, tiny_data, tiny_mlp, train

# The same stopping rule for both methods: relative residual ≤ tol, so relative eigenvalue error ≤ tol.
TOL = 1e-6


@pytest.fixture(scope="module")
def setup():
    model = tiny_mlp()
    x, y = tiny_data()
    train(model, x, y, steps=100)
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]  # unequal sizes: the mean is over examples
    exact = torch.linalg.eigvalsh(dense_hessian(model, batches)).flip(0)
    return model, batches, exact


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_top3_match_dense_hessian(setup, method):
    model, batches, exact = setup
    values, info = hessian_eigenvalues(
        model, loss_fn, batches, k=3, tol=TOL, max_iter=3000, method=method, info=True
    )
    assert values.dtype == torch.float64 and values.shape == (3,)
    assert info.converged
    relative = ((values - exact[:3]).abs() / exact[:3].abs()).max().item()
    assert relative <= 1e-6, relative
    assert torch.all(values[:-1] >= values[1:]), "not descending"


def test_eigenvectors_and_residuals_are_true(setup):
    model, batches, _ = setup
    hessian = dense_hessian(model, batches)
    values, info = hessian_eigenvalues(model, loss_fn, batches, k=3, tol=TOL, info=True)
    for value, vector, residual in zip(values, info.eigenvectors, info.residuals):
        true_residual = torch.linalg.vector_norm(hessian @ vector - value * vector).item()
        assert abs(torch.linalg.vector_norm(vector).item() - 1) < 1e-10
        assert true_residual <= TOL * abs(value.item()) + 1e-12
        assert true_residual == pytest.approx(residual, abs=1e-10)  # the Lanczos estimate is the true residual


@pytest.mark.parametrize("k", [1, 3])
def test_lanczos_needs_fewer_hvps_than_power_at_the_same_tolerance(setup, k):
    model, batches, _ = setup
    _, lanczos = hessian_eigenvalues(model, loss_fn, batches, k=k, tol=TOL, max_iter=3000, info=True)
    _, power = hessian_eigenvalues(model, loss_fn, batches, k=k, tol=TOL, max_iter=3000, method="power", info=True)
    assert lanczos.converged and power.converged
    assert lanczos.hvps == lanczos.iterations and power.hvps == power.iterations
    assert lanczos.hvps < power.hvps, (lanczos.hvps, power.hvps)


def test_full_spectrum_with_k_equal_to_the_parameter_count(setup):
    # The 31-dimensional Hessian has repeated zero eigenvalues (softmax shift invariance): Lanczos must
    # restart in the invariant subspaces to find all of them.
    model, batches, exact = setup
    values = hessian_eigenvalues(model, loss_fn, batches, k=exact.numel(), tol=TOL)
    assert (values - exact).abs().max().item() <= 1e-10


class Quadratic(nn.Module):
    """L(w) = ½ wᵀ A w through a model whose output is its own weight vector."""

    def __init__(self, n: int):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1, 1, n, dtype=torch.float64))

    def forward(self, x):
        return self.w


def quadratic_loss(eigenvalues: list[float]):
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(3)))
    a = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    return lambda w, _: 0.5 * w @ a @ w


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_largest_algebraic_not_largest_magnitude(method):
    # A saddle: the dominant eigenvalue by magnitude (-10) must not be reported as "largest".
    spectrum = [-10.0, 3.0, 2.0, 1.0, 0.5, -0.5]
    model = Quadratic(len(spectrum))
    values = hessian_eigenvalues(
        model, quadratic_loss(spectrum), (torch.zeros(1), torch.zeros(1)), k=3, method=method, max_iter=2000
    )
    expected = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    assert ((values - expected).abs() / expected).max().item() <= 1e-6, values


def test_float32_model_uses_float64_tridiagonal(setup):
    model64, batches64, exact = setup
    model = tiny_mlp().float()
    model.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    batches = [(x.float(), y) for x, y in batches64]
    values, info = hessian_eigenvalues(model, loss_fn, batches, k=3, tol=1e-5, info=True)
    assert info.eigenvectors.dtype == torch.float32
    relative = ((values - exact[:3]).abs() / exact[:3]).max().item()
    assert relative <= 1e-4, relative  # float32 HVPs carry ~1e-6 relative rounding


def test_data_forms_agree(setup):
    model, batches, _ = setup
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    one = hessian_eigenvalues(model, loss_fn, (x, y), k=2)
    listed = hessian_eigenvalues(model, loss_fn, batches, k=2)
    generated = hessian_eigenvalues(model, loss_fn, (b for b in batches), k=2)  # a one-shot iterator
    assert ((listed - one).abs() / one.abs()).max().item() <= 1e-10
    assert torch.equal(generated, listed)


def test_seeded_and_reproducible(setup):
    model, batches, _ = setup
    a = hessian_eigenvalues(model, loss_fn, batches, k=2, tol=1e-3, seed=5, info=True)
    b = hessian_eigenvalues(model, loss_fn, batches, k=2, tol=1e-3, seed=5, info=True)
    c = hessian_eigenvalues(model, loss_fn, batches, k=2, tol=1e-3, seed=6, info=True)
    assert torch.equal(a[0], b[0]) and a[1].hvps == b[1].hvps
    assert not torch.equal(a[1].eigenvectors, c[1].eigenvectors)  # another start vector


def test_max_iter_reached_warns_and_says_so(setup):
    model, batches, _ = setup
    with pytest.warns(RuntimeWarning, match="raise max_iter or tol"):
        _, info = hessian_eigenvalues(model, loss_fn, batches, k=3, tol=1e-12, max_iter=4, info=True)
    assert not info.converged and info.hvps == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hessian_eigenvalues(model, loss_fn, batches, k=1, tol=1e-4)
