"""hessian_trace (Hutchinson) against the dense Hessian's trace, and the estimator's exactness properties."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from samkit.sharpness import HessianOperator, hessian_trace
from samkit.sharpness.trace import hutchinson
from tests.sharpness.reference import dense_hessian, loss_fn, tiny_data, tiny_mlp, train


@pytest.fixture(scope="module")
def setup():
    model = tiny_mlp()
    x, y = tiny_data()
    train(model, x, y, steps=100)
    return model, (x, y), torch.trace(dense_hessian(model, [(x, y)])).item()


def test_within_five_percent_with_enough_samples(setup):
    model, data, exact = setup
    trace, info = hessian_trace(model, loss_fn, data, samples=400, info=True)
    assert info["hvps"] == 400
    assert abs(trace - exact) <= 0.05 * abs(exact), (trace, exact)
    assert abs(trace - exact) <= 4 * info["std_error"], (trace, exact, info["std_error"])


def test_exact_in_expectation_over_every_rademacher_vector():
    # E[vᵀHv] = tr(H): averaging the estimator over all 2^n sign vectors must give the trace exactly.
    torch.manual_seed(1)
    model = nn.Linear(3, 2).double()  # n = 8 parameters: 256 sign vectors
    x, y = tiny_data(size=12)
    y = y.clamp(max=1)
    exact = torch.trace(dense_hessian(model, [(x, y)])).item()
    op = HessianOperator(model, loss_fn, (x, y))
    signs = (torch.tensor(s, dtype=torch.float64) for s in itertools.product([-1.0, 1.0], repeat=op.n))
    values = hutchinson(op, signs)
    assert values.numel() == 2**op.n
    assert values.mean().item() == pytest.approx(exact, rel=1e-12)
    assert values.std().item() > 1e-3 * abs(exact)  # single probes do vary: the identity is not trivial


class Diagonal(nn.Module):
    """Elementwise model x ⊙ w: with a squared loss its Hessian is diagonal."""

    def __init__(self, n: int):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, n, dtype=torch.float64))

    def forward(self, x):
        return x * self.w


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_rademacher_sample_is_exact_for_a_diagonal_hessian(seed):
    # vᵀDv = Σ d_i v_i² = tr(D) for every sign vector: the estimator has zero variance here.
    model = Diagonal(7)
    x = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    y = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 10))
    mse = nn.functional.mse_loss
    exact = (2 * (x**2).sum(0) / x.numel()).sum().item()  # H_ii = 2 Σ_b x_bi² / (B·n) for the mean loss
    assert torch.trace(dense_hessian(model, [(x, y)], loss=mse)).item() == pytest.approx(exact, rel=1e-12)
    assert hessian_trace(model, mse, (x, y), samples=1, seed=seed) == pytest.approx(exact, rel=1e-12)


def test_seeded(setup):
    model, data, _ = setup
    a = hessian_trace(model, loss_fn, data, samples=5, seed=3)
    b = hessian_trace(model, loss_fn, data, samples=5, seed=3)
    c = hessian_trace(model, loss_fn, data, samples=5, seed=4)
    assert a == b and a != c


def test_one_sample_has_no_standard_error(setup):
    model, data, _ = setup
    _, info = hessian_trace(model, loss_fn, data, samples=1, info=True)
    assert math.isnan(info["std_error"]) and info["hvps"] == 1
