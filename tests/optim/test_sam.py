"""samkit.SAM against plain references, its conventions (param groups, schedulers, checkpoints) and its errors."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

from samkit import SAM
from tests.optim.reference import batch, loss_fn, max_diff, mlp, reference_sam_sgd

SGD_OPTIONS = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)


def two_step(model, opt, x, y, steps):
    for _ in range(steps):
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)


def closure_steps(model, opt, x, y, steps):
    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return [opt.step(closure) for _ in range(steps)]


@pytest.mark.parametrize("adaptive,eta", [(False, 0.0), (True, 0.0), (True, 0.01)])
def test_five_steps_equal_the_reference(adaptive, eta):
    model, (x, y) = mlp(), batch()
    rho = 0.5 if adaptive else 0.05
    expected = reference_sam_sgd(model, x, y, steps=5, rho=rho, adaptive=adaptive, eta=eta, **SGD_OPTIONS)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, eta=eta, **SGD_OPTIONS)
    two_step(model, opt, x, y, 5)
    assert max_diff(model, expected) <= 1e-12
    # the steps moved the weights: the comparison is not vacuous
    assert max((p.detach() - q.detach()).abs().max() for p, q in zip(model.parameters(), mlp().parameters())) > 1e-3


@pytest.mark.parametrize("adaptive", [False, True])
def test_matches_the_common_implementation_bit_for_bit(adaptive):
    """Its numerics, written out: stacked per-tensor norms of (|w| if adaptive else 1) * g, the stabiliser outside,
    e_w = (w² if adaptive else 1) * g * (rho / (||.|| + 1e-12)), then w + e_w."""
    model, (x, y) = mlp(), batch()
    loss_fn(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    norm = torch.norm(torch.stack([((torch.abs(w) if adaptive else 1.0) * g).norm(p=2) for w, g in zip(before, grads)]))
    scale = 0.05 / (norm + 1e-12)
    expected = [w + (torch.pow(w, 2) if adaptive else 1.0) * g * scale for w, g in zip(before, grads)]
    for foreach in (True, False):
        opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, adaptive=adaptive, foreach=foreach)
        opt.first_step()
        assert all(torch.equal(p, e) for p, e in zip(model.parameters(), expected))
        opt.restore()


@pytest.mark.parametrize("p", [2, 3, float("inf")])
@pytest.mark.parametrize("adaptive", [False, True])
def test_perturbation_has_norm_rho(p, adaptive):
    model, (x, y) = mlp(), batch()
    loss_fn(model(x), y).backward()
    before = [t.detach().clone() for t in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.07, p=p, adaptive=adaptive, eta=0.01, lr=0.1, eps=0.0)
    opt.first_step()
    eps = torch.cat([(t.detach() - w).flatten() for t, w in zip(model.parameters(), before)])
    t_diag = torch.cat([(w.abs() + 0.01).flatten() for w in before]) if adaptive else torch.ones_like(eps)
    # ||T^-1 ε̂||_p = rho (T = I without adaptive)
    assert torch.linalg.vector_norm(eps / t_diag, p).item() == pytest.approx(0.07, rel=1e-9)
    opt.restore()


def test_closure_api_equals_two_step_api():
    model_a, (x, y) = mlp(), batch()
    model_b = copy.deepcopy(model_a)
    opt_a = SAM(model_a.parameters(), torch.optim.SGD, **SGD_OPTIONS)
    opt_b = SAM(model_b.parameters(), torch.optim.SGD, **SGD_OPTIONS)
    two_step(model_a, opt_a, x, y, 4)
    losses = closure_steps(model_b, opt_b, x, y, 4)
    assert all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters()))
    # the closure API returns the loss of the first (clean) pass: decreasing from the initial loss
    assert losses[0].item() == pytest.approx(loss_fn(mlp()(x), y).item(), rel=1e-12)


def test_restore_is_bit_exact_in_float32():
    model, (x, y) = mlp(dtype=torch.float32), batch(dtype=torch.float32)
    start = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.0)
    two_step(model, opt, x, y, 3)
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), start))


def test_state_dict_round_trip_with_adam_continues_exactly():
    (x, y) = batch()
    straight = mlp()
    opt = SAM(straight.parameters(), torch.optim.Adam, lr=1e-2)
    two_step(straight, opt, x, y, 5)

    first = mlp()
    opt1 = SAM(first.parameters(), torch.optim.Adam, lr=1e-2)
    two_step(first, opt1, x, y, 3)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert "exp_avg" in saved["opt"]["state"][0]  # Adam's moments travel with SAM's state dict

    resumed = mlp(seed=5)  # different initial weights: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt2 = SAM(resumed.parameters(), torch.optim.Adam, lr=0.5)
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups is opt2.base_optimizer.param_groups and opt2.param_groups[0]["lr"] == 1e-2
    two_step(resumed, opt2, x, y, 2)
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))


def test_state_dict_round_trip_keeps_the_interval_phase():
    (x, y) = batch()
    options = dict(interval=2, lr=0.1, momentum=0.9)
    straight = mlp()
    two_step(straight, SAM(straight.parameters(), torch.optim.SGD, **options), x, y, 5)

    first = mlp()
    opt1 = SAM(first.parameters(), torch.optim.SGD, **options)
    two_step(first, opt1, x, y, 3)
    saved = copy.deepcopy(opt1.state_dict())
    resumed = mlp(seed=5)
    resumed.load_state_dict(first.state_dict())
    opt2 = SAM(resumed.parameters(), torch.optim.SGD, **options)
    opt2.load_state_dict(saved)
    assert not opt2.is_sam_step  # step 4 of 5 is one that interval=2 skips
    two_step(resumed, opt2, x, y, 2)
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))


def test_scheduler_and_param_groups_act_on_the_base_optimizer():
    model, (x, y) = mlp(), batch()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        two_step(model, opt, x, y, 1)
        scheduler.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    extra = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt.add_param_group({"params": [extra], "rho": 0.2})
    assert opt.base_optimizer.param_groups[-1]["params"][0] is extra
    assert opt.base_optimizer.param_groups[-1]["rho"] == 0.2 and opt.base_optimizer.param_groups[-1]["lr"] == 0.1
    extra.grad = torch.ones(3, dtype=torch.float64)
    opt.zero_grad()  # one zero_grad for both: SAM's groups are the base's
    assert extra.grad is None


def test_built_instance_equals_class():
    model_a, (x, y) = mlp(), batch()
    model_b = copy.deepcopy(model_a)
    opt_a = SAM(model_a.parameters(), torch.optim.SGD, **SGD_OPTIONS)
    opt_b = SAM(model_b.parameters(), torch.optim.SGD(model_b.parameters(), **SGD_OPTIONS))
    two_step(model_a, opt_a, x, y, 3)
    two_step(model_b, opt_b, x, y, 3)
    assert all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters()))


def test_rho_zero_is_the_base_optimizer():
    model_a, (x, y) = mlp(), batch()
    model_b = copy.deepcopy(model_a)
    opt = SAM(model_a.parameters(), torch.optim.SGD, rho=0.0, **SGD_OPTIONS)
    base = torch.optim.SGD(model_b.parameters(), **SGD_OPTIONS)
    two_step(model_a, opt, x, y, 4)
    for _ in range(4):
        loss_fn(model_b(x), y).backward()
        base.step()
        base.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters()))


def test_per_group_rho_with_a_global_norm():
    model, (x, y) = mlp(), batch()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = SAM([{"params": first}, {"params": second, "rho": 0.2}], torch.optim.SGD, rho=0.05, lr=0.1)
    loss_fn(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    opt.first_step()
    for i, (p, w, g) in enumerate(zip(model.parameters(), before, grads)):
        rho = 0.05 if i < 2 else 0.2
        torch.testing.assert_close(p.detach() - w, rho * g / norm, rtol=1e-10, atol=1e-14)


def test_the_asam_authors_definition_with_param_groups():
    """T = |w| + 0.01 on weight matrices, T = 1 on biases (the README's param-group recipe), against the formula."""
    model, (x, y) = mlp(), batch()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    others = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    groups = [{"params": weights}, {"params": others, "adaptive": False}]
    opt = SAM(groups, torch.optim.SGD, rho=0.5, adaptive=True, eta=0.01, lr=0.1)
    loss_fn(model(x), y).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    t = {n: w.abs() + 0.01 if n.endswith("weight") else torch.ones_like(w) for n, w in before.items()}
    norm = torch.sqrt(sum(((t[n] * grads[n]) ** 2).sum() for n in before))
    opt.first_step()
    for n, p in model.named_parameters():
        expected = 0.5 * t[n] ** 2 * grads[n] / (norm + 1e-12)
        torch.testing.assert_close(p.detach() - before[n], expected, rtol=1e-10, atol=1e-15)
    # the biases' step is not the one of T = |b| + 0.01: the groups matter
    bias = model[0].bias.detach() - before["0.bias"]
    assert not torch.allclose(bias, 0.5 * (before["0.bias"].abs() + 0.01) ** 2 * grads["0.bias"] / norm)
    opt.restore()


def test_interval_skips_the_ascent():
    model_a, (x, y) = mlp(), batch()
    model_b = copy.deepcopy(model_a)
    opt = SAM(model_a.parameters(), torch.optim.SGD, interval=2, **SGD_OPTIONS)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = loss_fn(model_a(x), y)
        loss.backward()
        return loss

    assert opt.is_sam_step
    opt.step(closure)
    assert len(calls) == 2 and not opt.is_sam_step
    opt.step(closure)
    assert len(calls) == 3 and opt.is_sam_step
    # the same with the two-step API: SAM step then a plain SGD step
    ref = SAM(model_b.parameters(), torch.optim.SGD, interval=1, **SGD_OPTIONS)
    two_step(model_b, ref, x, y, 1)
    loss_fn(model_b(x), y).backward()
    ref.base_optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters()))


