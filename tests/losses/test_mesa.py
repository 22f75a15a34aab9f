"""MESALoss against its formula written out (KL by hand, the EMA by hand), its window, its EMA, its state and errors."""

from __future__ import annotations

import copy
import io
import math
import re

import pytest
import torch
from torch.func import functional_call

from samkit.experiments.train_step import plain_step
from samkit.losses import MESALoss
from tests.optim.reference import batch, loss_fn, mlp


def kl_by_hand(outputs, reference, tau):
    """tau² (1/B) Σ_i Σ_c q_ic log(q_ic / p_ic), q = softmax(reference/tau), p = softmax(outputs/tau)."""
    q = torch.exp(reference / tau) / torch.exp(reference / tau).sum(dim=1, keepdim=True)
    p = torch.exp(outputs / tau) / torch.exp(outputs / tau).sum(dim=1, keepdim=True)
    return tau**2 * (q * torch.log(q / p)).sum(dim=1).sum() / outputs.shape[0]


def bn_model(seed=0):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 3)]
    return torch.nn.Sequential(*layers).double()


def test_loss_equals_the_formula_with_the_ema_written_out():
    """loss = CE + lam tau² mean KL(softmax(f_ema/tau) || softmax(f/tau)), ema_t = d ema_{t-1} + (1 - d) w_t."""
    model = mlp()
    lam, tau, decay = 0.5, 2.0, 0.7
    mesa = MESALoss(model, loss_fn, lam=lam, tau=tau, start_epoch=0, decay=decay)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for step in range(4):
        x, y = batch(seed=step)
        outputs = model(x)
        loss = mesa(x, outputs, y, epoch=0)
        reference = functional_call(model, ema, (x,))
        expected = loss_fn(outputs, y) + lam * kl_by_hand(outputs, reference, tau)
        assert abs(loss.item() - expected.item()) <= 1e-12
        loss.backward()
        opt.step()
        opt.zero_grad()
        mesa.update()
        ema = {k: decay * ema[k] + (1 - decay) * v.detach() for k, v in model.state_dict().items()}
    for k, v in mesa.ema.state_dict().items():
        torch.testing.assert_close(v, ema[k], rtol=0, atol=1e-15)
    # the EMA lags the weights and the term is not zero: the comparison is not vacuous
    assert max((ema[k] - v).abs().max().item() for k, v in model.state_dict().items()) > 1e-3
    x, y = batch(seed=9)
    assert mesa.trajectory(x, model(x)).item() > 1e-6


def test_the_terms_gradient_is_tau_times_p_minus_q_over_b():
    """d/dz [tau² mean KL(q || p(z/tau))] = tau (p - q) / B: the tau² factor of the authors' code."""
    model, (x, _) = mlp(), batch()
    mesa = MESALoss(model, loss_fn, tau=3.0, start_epoch=0, decay=0.5)
    with torch.no_grad():
        for t in mesa.ema.parameters():
            t.add_(0.3)
    outputs = model(x).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(mesa.trajectory(x, outputs), outputs)
    reference = mesa.ema(x)
    p, q = torch.softmax(outputs / 3.0, dim=1), torch.softmax(reference / 3.0, dim=1)
    torch.testing.assert_close(grad, 3.0 * (p - q) / len(x), rtol=0, atol=1e-15)
    assert grad.abs().max() > 1e-4


def test_ema_update_covers_parameters_and_buffers():
    """Every floating state entry (weights, BatchNorm's running mean and variance) follows d e + (1 - d) m;
    integer buffers (num_batches_tracked) are copied."""
    model = bn_model()
    decay = 0.9
    mesa = MESALoss(model, loss_fn, decay=decay)
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for step in range(3):
        x, y = batch(seed=step)
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        mesa.update()
        for k, v in model.state_dict().items():
            expected[k] = decay * expected[k] + (1 - decay) * v if v.is_floating_point() else v.clone()
    state = mesa.ema.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=1e-15)
    assert int(state["1.num_batches_tracked"]) == 3
    assert (state["1.running_mean"] - model.state_dict()["1.running_mean"]).abs().max() > 1e-3


