"""Every measurement leaves the model exactly as found, evaluates in eval mode unless asked, and never moves
the caller's global RNG stream."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from samkit.sharpness import (
    HessianOperator,
    flatness_report,
    hessian_eigenvalues,
    hessian_spectrum,
    hessian_trace,
    loss_landscape,
    m_sharpness,
)
from samkit.sharpness.model_state import measuring
from tests.sharpness.reference import Snapshot, loss_fn

CALLS = {
    "eigenvalues": lambda m, d, **kw: hessian_eigenvalues(m, loss_fn, d, k=2, tol=1e-3, **kw),
    "power": lambda m, d, **kw: hessian_eigenvalues(m, loss_fn, d, k=2, tol=1e-3, method="power", **kw),
    "trace": lambda m, d, **kw: hessian_trace(m, loss_fn, d, samples=3, **kw),
    "spectrum": lambda m, d, **kw: hessian_spectrum(m, loss_fn, d, iterations=4, **kw),
    "m_sharpness_worst": lambda m, d, **kw: m_sharpness(m, loss_fn, d, micro_batch_size=4, steps=2, **kw),
    "m_sharpness_average": lambda m, d, **kw: m_sharpness(m, loss_fn, d, micro_batch_size=4, kind="average",
                                                          adaptive=True, **kw),
    "landscape": lambda m, d, **kw: loss_landscape(m, loss_fn, d, dims=2, steps=3, **kw),
    "report": lambda m, d, **kw: flatness_report(m, loss_fn, d, k=2, micro_batch_size=4, trace_samples=2, **kw),
}


def awkward_model(dtype=torch.float64) -> nn.Module:
    """BN + dropout, a frozen layer, .grad set on some parameters only, modules in mixed modes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.3), nn.Linear(5, 3)).to(dtype)
    model[0].weight.requires_grad_(False)
    model[4].weight.grad = torch.full_like(model[4].weight, 0.25)
    model[1].bias.grad = torch.ones_like(model[1].bias)
    model.train()
    model[3].eval()  # a user's own choice of modes, to be restored module by module
    with torch.no_grad():
        model[1].running_mean.fill_(0.1)
        model[1].running_var.fill_(2.0)
    return model


def awkward_data(dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    return torch.randn(12, 3, generator=g, dtype=dtype), torch.randint(0, 3, (12,), generator=g)


@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.parametrize("train_mode", [False, True])
def test_model_and_global_rng_unchanged(name, train_mode):
    model = awkward_model()
    data = awkward_data()
    torch.manual_seed(123)
    snapshot = Snapshot(model)
    CALLS[name](model, data, train_mode=train_mode)
    snapshot.assert_unchanged(model)


@pytest.mark.parametrize("name", ["m_sharpness_worst", "landscape"])
def test_float32_weights_restored_bit_exactly(name):
    # These two move the weights; restoring by subtraction would be off by rounding in float32.
    model = awkward_model(torch.float32)
    snapshot = Snapshot(model)
    CALLS[name](model, awkward_data(torch.float32))
    snapshot.assert_unchanged(model)


def test_model_restored_when_the_measurement_fails_half_way():
    model = awkward_model()
    snapshot = Snapshot(model)
    calls = {"count": 0}

    def failing_loss(out, y):
        calls["count"] += 1
        if calls["count"] > 5:
            raise KeyboardInterrupt  # the user gives up in the middle of the grid
        return loss_fn(out, y)

    with pytest.raises(KeyboardInterrupt):
        loss_landscape(model, failing_loss, awkward_data(), dims=2, steps=5)
    snapshot.assert_unchanged(model)


def test_eval_mode_unless_asked():
    data = awkward_data()
    in_train, in_eval = awkward_model(), awkward_model().eval()
    # Default: eval mode, whatever mode the model was in (BN running statistics, no dropout).
    assert hessian_trace(in_train, loss_fn, data, samples=4) == hessian_trace(in_eval, loss_fn, data, samples=4)
    with torch.no_grad():
        eval_loss = loss_fn(copy.deepcopy(in_train).eval()(data[0]), data[1]).item()
    assert loss_landscape(in_train, loss_fn, data, dims=1, steps=3).center_loss == eval_loss
    # train_mode=True: batch statistics, so the loss at w is the train-mode loss (dropout off to compare).
    no_dropout = awkward_model()
    no_dropout[3].p = 0.0
    with torch.no_grad():
        train_loss = loss_fn(copy.deepcopy(no_dropout).train()(data[0]), data[1]).item()
    center = loss_landscape(no_dropout, loss_fn, data, dims=1, steps=3, train_mode=True).center_loss
    assert center == pytest.approx(train_loss, rel=1e-14) and abs(train_loss - eval_loss) > 1e-3


def test_train_mode_dropout_mask_is_fixed_across_hvps():
    # The Hessian of a loss with a fresh dropout mask per pass is not one matrix; seeding each batch's
    # forward pass makes it one: the operator is symmetric, uᵀ(Hv) = vᵀ(Hu).
    model = awkward_model()
    model[3].p = 0.5
    g = torch.Generator().manual_seed(0)
    with measuring(model, train_mode=True) as seed_forward:
        op = HessianOperator(model, loss_fn, awkward_data(), seed_forward=seed_forward)
        u, v = (torch.randn(op.n, generator=g, dtype=torch.float64) for _ in range(2))
        assert (u @ op(v)).item() == pytest.approx((v @ op(u)).item(), rel=1e-12)
        assert torch.equal(op(v), op(v))
