"""Momentum-SAM against plain float64 references of its rule, its one pass, train/eval modes, checkpoints, errors."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from samkit import sam_step
from samkit.optim.momentum_sam import MomentumSAM
from tests.optim.reference import batch, gradients, loss_fn, max_diff, mlp

SGD_OPTIONS = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
# Adam's own eps stays at its default 1e-8: the keyword eps is the ascent's stabiliser, as for every SAM
ADAMW_OPTIONS = dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=1e-2)
ADAM_EPS = 1e-8
RHO = 0.5  # the MLP's weights have norm ~3: a displacement large enough to change every gradient


def batches(steps, n=16):
    return [batch(seed=30 + s, n=n) for s in range(steps)]


def ascent_point(w, m, rho):
    """w~ = w - rho m / (||m|| + 1e-12), the norm over all parameters; w itself while there is no momentum."""
    if m is None:
        return dict(w)
    norm = torch.sqrt(sum((m[k] ** 2).sum() for k in w))
    return {k: w[k] - rho * m[k] / (norm + 1e-12) for k in w}


def reference_msam_sgd(model, data, *, rho, lr, momentum, weight_decay):
    """Momentum-SAM around SGD: g = ∇L(w~), d = g + wd w~, m <- μ m + d (m = d at first), w <- w - lr m.
    Returns (w, w~) after the last step."""
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    m = None
    for x, y in data:
        w_tilde = ascent_point(w, m, rho)
        g = gradients(model, w_tilde, x, y)
        d = {k: g[k] + weight_decay * w_tilde[k] for k in w}
        m = d if m is None else {k: momentum * m[k] + d[k] for k in w}
        w = {k: w[k] - lr * m[k] for k in w}
    return w, ascent_point(w, m, rho)


def reference_msam_adam(model, data, *, rho, lr, betas, weight_decay, decoupled, eps=ADAM_EPS):
    """Momentum-SAM around Adam(W): the ascent along the first moment m; g = ∇L(w~) (+ wd w~ when coupled);
    m, v as Adam; decoupled: w <- w (1 - lr wd), then w <- w - lr/(1-β1^t) m / (sqrt(v)/sqrt(1-β2^t) + eps)."""
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    m, v = None, {k: torch.zeros_like(t) for k, t in w.items()}
    beta1, beta2 = betas
    for t, (x, y) in enumerate(data, start=1):
        w_tilde = ascent_point(w, m, rho)
        g = gradients(model, w_tilde, x, y)
        if not decoupled:
            g = {k: g[k] + weight_decay * w_tilde[k] for k in w}
        previous = m if m is not None else {k: torch.zeros_like(u) for k, u in w.items()}
        m = {k: beta1 * previous[k] + (1 - beta1) * g[k] for k in w}
        v = {k: beta2 * v[k] + (1 - beta2) * g[k] ** 2 for k in w}
        if decoupled:
            w = {k: w[k] * (1 - lr * weight_decay) for k in w}
        step = lr / (1 - beta1**t)
        w = {k: w[k] - step * m[k] / (v[k].sqrt() / math.sqrt(1 - beta2**t) + eps) for k in w}
    return w, ascent_point(w, m, rho)


def two_step(model, opt, data):
    for x, y in data:
        loss_fn(model(x), y).backward()
        if opt.first_step(zero_grad=True):
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)


def base_steps(model, opt, data):
    for x, y in data:
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def count_forwards(model):
    """Record the batch size of every forward call of the model."""
    sizes = []
    model.register_forward_hook(lambda module, inputs, output: sizes.append(len(inputs[0])))
    return sizes


# ------------------------------------------------------------------------------------------------------------------
# the rule


@pytest.mark.parametrize("foreach", [True, False])
def test_sgd_equals_the_reference(foreach):
    model, data = mlp(), batches(5)
    w, w_tilde = reference_msam_sgd(mlp(), data, rho=RHO, **SGD_OPTIONS)
    opt = MomentumSAM(model.parameters(), torch.optim.SGD, rho=RHO, foreach=foreach, **SGD_OPTIONS)
    two_step(model, opt, data)
    assert max_diff(model, w_tilde) <= 1e-12  # between steps the weights sit at w~
    opt.eval()
    assert max_diff(model, w) <= 1e-12
    # not vacuous: the ascent changed the trajectory (rho = 0 is plain SGD)
    plain, _ = reference_msam_sgd(mlp(), data, rho=0.0, **SGD_OPTIONS)
    assert max(float((w[k] - plain[k]).abs().max()) for k in w) > 1e-4


@pytest.mark.parametrize("base,decoupled", [(torch.optim.AdamW, True), (torch.optim.Adam, False)])
@pytest.mark.parametrize("foreach", [True, False])
def test_adam_first_moment_equals_the_reference(base, decoupled, foreach):
    model, data = mlp(), batches(5)
    w, w_tilde = reference_msam_adam(mlp(), data, rho=RHO, decoupled=decoupled, **ADAMW_OPTIONS)
    opt = MomentumSAM(model.parameters(), base, rho=RHO, foreach=foreach, **ADAMW_OPTIONS)
    two_step(model, opt, data)
    assert max_diff(model, w_tilde) <= 1e-12
    opt.eval()
    assert max_diff(model, w) <= 1e-12
    plain, _ = reference_msam_adam(mlp(), data, rho=0.0, decoupled=decoupled, **ADAMW_OPTIONS)
    assert max(float((w[k] - plain[k]).abs().max()) for k in w) > 1e-4


@pytest.mark.parametrize(
    "base,options",
    [(torch.optim.SGD, SGD_OPTIONS), (torch.optim.Adam, ADAMW_OPTIONS)],
    ids=["sgd-momentum", "adam-coupled-decay"],
)
def test_foreach_and_per_tensor_paths_agree_bit_for_bit(base, options):
    """The same arithmetic in the same order (on CPU the foreach kernels run per tensor)."""
    data = batches(5)
    models = [mlp(), mlp()]
    for model, foreach in zip(models, (True, False)):
        two_step(model, MomentumSAM(model.parameters(), base, rho=RHO, foreach=foreach, **options), data)
    assert same(*models)


@pytest.mark.parametrize(
    "base,options",
    [(torch.optim.SGD, SGD_OPTIONS), (torch.optim.AdamW, ADAMW_OPTIONS)],
    ids=["sgd-momentum", "adamw"],
)
def test_rho_zero_is_the_base_optimizer_bit_for_bit(base, options):
    model_a, data = mlp(), batches(5)
    model_b = copy.deepcopy(model_a)
    two_step(model_a, MomentumSAM(model_a.parameters(), base, rho=0.0, **options), data)
    base_steps(model_b, base(model_b.parameters(), **options), data)
    assert same(model_a, model_b)


def test_the_first_step_is_unperturbed_and_then_w_tilde_is_rho_along_minus_the_momentum():
    model, data = mlp(), batches(3)
    start = [p.detach().clone() for p in model.parameters()]
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = MomentumSAM([{"params": first}, {"params": second, "rho": 0.2}], torch.optim.SGD, rho=RHO, **SGD_OPTIONS)
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), start))  # no momentum yet: w~ = w
    for x, y in data:
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        opt.second_step(zero_grad=True)
        w_tilde = [p.detach().clone() for p in model.parameters()]
        opt.eval()
        momenta = [opt.state[p]["momentum_buffer"] for p in model.parameters()]
        norm = torch.sqrt(sum((m**2).sum() for m in momenta))  # global over both groups
        for i, (p, wt, m) in enumerate(zip(model.parameters(), w_tilde, momenta)):
            rho = RHO if i < 2 else 0.2
            torch.testing.assert_close(wt - p.detach(), -rho * m / (norm + 1e-12), rtol=1e-12, atol=1e-15)
        opt.train()
        assert all(torch.equal(p, wt) for p, wt in zip(model.parameters(), w_tilde))  # train() returns to w~


@pytest.mark.parametrize("p,adaptive", [(float("inf"), False), (2, True), (3, False)])
def test_the_move_is_the_sam_ascent_of_minus_the_momentum(p, adaptive):
    model, (x, y) = mlp(), batch()
    opt = MomentumSAM(
        model.parameters(), torch.optim.SGD, rho=0.07, p=p, adaptive=adaptive, eta=0.01, eps=0.0, **SGD_OPTIONS
    )
    loss_fn(model(x), y).backward()
    opt.first_step(zero_grad=True)
    opt.second_step(zero_grad=True)
    w_tilde = torch.cat([t.detach().flatten() for t in model.parameters()])
    opt.eval()
    w = torch.cat([t.detach().flatten() for t in model.parameters()])
    m = torch.cat([opt.state[t]["momentum_buffer"].flatten() for t in model.parameters()])
    scale = (w.abs() + 0.01) if adaptive else torch.ones_like(w)
    shift = w_tilde - w
    # ||T^-1 (w~ - w)||_p = rho, and the move goes against the momentum, coordinate by coordinate
    assert torch.linalg.vector_norm(shift / scale, p).item() == pytest.approx(0.07, rel=1e-9)
    moving = shift.abs() > 1e-14
    assert bool((torch.sign(shift[moving]) == -torch.sign(m[moving])).all()) and int(moving.sum()) > len(w) // 2


# ------------------------------------------------------------------------------------------------------------------
# the APIs and the cost


def test_closure_api_equals_two_step_api_and_runs_the_closure_once():
    model_a, data = mlp(), batches(4)
    model_b = copy.deepcopy(model_a)
    two_step(model_a, MomentumSAM(model_a.parameters(), torch.optim.SGD, rho=RHO, **SGD_OPTIONS), data)
    opt_b = MomentumSAM(model_b.parameters(), torch.optim.SGD, rho=RHO, **SGD_OPTIONS)
    calls, losses = [], []
    for x, y in data:
        expected = loss_fn(model_b(x), y).item()  # at the weights the step starts from: w~

        def closure(x=x, y=y):
            calls.append(1)
            opt_b.zero_grad()
            loss = loss_fn(model_b(x), y)
            loss.backward()
            return loss

        losses.append((opt_b.step(closure).item(), expected))
    assert same(model_a, model_b)
    assert len(calls) == 4 and all(got == want for got, want in losses)


def test_every_step_is_one_pass():
    model, data = mlp(), batches(5)
    sizes = count_forwards(model)
    opt = MomentumSAM(model.parameters(), torch.optim.SGD, rho=RHO, **SGD_OPTIONS)
    for x, y in data:
        assert opt.will_perturb is False  # known before the pass
        loss_fn(model(x), y).backward()
        assert opt.first_step(zero_grad=True) is False
        opt.second_step(zero_grad=True)
    assert sizes == [16] * 5
    assert opt.passes == opt.steps == 5 and opt.sam_steps == 0


def test_sam_step_with_one_micro_batch_equals_the_two_step_api_exactly():
    model_a, data = mlp(), batches(5)
    model_b = copy.deepcopy(model_a)
    two_step(model_a, MomentumSAM(model_a.parameters(), torch.optim.SGD, rho=RHO, **SGD_OPTIONS), data)
    opt_b = MomentumSAM(model_b.parameters(), torch.optim.SGD, rho=RHO, **SGD_OPTIONS)
    sizes = count_forwards(model_b)
    for x, y in data:
        sam_step(opt_b, model_b, loss_fn, x, y, micro_batches=1)
    assert same(model_a, model_b)
    assert sizes == [16] * 5 and opt_b.passes == opt_b.steps == 5


@pytest.mark.parametrize("perturbation", ["per_micro_batch", "shared"])
def test_sam_step_micro_batches_accumulate_the_gradient_at_w_tilde(perturbation):
    """Both modes are the same for a one-pass step: the batch gradient at w~, accumulated over the parts."""
    data = batches(5)
    model_a, model_b = mlp(), mlp()
    opt_a = MomentumSAM(model_a.parameters(), torch.optim.SGD, rho=RHO, **SGD_OPTIONS)
    opt_b = MomentumSAM(model_b.parameters(), torch.optim.SGD, rho=RHO, **SGD_OPTIONS)
    sizes = count_forwards(model_b)
    for x, y in data:
        sam_step(opt_a, model_a, loss_fn, x, y, micro_batches=1)
        sam_step(opt_b, model_b, loss_fn, x, y, micro_batches=2, perturbation=perturbation)
    diff = max((a - b).abs().max().item() for a, b in zip(model_a.parameters(), model_b.parameters()))
    assert diff <= 1e-12
    assert sizes == [8, 8] * 5 and opt_b.passes == 5  # one pass over each batch, in two parts


def test_vmap_backend_equals_the_loop():
    data = batches(4)
    model_a, model_b = mlp(), mlp()
    opt_a = MomentumSAM(model_a.parameters(), torch.optim.SGD, rho=RHO, **SGD_OPTIONS)
    opt_b = MomentumSAM(model_b.parameters(), torch.optim.SGD, rho=RHO, **SGD_OPTIONS)
    for x, y in data:
        sam_step(opt_a, model_a, loss_fn, x, y, micro_batches=2)
        sam_step(opt_b, model_b, loss_fn, x, y, micro_batches=2, backend="vmap")
    diff = max((a - b).abs().max().item() for a, b in zip(model_a.parameters(), model_b.parameters()))
    assert diff <= 1e-12 and opt_b.passes == 4
    _, w_tilde = reference_msam_sgd(mlp(), data, rho=RHO, **SGD_OPTIONS)
    assert max_diff(model_b, w_tilde) <= 1e-12  # vmap took its gradients at w~, where the weights sat


# ------------------------------------------------------------------------------------------------------------------
# train and eval modes, checkpoints


def test_eval_and_train_move_the_weights_and_are_idempotent():
    model, data = mlp(), batches(2)
    opt = MomentumSAM(model.parameters(), torch.optim.SGD, rho=RHO, **SGD_OPTIONS)
    two_step(model, opt, data)
    assert opt.training
    w_tilde = [p.detach().clone() for p in model.parameters()]
    opt.eval()
    opt.eval()
    w = [p.detach().clone() for p in model.parameters()]
    assert not opt.training and not all(torch.equal(a, b) for a, b in zip(w, w_tilde))
    opt.train()
    opt.train()
    assert opt.training and all(torch.equal(p, b) for p, b in zip(model.parameters(), w_tilde))
    opt.eval()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), w))


def test_a_step_in_eval_mode_raises_until_train():
    model, data = mlp(), batches(2)
    opt = MomentumSAM(model.parameters(), torch.optim.SGD, rho=RHO, **SGD_OPTIONS)
    two_step(model, opt, data[:1])
    opt.eval()
    w = [p.detach().clone() for p in model.parameters()]
    x, y = data[1]
    loss_fn(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"eval mode.*optimizer\.train\(\)"):
        opt.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match=r"optimizer\.train\(\)"):
        sam_step(opt, model, loss_fn, x, y)
    with pytest.raises(RuntimeError, match=r"optimizer\.train\(\)"):
        opt.step(lambda: loss_fn(model(x), y))
    opt.skip_perturbation()
    with pytest.raises(RuntimeError, match=r"optimizer\.train\(\)"):
        opt.second_step()
    opt.cancel_step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), w)) and opt.steps == 1  # nothing stepped
    opt.train()
    opt.zero_grad()
    sam_step(opt, model, loss_fn, x, y)
    assert opt.steps == 2


def test_eval_and_train_refuse_the_middle_of_a_step():
    model, (x, y) = mlp(), batch()
    opt = MomentumSAM(model.parameters(), torch.optim.SGD, rho=RHO, **SGD_OPTIONS)
    loss_fn(model(x), y).backward()
    opt.first_step(zero_grad=True)
    for name in ("eval", "train"):
        with pytest.raises(RuntimeError, match="middle of a step"):
            getattr(opt, name)()
    opt.second_step()
    opt.eval()


def test_state_dict_refuses_the_weights_at_w_tilde():
    model, data = mlp(), batches(1)
    opt = MomentumSAM(model.parameters(), torch.optim.SGD, rho=RHO, **SGD_OPTIONS)
    opt.state_dict()  # no momentum yet: the weights are at w
    two_step(model, opt, data)
    with pytest.raises(RuntimeError, match=r"[Cc]all optimizer\.eval\(\) first"):
        opt.state_dict()
    opt.eval()
    assert opt.state_dict()["sam"]["memory"] == {"training": False}


@pytest.mark.parametrize(
    "base,options",
    [(torch.optim.SGD, SGD_OPTIONS), (torch.optim.AdamW, ADAMW_OPTIONS)],
    ids=["sgd-momentum", "adamw"],
)
def test_state_dict_round_trip_continues_bit_exactly(base, options):
    data = batches(5)
    straight = mlp()
    opt = MomentumSAM(straight.parameters(), base, rho=RHO, **options)
    two_step(straight, opt, data)

    first = mlp()
    opt1 = MomentumSAM(first.parameters(), base, rho=RHO, **options)
    two_step(first, opt1, data[:3])
    opt1.eval()
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = mlp(seed=5)  # other initial weights: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt2 = MomentumSAM(resumed.parameters(), base, rho=RHO, **{**options, "lr": 0.5})
    opt2.load_state_dict(saved["opt"])
    assert not opt2.training and opt2.param_groups[0]["lr"] == options["lr"]
    opt2.train()
    two_step(resumed, opt2, data[3:])
    assert same(straight, resumed)  # both at w~
    opt.eval()
    opt2.eval()
    assert same(straight, resumed)  # and at w
    assert opt2.steps == 5 and opt2.passes == 5


def test_a_shallow_copy_shares_the_mode():
    """Lightning's optimizer wrapper copies __dict__: a mode switched through it is the optimizer's mode."""
    model, data = mlp(), batches(2)
    opt = MomentumSAM(model.parameters(), torch.optim.SGD, rho=RHO, **SGD_OPTIONS)
    two_step(model, opt, data)
    wrapper = copy.copy(opt)
    wrapper.eval()
    assert not opt.training
    opt.state_dict()  # the weights are at w for both
    opt.train()
    assert wrapper.training


# ------------------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "base,kwargs,match",
    [
        (torch.optim.RMSprop, dict(lr=0.1), "RMSprop"),
        (torch.optim.SGD, dict(lr=0.1), "momentum=0"),
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, maximize=True), "maximize=True"),
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, rho=-1.0), "-1.0"),
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, restore_by="swap"), "'swap'"),
        (torch.optim.AdamW, dict(lr=0.1, eps_hat=1), None),
    ],
)
def test_bad_options_raise_and_name_the_value(base, kwargs, match):
    model = mlp()
    if match is None:  # an option neither MomentumSAM nor the base knows: the base's TypeError
        with pytest.raises(TypeError, match="eps_hat"):
            MomentumSAM(model.parameters(), base, **kwargs)
        return
    with pytest.raises(ValueError, match=match):
        MomentumSAM(model.parameters(), base, **kwargs)


def test_interval_is_refused():
    with pytest.raises(TypeError, match="interval"):
        MomentumSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, interval=2)


def test_a_checkpoint_of_another_base_is_refused():
    model, data = mlp(), batches(1)
    opt = MomentumSAM(model.parameters(), torch.optim.SGD, rho=RHO, **SGD_OPTIONS)
    two_step(model, opt, data)
    opt.eval()
    other = MomentumSAM(mlp().parameters(), torch.optim.AdamW, rho=RHO, **ADAMW_OPTIONS)
    with pytest.raises(ValueError, match="moment='momentum_buffer'"):
        other.load_state_dict(opt.state_dict())
