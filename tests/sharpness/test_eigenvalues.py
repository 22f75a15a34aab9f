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


def quadratic_matrix(eigenvalues: list[float]) -> torch.Tensor:
    """Q diag(eigenvalues) Qᵀ with a seeded random orthogonal Q: the spectrum is known by construction."""
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(3)))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def quadratic_loss(eigenvalues: list[float]):
    a = quadratic_matrix(eigenvalues)
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


REPEATED = {
    "lambda1=lambda2": [3.0, 3.0, 2.0, 1.0, 0.5, -0.5, 0.1, 0.2],
    "lambda1=lambda2=lambda3, n=44": [3.0, 3.0, 3.0, 1.0] + [0.01 * i for i in range(40)],
}


@pytest.mark.parametrize("method", ["lanczos", "power"])
@pytest.mark.parametrize("name", sorted(REPEATED))
def test_repeated_top_eigenvalues_are_reported_with_their_multiplicity(method, name):
    # One Krylov sequence meets an eigenspace in one direction only: without the locking check Lanczos
    # reported [3, 2, 1] for [3, 3, 2, ...] and called it converged.
    spectrum = REPEATED[name]
    calls = {"count": 0}
    quadratic = quadratic_loss(spectrum)

    def loss(w, y):
        calls["count"] += 1
        return quadratic(w, y)

    values, info = hessian_eigenvalues(
        Quadratic(len(spectrum)), loss, (torch.zeros(1), torch.zeros(1)), k=3, method=method, max_iter=2000,
        info=True,
    )
    expected = torch.tensor(sorted(spectrum, reverse=True)[:3], dtype=torch.float64)
    assert info.converged
    assert ((values - expected).abs() / expected).max().item() <= 1e-6, values
    a = quadratic_matrix(spectrum)
    for value, vector, residual in zip(values.tolist(), info.eigenvectors, info.residuals):
        true_residual = torch.linalg.vector_norm(a @ vector - value * vector).item()
        assert true_residual == pytest.approx(residual, abs=1e-10)  # the reported residual is the true one
        if method == "lanczos":  # power tests pairs 2..k on the deflated operator (see power_iteration.py)
            assert true_residual <= TOL * abs(value) + 1e-12
    assert abs(info.eigenvectors @ info.eigenvectors.T - torch.eye(3, dtype=torch.float64)).max().item() < 1e-8
    assert calls["count"] == 1 + info.hvps  # L(w) once, then one forward per HVP (a single batch)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_reported_hvps_are_the_hvps_computed(setup, method):
    # Counted independently: every HVP runs one forward pass per batch, after one pass for L(w).
    model, batches, _ = setup
    calls = {"count": 0}

    def counting_loss(out, y):
        calls["count"] += 1
        return loss_fn(out, y)

    _, info = hessian_eigenvalues(model, counting_loss, batches, k=3, tol=TOL, max_iter=3000, method=method, info=True)
    assert info.hvps > 3
    assert calls["count"] == len(batches) * (1 + info.hvps)


def test_a_budget_too_small_for_the_multiplicity_check_is_not_called_converged():
    # λ1 = λ2: with fewer Lanczos steps than the checked answer needs, the result must say it is unchecked
    # (for some budgets the first run alone met tol with [3, 2]: the wrong answer, which must not pass).
    spectrum = REPEATED["lambda1=lambda2"]
    data = (torch.zeros(1), torch.zeros(1))
    values, full = hessian_eigenvalues(Quadratic(len(spectrum)), quadratic_loss(spectrum), data, k=2, info=True)
    assert full.converged and values.tolist() == pytest.approx([3.0, 3.0], rel=1e-6)
    messages = []
    for budget in range(2, full.iterations):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, info = hessian_eigenvalues(
                Quadratic(len(spectrum)), quadratic_loss(spectrum), data, k=2, max_iter=budget, info=True
            )
        assert not info.converged, budget
        messages += [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == full.iterations - 2
    assert any("check for missed repeated eigenvalues did not finish" in m for m in messages)
