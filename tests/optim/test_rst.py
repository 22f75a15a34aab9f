"""samkit.optim.rst.RandomSAM (RST) against a plain float64 reference, its draws, its schedules and its checkpoints."""

from __future__ import annotations

import io
import math

import pytest
import torch

from samkit import SAM, sam_step
from samkit.optim.rst import RandomSAM
from tests.optim.reference import batch, gradients, loss_fn, max_diff, mlp

OPTIONS = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
RHO = 0.1


def reference(model, x, y, decisions, *, micro_batches=1, shared=False):
    """SAM / mSAM steps where decisions[t] is True, plain SGD steps with the clean batch gradient elsewhere, written
    out from SAM's eq. 2-3, the mSAM definition and torch's SGD (momentum, coupled weight decay)."""
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {}
    n = len(x)
    chunks = list(zip(torch.tensor_split(x, micro_batches), torch.tensor_split(y, micro_batches)))

    def epsilon(g):
        norm = torch.sqrt(sum((v**2).sum() for v in g.values()))
        return {k: RHO * v / (norm + 1e-12) for k, v in g.items()}

    def batch_gradient(at):
        parts = [(len(xj) / n, gradients(model, at, xj, yj)) for xj, yj in chunks]
        return {k: sum(weight * g[k] for weight, g in parts) for k in w}

    for sam in decisions:
        if not sam:
            total = batch_gradient(w)
        else:
            total = {k: torch.zeros_like(v) for k, v in w.items()}
            if shared:
                e = epsilon(batch_gradient(w))
            for xj, yj in chunks:
                if not shared:
                    e = epsilon(gradients(model, w, xj, yj))
                g2 = gradients(model, {k: w[k] + e[k] for k in w}, xj, yj)
                total = {k: total[k] + len(xj) / n * g2[k] for k in w}
        for k in w:
            d = total[k] + OPTIONS["weight_decay"] * w[k]
            buffers[k] = d.clone() if k not in buffers else OPTIONS["momentum"] * buffers[k] + d
            w[k] = w[k] - OPTIONS["lr"] * buffers[k]
    return w


