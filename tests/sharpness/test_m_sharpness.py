"""m_sharpness: exact values on an isotropic quadratic, parity with a plain loop, SAM's ε̂, and its properties."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samkit import SAM
from samkit.sharpness import m_sharpness
from tests.sharpness.reference import flat_weights, loss_at, loss_fn, tiny_data, tiny_mlp, train

RHO = 0.05


def squared_loss(out, y):
    return F.mse_loss(out.squeeze(-1), y)


def isotropic_problem(m: int = 6, d: int = 4, micro_batches: int = 3):
    """Linear regression whose every micro-batch of size m has Hessian exactly 2·I (X_jᵀX_j = m·I)."""
    g = torch.Generator().manual_seed(0)
    blocks = [torch.linalg.qr(torch.randn(m, d, generator=g, dtype=torch.float64))[0] * m**0.5
              for _ in range(micro_batches)]
    x = torch.cat(blocks)
    y = torch.randn(m * micro_batches, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
    return model, x, y, m


def micro_gradients(model, x, y, m):
    w = model.weight.detach().reshape(-1)
    return [2 / m * x[j : j + m].T @ (x[j : j + m] @ w - y[j : j + m]) for j in range(0, len(x), m)]


@pytest.mark.parametrize("steps", [1, 4])
def test_worst_case_on_an_isotropic_quadratic(steps):
    # L_j(w + ε) − L_j(w) = g_jᵀε + ||ε||², maximised on the ball by ε = ρ g_j/||g_j||: ρ||g_j|| + ρ².
    model, x, y, m = isotropic_problem()
    expected = sum(RHO * g.norm().item() + RHO**2 for g in micro_gradients(model, x, y, m)) / 3
    value = m_sharpness(model, squared_loss, (x, y), rho=RHO, micro_batch_size=m, steps=steps)
    assert value == pytest.approx(expected, rel=1e-12)


def test_average_case_on_an_isotropic_quadratic_is_exactly_rho_squared():
    # Antithetic pairs cancel gᵀε: (L(w+ε) + L(w−ε))/2 − L(w) = ||ε||² = ρ² for every ε on the sphere.
    model, x, y, m = isotropic_problem()
    value = m_sharpness(model, squared_loss, (x, y), rho=RHO, micro_batch_size=m, kind="average", samples=3)
    assert value == pytest.approx(RHO**2, rel=1e-9)


def test_adaptive_on_an_isotropic_quadratic():
    # ASAM's ball: ε = T δ, ||δ|| ≤ ρ, T = |w| + η. One step: ε = ρ T²g/||Tg||, rise ρ||Tg|| + ||ε||².
    model, x, y, m = isotropic_problem()
    eta = 0.1
    t = model.weight.detach().reshape(-1).abs() + eta
    expected = 0.0
    for g in micro_gradients(model, x, y, m):
        eps = RHO * t**2 * g / (t * g).norm()
        expected += (RHO * (t * g).norm() + eps @ eps).item() / 3
    value = m_sharpness(model, squared_loss, (x, y), rho=RHO, micro_batch_size=m, adaptive=True, eta=eta, steps=1)
    assert value == pytest.approx(expected, rel=1e-12)
    average = m_sharpness(model, squared_loss, (x, y), rho=RHO, micro_batch_size=m, kind="average",
                          adaptive=True, eta=eta, samples=4)
    # ||ε||² = ρ² uᵀT²u for a unit u: between ρ² min T² and ρ² max T².
    assert RHO**2 * (t**2).min().item() <= average <= RHO**2 * (t**2).max().item()


def reference_worst(model, x, y, m, rho, steps, scale=None):
    """The projected ascent written out on a flat weight vector, one micro-batch at a time."""
    w0 = flat_weights(model)
    scale = torch.ones_like(w0) if scale is None else scale
    values = []
    for start in range(0, len(x) - m + 1, m):
        batch = [(x[start : start + m], y[start : start + m])]
        base = loss_at(model, w0, batch).item()
        delta, best = torch.zeros_like(w0), 0.0
        for _ in range(steps):
            w = (w0 + scale * delta).requires_grad_()
            loss = loss_at(model, w, batch)
            best = max(best, loss.item() - base)
            g = scale * torch.autograd.grad(loss, w)[0]
            delta = delta + rho * g / g.norm()
            if delta.norm() > rho:
                delta = delta * rho / delta.norm()
        values.append(max(best, loss_at(model, w0 + scale * delta, batch).item() - base))
    return sum(values) / len(values)


@pytest.mark.parametrize("adaptive", [False, True])
def test_matches_the_plain_loop_on_an_mlp(adaptive):
    model = tiny_mlp()
    x, y = tiny_data(size=26)  # 26 = 3 micro-batches of 8, and 2 examples left out
    scale = flat_weights(model).abs() if adaptive else None
    expected = reference_worst(model, x, y, 8, rho=0.1, steps=3, scale=scale)
    value, info = m_sharpness(model, loss_fn, (x, y), rho=0.1, micro_batch_size=8, steps=3, adaptive=adaptive,
                              info=True)
    assert value == pytest.approx(expected, rel=1e-10)
    assert info["micro_batches"] == 3 and info["left_out_examples"] == 2
    assert info["gradient_evaluations"] == 9 and info["forward_passes"] == 12


@pytest.mark.parametrize("adaptive,eta", [(False, 0.0), (True, 0.0), (True, 0.01)])
def test_one_step_on_one_micro_batch_is_sams_perturbation(adaptive, eta):
    # SAM's first_step computes ε̂ by samkit.optim.perturbation (ASAM's T = |w| + eta when adaptive): the rise
    # L(w + ε̂) − L(w) after one ascent step of m_sharpness must agree with it.
    model = tiny_mlp()
    x, y = tiny_data()
    value = m_sharpness(model, loss_fn, (x, y), rho=RHO, micro_batch_size=len(x), steps=1, adaptive=adaptive, eta=eta)
    perturbed = copy.deepcopy(model)
    sam = SAM(perturbed.parameters(), torch.optim.SGD, rho=RHO, adaptive=adaptive, eta=eta, lr=0.1)
    base = loss_fn(perturbed(x), y)
    base.backward()
    sam.first_step(zero_grad=True)
    with torch.no_grad():
        expected = (loss_fn(perturbed(x), y) - base).item()
    assert expected > 0
    assert value == pytest.approx(expected, rel=1e-9)


def test_worst_at_least_average_at_least_zero_on_a_trained_model():
    model = tiny_mlp()
    x, y = tiny_data(size=48)
    train(model, x, y, steps=300)
    for m in (4, 16):
        worst = m_sharpness(model, loss_fn, (x, y), micro_batch_size=m, kind="worst")
        average = m_sharpness(model, loss_fn, (x, y), micro_batch_size=m, kind="average", samples=10)
        assert worst >= average >= 0, (m, worst, average)
        assert worst > 0


def test_smaller_micro_batches_are_sharper_on_a_trained_model():
    # Foret et al.'s point: m-sharpness grows as m shrinks (per-example gradients do not cancel).
    model = tiny_mlp()
    x, y = tiny_data(size=48)
    train(model, x, y, steps=300)
    values = [m_sharpness(model, loss_fn, (x, y), micro_batch_size=m) for m in (2, 8, 48)]
    assert values[0] > values[1] > values[2], values


def test_micro_batches_never_cross_batches():
    model = tiny_mlp()
    x, y = tiny_data(size=24)
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]  # 10 and 14 examples: micro-batches of 4 -> 2 + 3
    _, info = m_sharpness(model, loss_fn, batches, micro_batch_size=4, info=True)
    assert info["micro_batches"] == 5 and info["left_out_examples"] == 4
    with pytest.raises(ValueError, match="micro_batch_size=16 is larger than every batch.*14"):
        m_sharpness(model, loss_fn, batches, micro_batch_size=16)


def test_average_case_is_seeded():
    # The random ε come from a private generator seeded with `seed`: same seed, same value; another, another.
    model = tiny_mlp()
    x, y = tiny_data(size=24)
    a = m_sharpness(model, loss_fn, (x, y), micro_batch_size=8, kind="average", samples=2, seed=3)
    b = m_sharpness(model, loss_fn, (x, y), micro_batch_size=8, kind="average", samples=2, seed=3)
    c = m_sharpness(model, loss_fn, (x, y), micro_batch_size=8, kind="average", samples=2, seed=4)
    assert a == b and a != c