def test_skipped_step_gets_the_clean_gradient_once_whether_or_not_the_loop_runs_its_second_pass():
    (x, y) = batch()
    models = [mlp() for _ in range(3)]
    opts = [SAM(m.parameters(), torch.optim.SGD, interval=2, **SGD_OPTIONS) for m in models]
    for _ in range(4):
        # 0: both passes on every step; 1: the second pass only where is_sam_step; 2: the closure API
        two_step(models[0], opts[0], x, y, 1)
        sam = opts[1].is_sam_step
        loss_fn(models[1](x), y).backward()
        opts[1].first_step(zero_grad=True)
        if sam:
            loss_fn(models[1](x), y).backward()
        opts[1].second_step(zero_grad=True)
        closure_steps(models[2], opts[2], x, y, 1)
    # and the plain reference: SAM steps on even steps, base SGD steps on odd ones
    reference = mlp()
    ref = SAM(reference.parameters(), torch.optim.SGD, **SGD_OPTIONS)
    for i in range(4):
        if i % 2 == 0:
            two_step(reference, ref, x, y, 1)
        else:
            loss_fn(reference(x), y).backward()
            ref.base_optimizer.step()
            ref.zero_grad()
    for model in models:
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


@pytest.mark.parametrize("interval", [1, 2])
def test_first_step_twice_raises_even_when_nothing_moved(interval):
    model, (x, y) = mlp(), batch()
    opt = SAM(model.parameters(), torch.optim.SGD, interval=interval, lr=0.1)
    two_step(model, opt, x, y, 1)  # step 1 is one that interval=2 skips; a SAM step for interval=1
    before = [p.detach().clone() for p in model.parameters()]
    assert opt.first_step() is (interval == 1)  # no parameter has a gradient: nothing moves
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), before))
    with pytest.raises(RuntimeError, match="first_step\\(\\) called twice"):
        opt.first_step()
    opt.restore()
    if interval == 1:
        opt.first_step()  # restore() ends the ascent: the hand-written mSAM pattern
    else:
        with pytest.raises(RuntimeError, match="one-pass step"):
            opt.first_step()  # a one-pass step stays one: its clean gradient is the descent gradient
    opt.second_step()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), before))  # no gradient, no move


