"""samkit.optim.aesam.AESAM against a plain float64 reference of its rule, on recorded gradients and in training."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from samkit import sam_step
from samkit.optim.aesam import AESAM
from tests.optim.reference import batch, gradients, loss_fn, max_diff, mlp

OPTIONS = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
RHO = 0.1
STEPS = 8  # T: c_t runs from lambda2 = 1 to lambda1 = -1 over these steps
DELTA = 0.5  # the EMAs settle within 8 steps (the paper's 0.9 is tested on recorded gradients below)
BATCHES = [batch(seed=t + 1) for t in range(STEPS)]  # a new batch each step: ||g||² goes up and down


def reference_decisions(squared_norms, *, total_steps, delta=0.9, lambda1=-1.0, lambda2=1.0):
    """The rule written out: mu, var updated with this step's ||g||² first, then ||g||² >= mu + c_t sqrt(var)."""
    mean, variance, decisions = 0.0, math.exp(-10.0), []
    for t, s in enumerate(squared_norms):
        mean = delta * mean + (1 - delta) * s
        variance = delta * variance + (1 - delta) * (s - mean) ** 2
        c = min(t, total_steps) / total_steps * lambda1 + (1 - min(t, total_steps) / total_steps) * lambda2
        decisions.append(s >= mean + c * math.sqrt(variance))
    return decisions


def reference_training(model, batches, *, micro_batches=1, shared=False):
    """AE-SAM around SGD(momentum, weight decay) in float64: the decision from the whole batch's clean gradient,
    then mSAM (or one shared ε̂) on a SAM step, the clean gradient on the others. Returns (weights, decisions)."""
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {}
    mean, variance, decisions = 0.0, math.exp(-10.0), []

    def epsilon(g):
        norm = torch.sqrt(sum((v**2).sum() for v in g.values()))
        return {k: RHO * v / (norm + 1e-12) for k, v in g.items()}

    for t, (x, y) in enumerate(batches):
        n = len(x)
        chunks = list(zip(torch.tensor_split(x, micro_batches), torch.tensor_split(y, micro_batches)))
        g = {k: sum(len(xj) / n * gradients(model, w, xj, yj)[k] for xj, yj in chunks) for k in w}
        s = sum((v**2).sum() for v in g.values()).item()
        mean = DELTA * mean + (1 - DELTA) * s
        variance = DELTA * variance + (1 - DELTA) * (s - mean) ** 2
        sam = s >= mean + (t / STEPS * -1.0 + (1 - t / STEPS) * 1.0) * math.sqrt(variance)
        decisions.append(sam)
        if not sam:
            total = g
        else:
            total = {k: torch.zeros_like(v) for k, v in w.items()}
            e = epsilon(g) if shared else None
            for xj, yj in chunks:
                ej = e if shared else epsilon(gradients(model, w, xj, yj))
                g2 = gradients(model, {k: w[k] + ej[k] for k in w}, xj, yj)
                total = {k: total[k] + len(xj) / n * g2[k] for k in w}
        for k in w:
            d = total[k] + OPTIONS["weight_decay"] * w[k]
            buffers[k] = d.clone() if k not in buffers else OPTIONS["momentum"] * buffers[k] + d
            w[k] = w[k] - OPTIONS["lr"] * buffers[k]
    return w, decisions


def aesam(model, **kwargs):
    return AESAM(
        model.parameters(), torch.optim.SGD, rho=RHO, **{**OPTIONS, "total_steps": STEPS, "delta": DELTA, **kwargs}
    )


def two_step(model, opt, batches):
    decisions = []
    for x, y in batches:
        loss_fn(model(x), y).backward()
        sam = opt.first_step(zero_grad=True)
        if sam:
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)
        decisions.append(sam)
    return decisions


def same(model_a, model_b):
    return all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters()))


