"""FriendlySAM against a plain float64 reference of its rule, SAM at sigma = 0, sam_step, checkpoints and errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from samkit import SAM, sam_step
from samkit.optim.fsam import FriendlySAM
from tests.optim.reference import batch, gradients, loss_fn, max_diff, mlp

SGD_OPTIONS = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
RULE = dict(rho=0.1, sigma=0.8, lmbda=0.6)  # sigma != 1 so that the two forms point differently


def batches(steps, n=16):
    return [batch(seed=10 + s, n=n) for s in range(steps)]


def reference_fsam_sgd(
    model, data, *, rho, sigma, lmbda, form, lr, momentum, weight_decay, micro_batches=1, adaptive=False
):
    """F-SAM around SGD(momentum, weight decay) from its formulas, one batch per step. Per micro-batch j:
    d_j = g_j − σ m_{t−1} (form "code", m_1 = g_1, d = g before m exists) or d_j = g_j − σ (λ m_{t−1} + (1 − λ) g_j)
    (form "paper", m_0 = 0); ε_j = ρ T² d_j / (||T d_j|| + 1e-12); G = Σ_j |B_j|/|B| ∇L_j(w + ε_j); then
    m_t = λ m_{t−1} + (1 − λ) Σ_j |B_j|/|B| g_j once per step."""
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    m, buffers = None, {}
    for x, y in data:
        n = len(x)
        chunks = list(zip(torch.tensor_split(x, micro_batches), torch.tensor_split(y, micro_batches)))
        total = {k: torch.zeros_like(v) for k, v in w.items()}
        clean = {k: torch.zeros_like(v) for k, v in w.items()}
        for xj, yj in chunks:
            g = gradients(model, w, xj, yj)
            if form == "code":
                d = g if m is None else {k: g[k] - sigma * m[k] for k in w}
            else:
                previous = m if m is not None else {k: torch.zeros_like(v) for k, v in w.items()}
                d = {k: g[k] - sigma * (lmbda * previous[k] + (1 - lmbda) * g[k]) for k in w}
            t = {k: w[k].abs() if adaptive else torch.ones_like(w[k]) for k in w}
            norm = torch.sqrt(sum(((t[k] * d[k]) ** 2).sum() for k in w))
            e = {k: rho * t[k] ** 2 * d[k] / (norm + 1e-12) for k in w}
            g2 = gradients(model, {k: w[k] + e[k] for k in w}, xj, yj)
            for k in w:
                total[k] = total[k] + len(xj) / n * g2[k]
                clean[k] = clean[k] + len(xj) / n * g[k]
        if m is None:
            m = dict(clean) if form == "code" else {k: (1 - lmbda) * clean[k] for k in w}
        else:
            m = {k: lmbda * m[k] + (1 - lmbda) * clean[k] for k in w}
        for k in w:
            step = total[k] + weight_decay * w[k]
            buffers[k] = step.clone() if k not in buffers else momentum * buffers[k] + step
            w[k] = w[k] - lr * buffers[k]
    return w


def two_step(model, opt, data):
    for x, y in data:
        loss_fn(model(x), y).backward()
        if opt.first_step(zero_grad=True):
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)


def same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("form", ["code", "paper"])
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("adaptive", [False, True])
def test_five_steps_equal_the_reference(form, foreach, adaptive):
    model, data = mlp(), batches(5)
    rule = dict(RULE, rho=0.5) if adaptive else RULE
    expected = reference_fsam_sgd(model, data, form=form, adaptive=adaptive, **rule, **SGD_OPTIONS)
    opt = FriendlySAM(
        model.parameters(), torch.optim.SGD, form=form, adaptive=adaptive, foreach=foreach, **rule, **SGD_OPTIONS
    )
    two_step(model, opt, data)
    assert max_diff(model, expected) <= 1e-12  # float64, 5 steps
    # the EMA changes the result: SAM (sigma = 0) lands elsewhere
    sam = reference_fsam_sgd(mlp(), data, form=form, adaptive=adaptive, **dict(rule, sigma=0.0), **SGD_OPTIONS)
    assert max_diff(model, sam) > 1e-6


def test_the_two_forms_differ_and_foreach_equals_the_loop_bit_for_bit():
    data = batches(5)
    results = {}
    for form in ("code", "paper"):
        for foreach in (True, False):
            model = mlp()
            two_step(
                model,
                FriendlySAM(model.parameters(), torch.optim.SGD, form=form, foreach=foreach, **RULE, lr=0.1),
                data,
            )
            results[form, foreach] = model
    assert same(results["code", True], results["code", False])
    assert same(results["paper", True], results["paper", False])
    assert not same(results["code", True], results["paper", True])


@pytest.mark.parametrize("form", ["code", "paper"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_sigma_zero_is_sam_bit_for_bit(form, adaptive):
    data = batches(5)
    model_a, model_b = mlp(), mlp()
    options = dict(rho=0.3, adaptive=adaptive, **SGD_OPTIONS)
    two_step(model_a, FriendlySAM(model_a.parameters(), torch.optim.SGD, sigma=0.0, form=form, **options), data)
    two_step(model_b, SAM(model_b.parameters(), torch.optim.SGD, **options), data)
    assert same(model_a, model_b)


def test_first_step_of_the_code_form_is_sam_and_sets_m_to_g():
    model, (x, y) = mlp(), batch()
    reference = mlp()
    opt = FriendlySAM(model.parameters(), torch.optim.SGD, **RULE, lr=0.1)
    ref = SAM(reference.parameters(), torch.optim.SGD, rho=RULE["rho"], lr=0.1)
    g = gradients(model, dict(model.named_parameters()), x, y)
    two_step(model, opt, [(x, y)])
    two_step(reference, ref, [(x, y)])
    assert same(model, reference)
    assert all(torch.equal(m, g[k]) for m, (k, _) in zip(opt._step.memory["m"], model.named_parameters()))


def test_closure_api_equals_two_step_api():
    data = batches(4)
    model_a, model_b = mlp(), mlp()
    opt_a = FriendlySAM(model_a.parameters(), torch.optim.SGD, **RULE, **SGD_OPTIONS)
    opt_b = FriendlySAM(model_b.parameters(), torch.optim.SGD, **RULE, **SGD_OPTIONS)
    two_step(model_a, opt_a, data)
    calls = []
    for x, y in data:

        def closure(x=x, y=y):
            calls.append(1)
            opt_b.zero_grad()
            loss = loss_fn(model_b(x), y)
            loss.backward()
            return loss

        opt_b.step(closure)
    assert same(model_a, model_b)
    assert len(calls) == 8  # two passes per step


@pytest.mark.parametrize("form", ["code", "paper"])
def test_sam_step_one_micro_batch_equals_the_two_step_api_exactly(form):
    data = batches(4)
    model_a, model_b = mlp(), mlp()
    opt_a = FriendlySAM(model_a.parameters(), torch.optim.SGD, form=form, **RULE, **SGD_OPTIONS)
    opt_b = FriendlySAM(model_b.parameters(), torch.optim.SGD, form=form, **RULE, **SGD_OPTIONS)
    two_step(model_a, opt_a, data)
    for x, y in data:
        sam_step(opt_b, model_b, loss_fn, x, y, micro_batches=1)
    assert same(model_a, model_b)


@pytest.mark.parametrize("form", ["code", "paper"])
def test_micro_batches_each_ascend_from_the_previous_ema(form):
    model, data = mlp(), batches(4, n=18)  # micro-batches of 5, 5, 4, 4: the weights matter
    expected = reference_fsam_sgd(model, data, form=form, micro_batches=4, **RULE, **SGD_OPTIONS)
    opt = FriendlySAM(model.parameters(), torch.optim.SGD, form=form, **RULE, **SGD_OPTIONS)
    for x, y in data:
        sam_step(opt, model, loss_fn, x, y, micro_batches=4, perturbation="per_micro_batch")
    assert max_diff(model, expected) <= 1e-12
    assert opt.passes == 8.0 and opt.steps == 4 and opt.sam_steps == 4  # passes count whole-batch passes
    whole = reference_fsam_sgd(mlp(), data, form=form, **RULE, **SGD_OPTIONS)
    assert max_diff(model, whole) > 1e-6  # per-micro-batch ascents differ from one ascent


def test_shared_perturbation_is_fsam_on_the_whole_batch():
    model, data = mlp(), batches(3)
    expected = reference_fsam_sgd(model, data, form="code", **RULE, **SGD_OPTIONS)
    opt = FriendlySAM(model.parameters(), torch.optim.SGD, **RULE, **SGD_OPTIONS)
    for x, y in data:
        sam_step(opt, model, loss_fn, x, y, micro_batches=4, perturbation="shared")
    assert max_diff(model, expected) <= 1e-12


def test_vmap_backend_is_refused():
    model, (x, y) = mlp(), batch()
    opt = FriendlySAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="backend='vmap' cannot run FriendlySAM"):
        sam_step(opt, model, loss_fn, x, y, micro_batches=2, backend="vmap")
    assert opt.steps == 0


@pytest.mark.parametrize("form", ["code", "paper"])
def test_state_dict_round_trip_continues_bit_exactly(form):
    data = batches(5)
    options = dict(form=form, **RULE, lr=1e-2)
    straight = mlp()
    two_step(straight, FriendlySAM(straight.parameters(), torch.optim.Adam, **options), data)

    first = mlp()
    opt1 = FriendlySAM(first.parameters(), torch.optim.Adam, **options)
    two_step(first, opt1, data[:3])
    state = opt1.state_dict()
    snapshot = copy.deepcopy(state)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": state}, buffer)
    two_step(first, opt1, data[3:])  # training on must not change a state dict already taken
    assert all(torch.equal(a, b) for a, b in zip(state["sam"]["memory"]["m"], snapshot["sam"]["memory"]["m"]))
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert len(saved["opt"]["sam"]["memory"]["m"]) == len(list(first.parameters()))

    resumed = mlp(seed=5)
    resumed.load_state_dict(saved["model"])
    opt2 = FriendlySAM(resumed.parameters(), torch.optim.Adam, **options)
    opt2.load_state_dict(saved["opt"])
    two_step(resumed, opt2, data[3:])
    assert same(straight, resumed)

    # without the EMA the continuation differs: the round trip above is not vacuous
    forgetful = mlp(seed=5)
    forgetful.load_state_dict(saved["model"])
    opt3 = FriendlySAM(forgetful.parameters(), torch.optim.Adam, **options)
    opt3.load_state_dict(saved["opt"])
    opt3._step.memory.clear()
    two_step(forgetful, opt3, data[3:])
    assert not same(straight, forgetful)


@pytest.mark.parametrize("name,value", [("sigma", 0.5), ("lmbda", 0.5), ("form", "paper")])
def test_resume_with_other_options_is_refused(name, value):
    model = mlp()
    state = FriendlySAM(model.parameters(), torch.optim.SGD, lr=0.1).state_dict()
    other = FriendlySAM(model.parameters(), torch.optim.SGD, lr=0.1, **{name: value})
    with pytest.raises(ValueError, match=f"saved with {name}="):
        other.load_state_dict(state)


def test_cancel_step_leaves_the_ema():
    model, data = mlp(), batches(2)
    opt = FriendlySAM(model.parameters(), torch.optim.SGD, **RULE, lr=0.1)
    two_step(model, opt, data[:1])
    before = [m.clone() for m in opt._step.memory["m"]]
    x, y = data[1]
    loss_fn(model(x), y).backward()
    opt.first_step(zero_grad=True)
    opt.cancel_step()
    assert all(torch.equal(a, b) for a, b in zip(before, opt._step.memory["m"]))
    assert opt.steps == 1 and opt.passes == 2.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sigma=-0.5), "sigma must be .* got -0.5"),
        (dict(sigma=float("nan")), "sigma must be .* got nan"),
        (dict(sigma=float("inf")), "sigma must be .* got inf"),
        (dict(sigma=True), "sigma must be .* got True"),
        (dict(lmbda=1.5), r"lmbda must be in \[0, 1\].* got 1.5"),
        (dict(lmbda=-0.1), r"lmbda must be in \[0, 1\].* got -0.1"),
        (dict(lmbda="0.9"), r"lmbda must be in \[0, 1\].* got '0.9'"),
        (dict(form="both"), "form must be one of .* got 'both'"),
        (dict(rho=-1.0), "rho must be .* got -1.0"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FriendlySAM(mlp().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_interval_is_not_an_option():
    with pytest.raises(TypeError, match="does not take 'interval'"):
        FriendlySAM(mlp().parameters(), torch.optim.SGD, lr=0.1, interval=2)


def test_passes_count_two_per_step():
    model, data = mlp(), batches(3)
    opt = FriendlySAM(model.parameters(), torch.optim.SGD, lr=0.1)
    two_step(model, opt, data)
    assert (opt.steps, opt.sam_steps, opt.passes) == (3, 3, 6.0)