def test_reference_is_the_ema_copy_in_eval_mode():
    """The copy stays in eval mode (dropout off, BatchNorm on its averaged statistics) whatever the model's mode."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3)
    ).double()
    model.train()
    mesa = MESALoss(model, loss_fn)
    x, y = batch()
    model(x)  # updates the model's running statistics
    mesa.update()
    model.train()
    assert not mesa.ema.training
    independent = copy.deepcopy(model).eval()
    independent.load_state_dict(mesa.ema.state_dict())
    first, second = mesa.reference(x), mesa.reference(x)
    assert torch.equal(first, independent(x)) and torch.equal(first, second)
    assert not first.requires_grad


def test_no_gradient_reaches_the_ema_copy():
    model, (x, y) = mlp(), batch()
    mesa = MESALoss(model, loss_fn, start_epoch=0)
    mesa(x, model(x), y, epoch=0).backward()
    assert all(t.grad is None and not t.requires_grad for t in mesa.ema.parameters())
    assert all(t.grad is not None for t in model.parameters())


def test_one_extra_forward_per_step_with_the_term_and_none_without():
    """The EMA forward runs (counted by a hook, and by extra_forwards) once per step in [start_epoch, end_epoch);
    the EMA updates on every step, also before start_epoch (the authors' code does)."""
    model = mlp()
    mesa = MESALoss(model, loss_fn, start_epoch=2, end_epoch=4, decay=0.5)
    calls = []
    mesa.ema.register_forward_hook(lambda *args: calls.append(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    initial = copy.deepcopy(mesa.ema.state_dict())
    for epoch in range(6):
        x, y = batch(seed=epoch)
        outputs = model(x)
        loss = mesa(x, outputs, y, epoch=epoch)
        if epoch < 2 or epoch >= 4:
            assert torch.equal(loss, loss_fn(outputs, y))  # the base loss itself outside the window
        loss.backward()
        opt.step()
        opt.zero_grad()
        mesa.update()
        if epoch == 1:
            assert calls == [] and mesa.extra_forwards == 0
            assert any(not torch.equal(v, initial[k]) for k, v in mesa.ema.state_dict().items())
    assert len(calls) == mesa.extra_forwards == 2
    assert mesa.updates == 6


def test_lam_zero_is_the_base_loss_bit_for_bit():
    model, (x, y) = mlp(), batch()
    mesa = MESALoss(model, loss_fn, lam=0.0, start_epoch=0)
    outputs = model(x)
    assert torch.equal(mesa(x, outputs, y, epoch=3), loss_fn(outputs, y))
    assert mesa.extra_forwards == 0


def test_bind_is_the_same_loss_as_a_two_argument_loss_fn():
    model, (x, y) = mlp(), batch()
    mesa = MESALoss(model, loss_fn, start_epoch=0, decay=0.5)
    with torch.no_grad():
        for t in mesa.ema.parameters():
            t.mul_(0.9)
    outputs = model(x)
    assert torch.equal(mesa.bind(x, epoch=1)(outputs, y), mesa(x, outputs, y, epoch=1))


def test_a_plain_one_pass_training_loop_trains():
    """10 SGD steps of samkit's plain step with mesa.bind as the loss_fn, update() after each: finite, lower."""
    model = mlp()
    mesa = MESALoss(model, loss_fn, start_epoch=1, decay=0.8)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    x, y = batch(n=32)
    before = loss_fn(model(x), y).item()
    losses = []
    for step in range(10):
        losses.append(plain_step(opt, model, mesa.bind(x, epoch=step // 5), x, y).item())
        mesa.update()
    assert all(math.isfinite(v) for v in losses)
    assert mesa.extra_forwards == 5
    assert loss_fn(model(x), y).item() < before - 0.05


def test_under_autocast_the_reference_runs_in_the_callers_precision():
    model = mlp(dtype=torch.float32)
    mesa = MESALoss(model, loss_fn, start_epoch=0)
    with torch.no_grad():
        for t in mesa.ema.parameters():
            t.mul_(0.8)
    x, y = batch(dtype=torch.float32)
    exact = mesa(x, model(x), y, epoch=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mesa.reference(x).dtype == torch.bfloat16
        outputs = model(x)
        loss = mesa(x, outputs, y, epoch=0)
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    assert abs(loss.item() - exact.item()) <= 5e-2 * abs(exact.item())  # bfloat16 has 8 bits of mantissa
    loss.backward()
    assert all(torch.isfinite(t.grad).all() for t in model.parameters())


def test_a_wrapped_model_is_unwrapped():
    model = mlp()
    mesa = MESALoss(torch.nn.DataParallel(model), loss_fn)
    assert mesa.model is model and isinstance(mesa.ema, torch.nn.Sequential)


def _train(model, opt, mesa, steps, offset=0):
    for step in range(offset, offset + steps):
        x, y = batch(seed=step)
        loss = mesa(x, model(x), y, epoch=step // 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mesa.update()


def test_state_dict_round_trip_continues_bit_exactly():
    """5 steps straight == 3 steps, save (torch.save), load into fresh objects, 2 steps: weights, EMA, counts."""
    options = dict(lam=0.6, tau=4.0, start_epoch=1, decay=0.6)
    model = bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    mesa = MESALoss(model, loss_fn, **options)
    _train(model, opt, mesa, 5)

    first = bn_model()
    first_opt = torch.optim.SGD(first.parameters(), lr=0.2, momentum=0.9)
    first_mesa = MESALoss(first, loss_fn, **options)
    _train(first, first_opt, first_mesa, 3)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict(), "mesa": first_mesa.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = bn_model(seed=99)
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.2, momentum=0.9)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    resumed_mesa = MESALoss(resumed, loss_fn, **options)
    resumed_mesa.load_state_dict(saved["mesa"])
    _train(resumed, resumed_opt, resumed_mesa, 2, offset=3)

    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))
    assert all(
        torch.equal(a, b) for a, b in zip(mesa.ema.state_dict().values(), resumed_mesa.ema.state_dict().values())
    )
    assert (mesa.extra_forwards, mesa.updates) == (resumed_mesa.extra_forwards, resumed_mesa.updates) == (3, 5)


def test_a_resume_with_other_options_is_refused():
    model = mlp()
    state = MESALoss(model, loss_fn, lam=0.6).state_dict()
    with pytest.raises(ValueError, match=r"saved with lam=0\.6.*has lam=0\.8"):
        MESALoss(model, loss_fn).load_state_dict(state)
    with pytest.raises(ValueError, match="not a state dict"):
        MESALoss(model, loss_fn).load_state_dict(model.state_dict())


@pytest.mark.parametrize(
    "name,value",
    [
        ("lam", -0.1),
        ("lam", float("nan")),
        ("lam", True),
        ("lam", "0.8"),
        ("tau", 0.0),
        ("tau", -5.0),
        ("tau", float("inf")),
        ("decay", 1.5),
        ("decay", -0.1),
        ("start_epoch", -1),
        ("start_epoch", 1.5),
        ("start_epoch", True),
        ("end_epoch", 6),
        ("end_epoch", 2.0),
    ],
)
def test_bad_options_raise_value_error_naming_the_value(name, value):
    with pytest.raises(ValueError, match=rf"{name} must .*got {re.escape(repr(value))}"):
        MESALoss(mlp(), loss_fn, **{name: value})


def test_bad_model_base_loss_or_epoch_raise_value_error():
    with pytest.raises(ValueError, match="model must be the torch.nn.Module"):
        MESALoss(lambda x: x, loss_fn)
    with pytest.raises(ValueError, match="base_loss must be a callable"):
        MESALoss(mlp(), None)
    model, (x, y) = mlp(), batch()
    mesa = MESALoss(model, loss_fn)
    for epoch in (-1, 2.0, None):
        with pytest.raises(ValueError, match=rf"epoch must be an integer >= 0.*got {re.escape(repr(epoch))}"):
            mesa(x, model(x), y, epoch=epoch)