def recorded_gradients(steps, seed=0):
    """A fixed sequence of gradients for two tensors (one of them sometimes without a gradient), norms varying."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.rand(steps, generator=g, dtype=torch.float64) * 3 + 0.2
    first = [torch.randn(3, 4, generator=g, dtype=torch.float64) * s for s in scales]
    second = [torch.randn(5, generator=g, dtype=torch.float64) * s for s in scales]
    second = [None if t % 5 == 4 else s for t, s in enumerate(second)]
    return first, second


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("delta,lambda1,lambda2", [(0.9, -1.0, 1.0), (0.6, 0.5, -0.5)])
def test_decisions_equal_the_reference_on_recorded_gradients(foreach, delta, lambda1, lambda2):
    steps = 60
    first, second = recorded_gradients(steps)
    a = torch.nn.Parameter(torch.zeros(3, 4, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    opt = AESAM(
        [a, b], torch.optim.SGD, lr=0.0, total_steps=40, delta=delta, lambda1=lambda1, lambda2=lambda2, foreach=foreach
    )  # T = 40 < 60 steps: c_t stays at lambda1 after T
    decisions = []
    for t in range(steps):
        assert opt.will_perturb is None  # the rule needs g
        a.grad, b.grad = first[t].clone(), None if second[t] is None else second[t].clone()
        sam = opt.first_step(zero_grad=True)
        if sam:
            a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
        opt.second_step(zero_grad=True)
        decisions.append(sam)
    squared = [(f**2).sum().item() + (0.0 if s is None else (s**2).sum().item()) for f, s in zip(first, second)]
    expected = reference_decisions(squared, total_steps=40, delta=delta, lambda1=lambda1, lambda2=lambda2)
    assert decisions == expected
    assert 5 < sum(decisions) < steps - 5  # both kinds of step, many times
    assert opt.steps == steps and opt.sam_steps == sum(decisions) and opt.passes == steps + sum(decisions)


@pytest.mark.parametrize("foreach", [True, False])
def test_training_equals_the_reference(foreach):
    model = mlp()
    decisions = two_step(model, aesam(model, foreach=foreach), BATCHES)
    expected, expected_decisions = reference_training(mlp(), BATCHES)
    assert decisions == expected_decisions and 0 < sum(decisions) < STEPS
    assert max_diff(model, expected) <= 1e-12  # float64, 8 steps


def test_two_step_and_closure_api_agree():
    model_a, model_b = mlp(), mlp()
    opt_a, opt_b = aesam(model_a), aesam(model_b)
    decisions = two_step(model_a, opt_a, BATCHES)
    calls = []
    for x, y in BATCHES:

        def closure(x=x, y=y):
            calls.append(1)
            opt_b.zero_grad()
            loss = loss_fn(model_b(x), y)
            loss.backward()
            return loss

        opt_b.step(closure)
    assert 0 < sum(decisions) < STEPS and same(model_a, model_b)
    assert len(calls) == STEPS + sum(decisions) == opt_b.passes


@pytest.mark.parametrize("mode", ["per_micro_batch", "shared"])
def test_sam_step_one_micro_batch_equals_the_two_step_api(mode):
    model_a, model_b = mlp(), mlp()
    opt_a, opt_b = aesam(model_a), aesam(model_b)
    decisions = two_step(model_a, opt_a, BATCHES)
    for x, y in BATCHES:
        sam_step(opt_b, model_b, loss_fn, x, y, micro_batches=1, perturbation=mode)
    assert 0 < sum(decisions) < STEPS and same(model_a, model_b)
    assert opt_b.passes == STEPS + sum(decisions)


@pytest.mark.parametrize("backend", ["loop", "vmap"])
@pytest.mark.parametrize("mode", ["per_micro_batch", "shared"])
def test_sam_step_two_micro_batches_decides_on_the_whole_batch(mode, backend):
    model = mlp()
    opt = aesam(model)
    decisions = []
    for x, y in BATCHES:
        before = opt.sam_steps
        sam_step(opt, model, loss_fn, x, y, micro_batches=2, perturbation=mode, backend=backend)
        decisions.append(opt.sam_steps > before)
    expected, expected_decisions = reference_training(mlp(), BATCHES, micro_batches=2, shared=mode == "shared")
    assert decisions == expected_decisions and 0 < sum(decisions) < STEPS
    assert max_diff(model, expected) <= 1e-12  # float64, 8 steps
    assert opt.passes == STEPS + sum(decisions)


def test_state_dict_round_trip_continues_bit_exactly():
    straight = mlp()
    expected = two_step(straight, aesam(straight), BATCHES[:5])

    first = mlp()
    opt1 = aesam(first)
    decisions = two_step(first, opt1, BATCHES[:3])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = mlp(seed=5)  # other initial weights: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt2 = aesam(resumed)
    opt2.load_state_dict(saved["opt"])
    decisions += two_step(resumed, opt2, BATCHES[3:5])
    assert decisions == expected and len(set(expected[3:])) == 2
    assert same(straight, resumed)
    assert opt2.steps == 5 and opt2.passes == 5 + sum(expected)
    with pytest.raises(ValueError, match="delta=0.5.*delta=0.8"):
        aesam(mlp(), delta=0.8).load_state_dict(saved["opt"])


def test_the_statistics_travel_in_the_state_dict():
    """Resuming with the counters but without mu and sigma² decides otherwise: they are what the state dict carries."""
    model = mlp()
    opt = aesam(model)
    two_step(model, opt, BATCHES[:3])
    state = opt.state_dict()
    expected = two_step(copy.deepcopy(model), _loaded(model, state), BATCHES[3:5])
    state["sam"]["memory"] = {}
    assert two_step(copy.deepcopy(model), _loaded(model, state), BATCHES[3:5]) != expected


def _loaded(model, state):
    opt = aesam(model)
    opt.load_state_dict(copy.deepcopy(state))
    return opt


def test_an_abandoned_step_leaves_the_statistics_untouched():
    model_a, model_b = mlp(), mlp()
    expected = two_step(model_a, aesam(model_a), BATCHES)
    opt = aesam(model_b)
    decisions = []
    for t, (x, y) in enumerate(BATCHES):
        if t in (1, 4):  # an overflow after the decision: the loop abandons the step and retries it
            loss_fn(model_b(x * 3), y).backward()  # another gradient, so a wrongly kept update would show
            opt.decide()
            opt.cancel_step()
            opt.zero_grad()
        decisions += two_step(model_b, opt, [(x, y)])
    assert decisions == expected and same(model_a, model_b)


def test_non_finite_gradient_raises_before_the_statistics_see_it():
    model = mlp()
    opt = aesam(model)
    two_step(model, opt, BATCHES[:2])
    memory = dict(opt.state_dict()["sam"]["memory"])
    x, y = BATCHES[2]
    loss_fn(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="nan"):
        opt.first_step()
    assert opt.state_dict()["sam"]["memory"] == memory and opt.steps == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(total_steps=0), "total_steps must be .* got 0"),
        (dict(total_steps=10.0), "total_steps must be .* got 10.0"),
        (dict(delta=1.0), "delta must be in \\(0, 1\\).* got 1.0"),
        (dict(delta=0.0), "delta must be .* got 0.0"),
        (dict(lambda1=float("inf")), "lambda1 must be a finite number.* got inf"),
        (dict(lambda2="1"), "lambda2 must be a finite number.* got '1'"),
        (dict(rho=-1.0), "rho must be .* got -1.0"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AESAM(mlp().parameters(), torch.optim.SGD, lr=0.1, **{"total_steps": 10, **kwargs})


def test_total_steps_is_required_and_interval_is_refused():
    with pytest.raises(TypeError, match="total_steps"):
        AESAM(mlp().parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="does not take 'interval'"):
        AESAM(mlp().parameters(), torch.optim.SGD, lr=0.1, total_steps=10, interval=2)
