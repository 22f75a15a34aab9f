"""samkit.optim.late_sam.LateSAM: the base optimizer, then SAM from an exact step on; against SGD, SAM, a reference."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from samkit import SAM, sam_step
from samkit.optim.late_sam import LateSAM
from tests.optim.reference import batch, gradients, loss_fn, max_diff, mlp

OPTIONS = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
RHO = 0.1


def reference(model, x, y, steps, start, *, micro_batches=1, shared=False, reset=False):
    """SGD(momentum, weight decay) with the clean batch gradient for t < start, SAM / mSAM for t >= start, written
    out from SAM's eq. 2-3, the mSAM definition and torch's SGD; ``reset`` zeroes the momentum at the switch."""
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers, n = {}, len(x)
    chunks = list(zip(torch.tensor_split(x, micro_batches), torch.tensor_split(y, micro_batches)))

    def epsilon(g):
        norm = torch.sqrt(sum((v**2).sum() for v in g.values()))
        return {k: RHO * v / (norm + 1e-12) for k, v in g.items()}

    def batch_gradient(at):
        return {k: sum(len(xj) / n * gradients(model, at, xj, yj)[k] for xj, yj in chunks) for k in w}

    for t in range(steps):
        if t < start:
            total = batch_gradient(w)
        else:
            if reset and t == start:
                buffers = {}
            total = {k: torch.zeros_like(v) for k, v in w.items()}
            e = epsilon(batch_gradient(w)) if shared else None
            for xj, yj in chunks:
                ej = e if shared else epsilon(gradients(model, w, xj, yj))
                g2 = gradients(model, {k: w[k] + ej[k] for k in w}, xj, yj)
                total = {k: total[k] + len(xj) / n * g2[k] for k in w}
        for k in w:
            d = total[k] + OPTIONS["weight_decay"] * w[k]
            buffers[k] = d.clone() if k not in buffers else OPTIONS["momentum"] * buffers[k] + d
            w[k] = w[k] - OPTIONS["lr"] * buffers[k]
    return w


def late(model, **kwargs):
    return LateSAM(model.parameters(), torch.optim.SGD, rho=RHO, **{**OPTIONS, **kwargs})


def two_step(model, opt, x, y, steps):
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


def test_switches_at_the_exact_step():
    """total_steps = 8, sam_fraction = 0.25: steps 0..5 one pass, steps 6 and 7 SAM."""
    model, (x, y) = mlp(), batch()
    opt = late(model, total_steps=8, sam_fraction=0.25)
    assert opt.start_step == 6
    calls, plans, decisions = [], [], []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    for _ in range(8):
        plans.append(opt.will_perturb)  # known before the clean pass
        before = opt.sam_steps
        opt.step(closure)
        decisions.append(opt.sam_steps > before)
    assert plans == decisions == [False] * 6 + [True] * 2
    assert len(calls) == opt.passes == 8 + 2 and opt.sam_steps == 2


@pytest.mark.parametrize("total_steps,fraction,start", [(160, None, 150), (1000, 0.1, 900), (7, 0.5, 3), (5, 1.0, 0)])
def test_the_switch_from_a_fraction(total_steps, fraction, start):
    """total_steps - round(fraction * total_steps); the default fraction is 10 of 160 (the authors' script)."""
    assert late(mlp(), total_steps=total_steps, sam_fraction=fraction).start_step == start


def test_before_the_switch_the_base_optimizer_after_it_sam_bit_for_bit():
    (x, y), model, base_model = batch(), mlp(), mlp()
    opt = late(model, start_step=4)
    base = torch.optim.SGD(base_model.parameters(), **OPTIONS)
    for t in range(4):
        assert two_step(model, opt, x, y, 1) == [False]
        loss_fn(base_model(x), y).backward()
        base.step()
        base.zero_grad()
        assert same(model, base_model), t
    assert opt.passes == 4
    # from here on: a SAM started from the same weights and the same base state (the momentum buffers)
    sam_model = copy.deepcopy(model)
    sam = SAM(sam_model.parameters(), torch.optim.SGD, rho=RHO, **OPTIONS)
    sam.base_optimizer.load_state_dict(copy.deepcopy(opt.base_optimizer.state_dict()))
    assert two_step(model, opt, x, y, 3) == [True] * 3
    two_step(sam_model, sam, x, y, 3)
    assert same(model, sam_model) and opt.passes == 4 + 6


def test_reset_base_state_starts_sam_with_a_fresh_base_optimizer():
    """The authors' two-optimizer script: after the switch, a SAM with its own new SGD from the weights there."""
    (x, y), model = batch(), mlp()
    opt = late(model, start_step=3, reset_base_state=True)
    two_step(model, opt, x, y, 3)
    sam_model = copy.deepcopy(model)
    sam = SAM(sam_model.parameters(), torch.optim.SGD, rho=RHO, **OPTIONS)
    two_step(model, opt, x, y, 3)
    two_step(sam_model, sam, x, y, 3)
    assert same(model, sam_model)
    assert max_diff(model, reference(mlp(), x, y, 6, 3, reset=True)) <= 1e-12  # float64, 6 steps
    kept = mlp()
    two_step(kept, late(kept, start_step=3), x, y, 6)
    assert not same(model, kept)  # keeping the momentum across the switch is another run


@pytest.mark.parametrize("foreach", [True, False])
def test_equals_the_reference(foreach):
    model, (x, y) = mlp(), batch()
    assert two_step(model, late(model, start_step=3, foreach=foreach), x, y, 6) == [False] * 3 + [True] * 3
    assert max_diff(model, reference(mlp(), x, y, 6, 3)) <= 1e-12  # float64, 6 steps


def test_start_zero_is_sam_and_fraction_zero_is_the_base_optimizer():
    (x, y), a, b, c, d = batch(), mlp(), mlp(), mlp(), mlp()
    two_step(a, late(a, start_step=0), x, y, 4)
    two_step(b, SAM(b.parameters(), torch.optim.SGD, rho=RHO, **OPTIONS), x, y, 4)
    assert same(a, b)
    opt = late(c, total_steps=4, sam_fraction=0.0)
    assert two_step(c, opt, x, y, 4) == [False] * 4 and opt.passes == 4
    base = torch.optim.SGD(d.parameters(), **OPTIONS)
    for _ in range(4):
        loss_fn(d(x), y).backward()
        base.step()
        base.zero_grad()
    assert same(c, d)


def test_two_step_and_closure_api_agree():
    (x, y), model_a, model_b = batch(), mlp(), mlp()
    opt_a, opt_b = late(model_a, start_step=3), late(model_b, start_step=3)
    two_step(model_a, opt_a, x, y, 6)

    def closure():
        opt_b.zero_grad()
        loss = loss_fn(model_b(x), y)
        loss.backward()
        return loss

    for _ in range(6):
        opt_b.step(closure)
    assert same(model_a, model_b) and opt_a.passes == opt_b.passes == 9


@pytest.mark.parametrize("mode", ["per_micro_batch", "shared"])
def test_sam_step(mode):
    """k = 1 equals the two-step API bit for bit; k = 2 equals the mSAM (or shared-ε̂) reference."""
    (x, y), model_a, model_b, model_c = batch(), mlp(), mlp(), mlp()
    opt_a, opt_b, opt_c = (late(m, start_step=3) for m in (model_a, model_b, model_c))
    two_step(model_a, opt_a, x, y, 6)
    for _ in range(6):
        sam_step(opt_b, model_b, loss_fn, x, y, micro_batches=1, perturbation=mode)
        sam_step(opt_c, model_c, loss_fn, x, y, micro_batches=2, perturbation=mode)
    assert same(model_a, model_b)
    expected = reference(mlp(), x, y, 6, 3, micro_batches=2, shared=mode == "shared")
    assert max_diff(model_c, expected) <= 1e-12  # float64, 6 steps
    assert opt_b.passes == opt_c.passes == 9 and opt_c.sam_steps == 3


@pytest.mark.parametrize("start,reset", [(4, False), (3, True), (2, False)])
def test_state_dict_round_trip_across_the_switch(start, reset):
    """5 steps straight = 3 steps, checkpoint, a fresh optimizer and model loaded from it, 2 steps: with the switch
    after the checkpoint, exactly at the first resumed step (the reset happens after resuming), and before it."""
    (x, y) = batch()
    options = dict(start_step=start, reset_base_state=reset)
    straight = mlp()
    expected = two_step(straight, late(straight, **options), x, y, 5)

    first = mlp()
    opt1 = late(first, **options)
    decisions = two_step(first, opt1, x, y, 3)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = mlp(seed=5)  # other initial weights: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt2 = late(resumed, **options)
    opt2.load_state_dict(saved["opt"])
    decisions += two_step(resumed, opt2, x, y, 2)
    assert decisions == expected == [t >= start for t in range(5)]
    assert same(straight, resumed) and opt2.passes == 5 + sum(expected)
    with pytest.raises(ValueError, match=f"start_step={start}.*start_step={start + 1}"):
        late(mlp(), **{**options, "start_step": start + 1}).load_state_dict(saved["opt"])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(), "needs the switch point"),
        (dict(start_step=-1), "start_step must be .* got -1"),
        (dict(start_step=2.0), "start_step must be .* got 2.0"),
        (dict(start_step=True), "start_step must be .* got True"),
        (dict(start_step=5, total_steps=10), "give the switch once: start_step=5"),
        (dict(start_step=5, sam_fraction=0.1), "give the switch once: start_step=5"),
        (dict(sam_fraction=0.1), "needs the switch point.* sam_fraction=0.1"),
        (dict(total_steps=0), "total_steps must be .* got 0"),
        (dict(total_steps=10, sam_fraction=1.5), "sam_fraction must be in \\[0, 1\\].* got 1.5"),
        (dict(total_steps=10, sam_fraction=-0.1), "sam_fraction must be .* got -0.1"),
        (dict(start_step=3, reset_base_state=1), "reset_base_state must be True or False, got 1"),
        (dict(start_step=3, rho=-1.0), "rho must be .* got -1.0"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LateSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_interval_is_refused():
    with pytest.raises(TypeError, match="does not take 'interval'"):
        LateSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, start_step=3, interval=2)