def expected_draws(seed, probabilities):
    """The documented rule: one float64 torch.rand draw per step from a generator seeded with `seed`; SAM if u < p_t."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand((), generator=generator, dtype=torch.float64).item() < p for p in probabilities]


def two_step(model, opt, x, y, steps):
    """The two-step API, the second pass only when first_step says so; returns the decisions."""
    decisions = []
    for _ in range(steps):
        loss_fn(model(x), y).backward()
        sam = opt.first_step(zero_grad=True)
        if sam:
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)
        decisions.append(sam)
    return decisions


def same(model_a, model_b):
    return all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters()))


def rst(model, **kwargs):
    return RandomSAM(model.parameters(), torch.optim.SGD, rho=RHO, **{**OPTIONS, **kwargs})


@pytest.mark.parametrize("foreach", [True, False])
def test_equals_the_reference_and_the_documented_draws(foreach):
    model, (x, y) = mlp(), batch()
    opt = rst(model, prob=0.5, seed=3, foreach=foreach)
    decisions = two_step(model, opt, x, y, 8)
    assert decisions == expected_draws(3, [0.5] * 8)
    assert 0 < sum(decisions) < 8  # both kinds of step occur: the comparison covers both
    assert max_diff(model, reference(mlp(), x, y, decisions)) <= 1e-12  # float64, 8 steps
    assert opt.steps == 8 and opt.sam_steps == sum(decisions) and opt.passes == 8 + sum(decisions)


def test_prob_one_is_sam_bit_for_bit():
    (x, y), model_a, model_b = batch(), mlp(), mlp()
    opt = rst(model_a, prob=1.0, seed=5)
    sam = SAM(model_b.parameters(), torch.optim.SGD, rho=RHO, **OPTIONS)
    assert two_step(model_a, opt, x, y, 5) == [True] * 5
    two_step(model_b, sam, x, y, 5)
    assert same(model_a, model_b) and opt.passes == 10


def test_prob_zero_is_the_base_optimizer_bit_for_bit_with_one_pass_per_step():
    (x, y), model_a, model_b, model_c = batch(), mlp(), mlp(), mlp()
    opt = rst(model_a, prob=0.0, seed=5)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = loss_fn(model_a(x), y)
        loss.backward()
        return loss

    for _ in range(5):
        assert opt.will_perturb is False
        opt.step(closure)
    base = torch.optim.SGD(model_b.parameters(), **OPTIONS)
    for _ in range(5):
        loss_fn(model_b(x), y).backward()
        base.step()
        base.zero_grad()
    assert same(model_a, model_b)
    assert len(calls) == 5 and opt.passes == 5 and opt.sam_steps == 0
    # the two-step API with a loop that always runs its second pass: the clean gradient still counts once
    opt_c = rst(model_c, prob=0.0)
    for _ in range(5):
        loss_fn(model_c(x), y).backward()
        assert opt_c.first_step(zero_grad=True) is False
        loss_fn(model_c(x), y).backward()
        opt_c.second_step(zero_grad=True)
    assert same(model_c, model_b) and opt_c.passes == 5


def _count_sam_steps(steps, **kwargs):
    """Decisions over many steps, cheaply: a parameter without gradient (nothing moves, nothing is computed)."""
    opt = RandomSAM([torch.nn.Parameter(torch.zeros(1))], torch.optim.SGD, lr=0.1, **kwargs)
    decisions = []
    for _ in range(steps):
        decisions.append(opt.first_step())
        opt.second_step()
    return decisions


@pytest.mark.parametrize(
    "kwargs,probability",
    [
        (dict(prob=0.3), lambda t, T: 0.3),
        (dict(prob=0.1, prob_end=0.9, schedule="linear"), lambda t, T: 0.1 + 0.8 * t / T),
        (dict(prob=0.9, prob_end=0.2, schedule="cosine"), lambda t, T: 0.2 + 0.7 * (1 + math.cos(math.pi * t / T)) / 2),
    ],
)
def test_the_fraction_of_sam_steps_follows_p_t(kwargs, probability):
    """Over each half of T = 3000 steps the count of SAM steps is within 5 standard deviations of sum p_t (for a
    Binomial-like count, sd = sqrt(sum p_t (1 - p_t)): a chance failure is below 1e-6 for any seed)."""
    T = 3000
    decisions = _count_sam_steps(T, total_steps=T if "schedule" in kwargs else None, seed=11, **kwargs)
    for part in (range(0, T // 2), range(T // 2, T)):
        p = [probability(t, T) for t in part]
        expected, sd = sum(p), math.sqrt(sum(q * (1 - q) for q in p))
        assert abs(sum(decisions[t] for t in part) - expected) <= 5 * sd


def test_schedule_reaches_prob_end_and_stays_there():
    decisions = _count_sam_steps(30, prob=1.0, prob_end=0.0, schedule="linear", total_steps=10)
    assert decisions[0] is True  # p_0 = 1
    assert not any(decisions[10:])  # p_t = 0 from t = T on


def test_two_step_and_closure_api_agree():
    (x, y), model_a, model_b = batch(), mlp(), mlp()
    opt_a, opt_b = rst(model_a, seed=2), rst(model_b, seed=2)
    decisions = two_step(model_a, opt_a, x, y, 6)
    calls = []

    def closure():
        calls.append(1)
        opt_b.zero_grad()
        loss = loss_fn(model_b(x), y)
        loss.backward()
        return loss

    for _ in range(6):
        opt_b.step(closure)
    assert 0 < sum(decisions) < 6 and same(model_a, model_b)
    assert len(calls) == 6 + sum(decisions) == opt_b.passes


@pytest.mark.parametrize("mode", ["per_micro_batch", "shared"])
def test_sam_step_one_micro_batch_equals_the_two_step_api(mode):
    (x, y), model_a, model_b = batch(), mlp(), mlp()
    opt_a, opt_b = rst(model_a, seed=4), rst(model_b, seed=4)
    decisions = two_step(model_a, opt_a, x, y, 6)
    for _ in range(6):
        sam_step(opt_b, model_b, loss_fn, x, y, micro_batches=1, perturbation=mode)
    assert 0 < sum(decisions) < 6 and same(model_a, model_b) and opt_b.passes == 6 + sum(decisions)


@pytest.mark.parametrize("mode", ["per_micro_batch", "shared"])
def test_sam_step_two_micro_batches_equals_the_reference(mode):
    model, (x, y) = mlp(), batch()
    opt = rst(model, seed=4)
    decisions = []
    for _ in range(6):
        before = opt.sam_steps
        sam_step(opt, model, loss_fn, x, y, micro_batches=2, perturbation=mode)
        decisions.append(opt.sam_steps > before)
    assert decisions == expected_draws(4, [0.5] * 6) and 0 < sum(decisions) < 6
    expected = reference(mlp(), x, y, decisions, micro_batches=2, shared=mode == "shared")
    assert max_diff(model, expected) <= 1e-12  # float64, 6 steps
    assert opt.passes == 6 + sum(decisions)


def test_will_perturb_and_the_decision_agree_and_a_cancelled_step_draws_nothing():
    (x, y), model_a, model_b = batch(), mlp(), mlp()
    opt_a, opt_b = rst(model_a, seed=9), rst(model_b, seed=9)
    straight = two_step(model_a, opt_a, x, y, 6)
    decisions = []
    for t in range(6):
        plan = opt_b.will_perturb
        assert opt_b.will_perturb is plan and opt_b.is_sam_step is plan  # asking again draws nothing
        loss_fn(model_b(x), y).backward()
        if t == 2:  # abandon this step once (an overflow): the retry has the same decision
            assert opt_b.first_step(zero_grad=True) is plan
            opt_b.cancel_step()
            opt_b.zero_grad()
            assert opt_b.will_perturb is plan
            loss_fn(model_b(x), y).backward()
        assert opt_b.first_step(zero_grad=True) is plan
        if plan:
            loss_fn(model_b(x), y).backward()
        opt_b.second_step(zero_grad=True)
        decisions.append(plan)
    assert decisions == straight and same(model_a, model_b)


@pytest.mark.parametrize("peek", [False, True])
def test_state_dict_round_trip_continues_bit_exactly(peek):
    """10 steps straight = 4 steps, checkpoint, a fresh optimizer and model loaded from it, 6 steps."""
    (x, y) = batch()
    options = dict(prob=0.8, prob_end=0.2, schedule="linear", total_steps=10, seed=6)
    straight = mlp()
    expected = two_step(straight, rst(straight, **options), x, y, 10)
    assert expected == expected_draws(6, [0.8 - 0.6 * t / 10 for t in range(10)]) and len(set(expected[4:])) == 2

    first = mlp()
    opt1 = rst(first, **options)
    decisions = two_step(first, opt1, x, y, 4)
    if peek:  # the coming step drawn before the checkpoint: its draw must travel too
        assert opt1.will_perturb is expected[4]
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = mlp(seed=5)  # other initial weights: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt2 = rst(resumed, **options)
    opt2.load_state_dict(saved["opt"])
    decisions += two_step(resumed, opt2, x, y, 6)
    assert decisions == expected and same(straight, resumed)
    assert opt2.steps == 10 and opt2.passes == 10 + sum(expected)
    with pytest.raises(ValueError, match="seed=6.*seed=7"):
        rst(mlp(), **{**options, "seed": 7}).load_state_dict(saved["opt"])


def test_replicas_with_the_same_seed_draw_the_same():
    """What DDP relies on: the draws depend on the seed and the step index alone, not on the data a replica sees
    nor on the global RNG, so replicas built with the same seed take the same decisions without communicating."""
    (x, y), models = batch(n=24), [mlp(), mlp()]
    opts = [rst(m, seed=8) for m in models]
    decisions = [[], []]
    for _ in range(6):
        for rank, (model, opt) in enumerate(zip(models, opts)):
            torch.rand(rank + 1)  # replicas consume the global RNG differently (dropout, augmentation)
            before = opt.sam_steps
            half = slice(rank * 12, (rank + 1) * 12)
            sam_step(opt, model, loss_fn, x[half], y[half])
            decisions[rank].append(opt.sam_steps > before)
    assert decisions[0] == decisions[1] == expected_draws(8, [0.5] * 6) and 0 < sum(decisions[0]) < 6
    assert not same(*models)  # the replicas did see different data


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prob=1.5), "prob must be .*\\[0, 1\\].* got 1.5"),
        (dict(prob=-0.1), "prob must be .* got -0.1"),
        (dict(prob=float("nan")), "prob must be .* got nan"),
        (dict(prob=True), "prob must be .* got True"),
        (dict(schedule="step"), "schedule must be one of .* got 'step'"),
        (dict(prob_end=0.2), "prob_end=0.2 needs a schedule"),
        (dict(schedule="linear", total_steps=10), "needs prob_end.* got None"),
        (dict(schedule="linear", prob_end=2.0, total_steps=10), "prob_end must be .* got 2.0"),
        (dict(schedule="cosine", prob_end=0.2), "needs total_steps.* got None"),
        (dict(schedule="linear", prob_end=0.2, total_steps=0), "total_steps must be .* got 0"),
        (dict(total_steps=2.5), "total_steps must be .* got 2.5"),
        (dict(seed=-1), "seed must be .* got -1"),
        (dict(seed="0"), "seed must be .* got '0'"),
        (dict(rho=-1.0), "rho must be .* got -1.0"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RandomSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_sam_options_of_its_own_are_refused():
    with pytest.raises(TypeError, match="does not take 'interval'"):
        RandomSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, interval=2)