def test_an_error_in_the_closures_second_call_restores_the_weights():
    model, (x, y) = mlp(), batch()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("boom")
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(KeyError):
        opt.step(closure)
    assert not opt.perturbed and all(torch.equal(p, w) for p, w in zip(model.parameters(), before))
    calls.append(1)  # the next step runs normally
    opt.step(closure)
    assert not all(torch.equal(p, w) for p, w in zip(model.parameters(), before))


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("p", [2, 3, float("inf")])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("eps", [1e-12, 0.0])
def test_params_without_grad_are_untouched_and_zero_grad_gives_zero_epsilon(foreach, p, adaptive, eps):
    model = mlp()
    frozen = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = SAM(
        list(model.parameters()) + [frozen], torch.optim.SGD, lr=0.1, p=p, adaptive=adaptive, eps=eps, foreach=foreach
    )
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.first_step()
    assert frozen.grad is None and torch.equal(frozen, torch.ones(3, dtype=torch.float64))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), before))  # ε̂ = 0, not NaN
    opt.second_step()


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("p", [2, 3, float("inf")])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_gradient_raises_and_leaves_the_weights(foreach, p, bad):
    model, (x, y) = mlp(), batch()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, p=p, foreach=foreach)
    loss_fn(model(x), y).backward()
    model[0].weight.grad[0, 0] = bad
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="inf|nan"):
        opt.first_step()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), before))
    assert not opt.perturbed
    with pytest.raises(RuntimeError, match="without first_step"):  # the failed first_step left nothing pending
        opt.second_step()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rho=-0.1), "rho must be .* got -0.1"),
        (dict(p=1), "p must be > 1.* got 1"),
        (dict(p=0.5), "p must be > 1.* got 0.5"),
        (dict(eta=-1.0), "eta must be .* got -1.0"),
        (dict(interval=0), "interval must be .* got 0"),
        (dict(interval=1.5), "interval must be .* got 1.5"),
        (dict(eps=-1.0), "eps must be .* got -1.0"),
        (dict(restore_by="subtract"), "restore_by must be one of .* got 'subtract'"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SAM(mlp().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_bad_group_option():
    model = mlp()
    with pytest.raises(ValueError, match="rho must be .* got -2"):
        SAM([{"params": model.parameters(), "rho": -2}], torch.optim.SGD, lr=0.1)


def test_bad_base_optimizer():
    model = mlp()
    with pytest.raises(TypeError, match="base_optimizer must be a torch.optim.Optimizer subclass"):
        SAM(model.parameters(), "sgd", lr=0.1)
    with pytest.raises(ValueError, match="other parameters"):
        SAM(model.parameters(), torch.optim.SGD(mlp().parameters(), lr=0.1))
    with pytest.raises(TypeError, match="already built SGD"):
        SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1), lr=0.2)


def test_step_order_errors():
    model, (x, y) = mlp(), batch()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="second_step\\(\\) called without first_step"):
        opt.second_step()
    loss_fn(model(x), y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="first_step\\(\\) called twice"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="weights are perturbed"):
        opt.state_dict()
    with pytest.raises(ValueError, match="needs a closure"):
        SAM(model.parameters(), torch.optim.SGD, lr=0.1).step()


def test_sparse_gradients_are_refused():
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    opt = SAM(embedding.parameters(), torch.optim.SGD, lr=0.1)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.first_step()


def test_load_state_dict_refuses_a_foreign_state():
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="not saved by samkit.SAM"):
        opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())
