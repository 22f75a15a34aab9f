"""One divergence rule for every method: a step whose loss or gradient is inf or NaN ends the run as diverged,
before it writes the weights, whether the method is the base optimizer (one pass) or of the SAM family."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from samkit.experiments.config import TrainConfig
from samkit.experiments.optimizers import build_optimizer
from samkit.experiments.train_step import Diverged, make_loss_fn, make_scaler, train_step
from samkit.experiments.trainer import train

from .conftest import TINY

METHODS = ["sgd", "adam", "sam", "msam", "looksam", "mesa"]


class _InfOnce(torch.autograd.Function):
    """The identity forward (the loss stays finite); an inf gradient on the layer's chosen backward pass."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.layer.backwards += 1
        return (grad * math.inf if ctx.layer.backwards == ctx.layer.at else grad), None


class InfAtBackward(nn.Module):
    """The identity, whose backward pass number ``at`` (counted from 1) sends an inf gradient to the layers below."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.backwards = at, 0

    def forward(self, x):
        return _InfOnce.apply(x, self) if self.training and torch.is_grad_enabled() else x


def _config(method: str, **changes) -> TrainConfig:
    options = {"start_epoch": 0} if method == "mesa" else None
    return TINY.replace(optimizer=method, micro_batches=2 if method == "msam" else None, options=options, **changes)


@pytest.mark.parametrize("method", METHODS)
def test_an_inf_gradient_with_a_finite_loss_diverges_every_method_before_the_weights_change(method):
    torch.manual_seed(0)
    config = _config(method).resolved()
    model = nn.Sequential(nn.Linear(6, 8), InfAtBackward(at=1), nn.Linear(8, 3))
    optimizer = build_optimizer(model, config, total_steps=10)
    before = [t.detach().clone() for t in model.parameters()]
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    with torch.no_grad():
        assert math.isfinite(float(make_loss_fn(0.0)(model(x), y)))
    with pytest.raises(Diverged, match="inf or NaN"):
        train_step(config, optimizer, model, make_loss_fn(0.0), x, y)
    for t, b in zip(model.parameters(), before):
        assert torch.equal(t, b)


@pytest.mark.parametrize("method", METHODS)
def test_a_nan_loss_diverges_every_method_and_fp16_with_a_scaler_skips_it(method):
    torch.manual_seed(0)
    config = _config(method).resolved()
    model = nn.Sequential(nn.Linear(6, 3))
    optimizer = build_optimizer(model, config, total_steps=10)
    before = [t.detach().clone() for t in model.parameters()]
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    x[0, 0] = math.nan
    with pytest.raises(Diverged):
        train_step(config, optimizer, model, make_loss_fn(0.0), x, y)
    assert all(torch.equal(t, b) for t, b in zip(model.parameters(), before))
    fp16 = _config(method, amp="fp16").resolved()
    scaler = make_scaler(fp16, torch.device("cpu"))
    scale = scaler.get_scale()
    train_step(fp16, build_optimizer(model, fp16, total_steps=10), model, make_loss_fn(0.0), x, y, scaler=scaler)
    assert all(torch.equal(t, b) for t, b in zip(model.parameters(), before))  # skipped, not diverged
    assert scaler.get_scale() < scale


@pytest.mark.parametrize("method, backward", [("sgd", 8), ("sam", 15)])
def test_an_sgd_run_and_a_sam_run_meeting_the_same_inf_gradient_are_judged_alike(
    tmp_path, monkeypatch, method, backward
):
    # the clean gradient of the 8th step (epoch 1's last; SAM runs two backward passes a step) is inf
    import samkit.models

    build = samkit.models.build_model

    def with_inf_gradient(name, **shape):
        return nn.Sequential(build(name, **shape), InfAtBackward(at=backward))

    monkeypatch.setattr(samkit.models, "build_model", with_inf_gradient)
    out = tmp_path / method
    summary = train(_config(method, epochs=3), out, device="cpu", quiet=True, plot=False)
    assert (summary["status"], summary["status_reason"]) == ("diverged", "non-finite loss (nan)")
    assert summary["epochs_completed"] == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [row for row in rows if "test_loss" in row]
    assert len(epochs) == 1 and math.isnan(epochs[0]["train_loss"])
    assert math.isfinite(epochs[0]["test_loss"])  # evaluated at the weights from before the diverging step
