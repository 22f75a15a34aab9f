"""Bad input fails early with a message that names the bad value (and the model is left alone)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from samkit.sharpness import (
    hessian_eigenvalues,
    hessian_spectrum,
    hessian_trace,
    loss_landscape,
    m_sharpness,
)
from tests.sharpness.reference import Snapshot, loss_fn, tiny_data, tiny_mlp

ALL = [
    lambda m, f, d: hessian_eigenvalues(m, f, d),
    lambda m, f, d: hessian_trace(m, f, d, samples=2),
    lambda m, f, d: hessian_spectrum(m, f, d, iterations=2),
    lambda m, f, d: m_sharpness(m, f, d, micro_batch_size=4),
    lambda m, f, d: loss_landscape(m, f, d, steps=3),
]


@pytest.fixture
def model():
    return tiny_mlp()


@pytest.mark.parametrize("call", ALL)
def test_empty_data(model, call):
    with pytest.raises(ValueError, match="data is empty"):
        call(model, loss_fn, [])
    x, y = tiny_data()
    with pytest.raises(ValueError, match="batch 1 of data is empty"):
        call(model, loss_fn, [(x, y), (x[:0], y[:0])])


@pytest.mark.parametrize("call", ALL)
def test_no_trainable_parameters(model, call):
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="has no trainable parameters"):
        call(model, loss_fn, tiny_data())


@pytest.mark.parametrize("call", ALL)
def test_loss_not_a_scalar(model, call):
    per_example = nn.CrossEntropyLoss(reduction="none")
    with pytest.raises(ValueError, match=r"scalar, got a tensor of shape \((24|4),\) on batch 0.*reduction='mean'"):
        call(model, per_example, tiny_data())


@pytest.mark.parametrize("call", ALL)
def test_non_finite_loss(model, call):
    x, y = tiny_data()
    x = x.clone()
    x[0, 0] = float("nan")
    snapshot = Snapshot(model)
    with pytest.raises(ValueError, match=r"the loss is not finite \(nan\)"):
        call(model, loss_fn, (x, y))
    snapshot.assert_unchanged(model)


def test_eigenvalue_arguments(model):
    data = tiny_data()
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        hessian_eigenvalues(model, loss_fn, data, k=0)
    with pytest.raises(ValueError, match=r"k must be <= the number of trainable parameters \(31\), got k=32"):
        hessian_eigenvalues(model, loss_fn, data, k=32)
    with pytest.raises(TypeError, match="k must be an int >= 1, got 2.0"):
        hessian_eigenvalues(model, loss_fn, data, k=2.0)
    with pytest.raises(ValueError, match="tol must be a finite number > 0, got -1"):
        hessian_eigenvalues(model, loss_fn, data, tol=-1)
    with pytest.raises(ValueError, match="method must be one of 'lanczos', 'power'; got 'arnoldi'"):
        hessian_eigenvalues(model, loss_fn, data, method="arnoldi")
    with pytest.raises(ValueError, match="max_iter must be >= k for Lanczos .* got 2 < 3"):
        hessian_eigenvalues(model, loss_fn, data, k=3, max_iter=2)
    with pytest.raises(TypeError, match="seed must be an int, got '0'"):
        hessian_eigenvalues(model, loss_fn, data, seed="0")


def test_other_arguments(model):
    data = tiny_data()
    with pytest.raises(ValueError, match="samples must be >= 1, got 0"):
        hessian_trace(model, loss_fn, data, samples=0)
    with pytest.raises(ValueError, match="rho must be a finite number > 0, got -0.1"):
        m_sharpness(model, loss_fn, data, rho=-0.1)
    with pytest.raises(ValueError, match="kind must be one of 'worst', 'average'; got 'mean'"):
        m_sharpness(model, loss_fn, data, kind="mean")
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1, got 0"):
        m_sharpness(model, loss_fn, data, micro_batch_size=0)
    with pytest.raises(ValueError, match="steps must be odd .* got 40; use 41"):
        loss_landscape(model, loss_fn, data, steps=40)
    with pytest.raises(ValueError, match="dims must be one of 1, 2; got 3"):
        loss_landscape(model, loss_fn, data, dims=3)
    with pytest.raises(ValueError, match=r"directions\[0\] must be a tensor of shape \(31,\)"):
        loss_landscape(model, loss_fn, data, dims=1, directions=[torch.zeros(5)])
    with pytest.raises(ValueError, match="iterations must be >= 1, got 0"):
        hessian_spectrum(model, loss_fn, data, iterations=0)


def test_bad_data_and_model_types(model):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        hessian_trace(lambda x: x, loss_fn, tiny_data())
    with pytest.raises(TypeError, match="data must be an .* got Tensor"):
        hessian_trace(model, loss_fn, torch.zeros(3))
    with pytest.raises(TypeError, match="batch 0 of data must be an \\(inputs, targets\\) pair, got tuple of length 3"):
        hessian_trace(model, loss_fn, [(1, 2, 3)])


def test_landscape_needs_a_multidimensional_parameter():
    class Vector(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3, dtype=torch.float64))

        def forward(self, x):
            return x * self.w

    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="every trainable parameter is 1-D .* pass directions="):
        loss_landscape(Vector(), nn.functional.mse_loss, (x, x), steps=3)


def test_mixed_dtypes(model):
    model[2].double()
    model[0].float()
    with pytest.raises(ValueError, match=r"mixed dtypes \['torch.float32', 'torch.float64'\]"):
        hessian_trace(model, loss_fn, tiny_data())


@pytest.mark.parametrize("kind", ["worst", "average"])
def test_non_finite_loss_inside_the_ball_is_not_swallowed(model, kind):
    # max(best, nan) would silently drop a NaN: the measurement must fail instead.
    calls = {"count": 0}

    def nan_after_first(out, y):
        calls["count"] += 1
        loss = loss_fn(out, y)
        return loss if calls["count"] == 1 else loss * float("nan")

    with pytest.raises(ValueError, match=r"not finite \(nan\) on micro-batch 0 at a point of the rho=0.05 ball"):
        m_sharpness(model, nan_after_first, tiny_data(), micro_batch_size=24, kind=kind)
