"""samkit.optim.esam.ESAM against a plain float64 reference of SWP + SDS, its draws, its selection and its cost."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from samkit import SAM, sam_step
from samkit.optim.esam import ESAM
from samkit.step import select_examples
from tests.optim.reference import batch, gradients, loss_fn, mlp

OPTIONS = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
RHO = 0.1


def per_example(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def esam(model, **kwargs):
    return ESAM(model.parameters(), torch.optim.SGD, rho=RHO, **{**OPTIONS, **kwargs})


def expected_draws(seed, beta, steps, tensors):
    """The documented rule: per step one float64 torch.rand draw per parameter tensor from a generator seeded with
    `seed`; a tensor is perturbed if its draw is < beta."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.rand(tensors, generator=generator, dtype=torch.float64) < beta).tolist() for _ in range(steps)]


def reference(model, x, y, draws, *, beta, gamma, micro_batches=1, shared=False):
    """ESAM around SGD(momentum, weight decay), written out from the rule: ε̂ on the drawn tensors with radius
    rho / beta and their norm; B+ = the ⌊gamma n⌋ largest rises ℓ(w + ε̂) - ℓ(w) (ties: lower index);
    descent = the mean gradient over B+ at w + ε̂ (mSAM: each micro-batch its own, weighted by its size)."""
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    names, buffers, n = list(w), {}, len(x)
    chunks = list(zip(torch.tensor_split(x, micro_batches), torch.tensor_split(y, micro_batches)))

    def losses(at, xs, ys):
        return F.cross_entropy(functional_call(model, at, (xs,)), ys, reduction="none")

    def epsilon(g, drawn):
        chosen = [k for k, keep in zip(names, drawn) if keep]
        norm = torch.sqrt(sum((g[k] ** 2).sum() for k in chosen)) if chosen else 0.0
        return {k: (RHO / beta) * g[k] / (norm + 1e-12) if k in chosen else torch.zeros_like(g[k]) for k in names}

    def selected(rise, m):
        return sorted(sorted(range(len(rise)), key=lambda i: (-rise[i].item(), i))[:m])

    for drawn in draws:
        total = {k: torch.zeros_like(v) for k, v in w.items()}
        if shared:
            g = {k: sum(len(xj) / n * gradients(model, w, xj, yj)[k] for xj, yj in chunks) for k in names}
            e = epsilon(g, drawn)
            at = {k: w[k] + e[k] for k in names}
            keep = selected(losses(at, x, y) - losses(w, x, y), max(1, math.floor(gamma * n + 1e-9)))
            total = gradients(model, at, x[keep], y[keep])
        else:
            for xj, yj in chunks:
                e = epsilon(gradients(model, w, xj, yj), drawn)
                at = {k: w[k] + e[k] for k in names}
                keep = selected(losses(at, xj, yj) - losses(w, xj, yj), max(1, math.floor(gamma * len(xj) + 1e-9)))
                g2 = gradients(model, at, xj[keep], yj[keep])
                total = {k: total[k] + len(xj) / n * g2[k] for k in names}
        for k in names:
            d = total[k] + OPTIONS["weight_decay"] * w[k]
            buffers[k] = d.clone() if k not in buffers else OPTIONS["momentum"] * buffers[k] + d
            w[k] = w[k] - OPTIONS["lr"] * buffers[k]
    return w


def hand_steps(model, opt, x, y, steps, *, select=True):
    """The two-step API; the second pass on select_examples' choice (on the whole batch with select=False)."""
    for _ in range(steps):
        losses = per_example(model(x), y)
        losses.mean().backward()
        if opt.first_step(zero_grad=True):
            keep = select_examples(opt, model, per_example, x, y, clean_losses=losses) if select else slice(None)
            per_example(model(x[keep]), y[keep]).mean().backward()
        opt.second_step(zero_grad=True)


def closure_steps(model, opt, x, y, steps):
    clean = {}

    def closure():
        opt.zero_grad()
        if opt.perturbed:  # the second call, at w + ε̂: the examples whose loss rose most
            keep = select_examples(opt, model, per_example, x, y, clean_losses=clean["losses"])
            loss = per_example(model(x[keep]), y[keep]).mean()
        else:
            clean["losses"] = per_example(model(x), y)
            loss = clean["losses"].mean()
        loss.backward()
        return loss

    return [opt.step(closure) for _ in range(steps)]


def same(model_a, model_b):
    return all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters()))


def max_diff(model, weights):
    return max((p.detach() - weights[k]).abs().max().item() for k, p in model.named_parameters())


def cost(gamma, n):
    """Passes of one step: the clean pass, the ranking forward (a third of a pass), the second pass on |B+| / n."""
    m = max(1, math.floor(gamma * n + 1e-9))
    return 2.0 if m == n else 1.0 + 1.0 / 3.0 + m / n


@pytest.mark.parametrize("foreach,restore_by", [(True, "copy"), (False, "copy"), (True, "swap")])
@pytest.mark.parametrize("loop", ["sam_step", "two_step"])
def test_equals_the_reference_with_the_documented_draws(foreach, restore_by, loop):
    model, (x, y) = mlp(), batch()
    opt = esam(model, beta=0.5, gamma=0.5, seed=3, foreach=foreach, restore_by=restore_by)
    if loop == "sam_step":
        for _ in range(5):
            sam_step(opt, model, per_example, x, y)
    else:
        hand_steps(model, opt, x, y, 5)
    draws = expected_draws(3, 0.5, 5, 4)
    # the draws leave tensors out and differ between steps: the comparison covers SWP
    assert any(not all(d) for d in draws) and len({tuple(d) for d in draws}) > 1
    assert max_diff(model, reference(mlp(), x, y, draws, beta=0.5, gamma=0.5)) <= 1e-12  # float64, 5 steps
    # SDS matters: the same draws with the second pass on the whole batch end elsewhere
    assert max_diff(model, reference(mlp(), x, y, draws, beta=0.5, gamma=1.0)) > 1e-6
    assert opt.steps == 5 and opt.passes == pytest.approx(5 * cost(0.5, 16), rel=1e-12)


@pytest.mark.parametrize("mode", ["per_micro_batch", "shared"])
def test_micro_batches_equal_the_reference(mode):
    model, (x, y) = mlp(), batch(n=24)
    opt = esam(model, beta=0.6, gamma=0.5, seed=1)
    for _ in range(4):
        sam_step(opt, model, per_example, x, y, micro_batches=2, perturbation=mode)
    draws = expected_draws(1, 0.6, 4, 4)
    expected = reference(mlp(), x, y, draws, beta=0.6, gamma=0.5, micro_batches=2, shared=mode == "shared")
    assert max_diff(model, expected) <= 1e-12  # float64, 4 steps
    assert opt.passes == pytest.approx(4 * cost(0.5, 24), rel=1e-12)


def test_the_ascent_moves_exactly_the_drawn_tensors_with_radius_rho_over_beta():
    model, (x, y) = mlp(), batch()
    opt = esam(model, beta=0.5, seed=3, eps=0.0)
    drawn = expected_draws(3, 0.5, 1, 4)[0]
    assert 0 < sum(drawn) < 4
    loss_fn(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    opt.first_step()
    moved = [not torch.equal(p, w) for p, w in zip(model.parameters(), before)]
    assert moved == drawn
    eps = [p.detach() - w for p, w, keep in zip(model.parameters(), before, drawn) if keep]
    norm = torch.sqrt(sum((e**2).sum() for e in eps))
    assert norm.item() == pytest.approx(RHO / 0.5, rel=1e-12)
    # along the drawn tensors' gradient: ε̂ = (rho / beta) g / ||g over the drawn tensors||
    g_norm = torch.sqrt(sum((g**2).sum() for g, keep in zip(grads, drawn) if keep))
    for e, g in zip(eps, [g for g, keep in zip(grads, drawn) if keep]):
        torch.testing.assert_close(e, RHO / 0.5 * g / g_norm, rtol=1e-10, atol=1e-15)
    opt.restore()


def test_the_second_pass_runs_on_gamma_of_the_batch():
    """What the model sees, counted by hooks: forwards (examples, with gradient?) and backwards (examples)."""
    model, (x, y) = mlp(), batch()
    forwards, backwards = [], []

    def count(module, inputs, output):
        forwards.append((len(inputs[0]), torch.is_grad_enabled()))
        if output.requires_grad:
            output.register_hook(lambda g: backwards.append(len(g)))

    model.register_forward_hook(count)
    for gamma, kept in ((0.5, 8), (0.25, 4), (1.0, 16)):
        forwards.clear()
        backwards.clear()
        opt = esam(model, beta=0.6, gamma=gamma)
        sam_step(opt, model, per_example, x, y)
        if gamma < 1:
            assert forwards == [(16, True), (16, False), (kept, True)]
        else:
            assert forwards == [(16, True), (16, True)]  # SAM's two passes, no ranking forward
        assert backwards == [16, kept]
        assert opt.passes == cost(gamma, 16)


@pytest.mark.parametrize("mode,micro_batches", [("per_micro_batch", 1), ("per_micro_batch", 2), ("shared", 2)])
def test_beta_and_gamma_one_are_sam_bit_for_bit(mode, micro_batches):
    (x, y), model_a, model_b = batch(), mlp(), mlp()
    opt = esam(model_a, beta=1.0, gamma=1.0, seed=5)
    sam = SAM(model_b.parameters(), torch.optim.SGD, rho=RHO, **OPTIONS)
    for _ in range(4):
        loss_a = sam_step(opt, model_a, per_example, x, y, micro_batches=micro_batches, perturbation=mode)
        loss_b = sam_step(sam, model_b, per_example, x, y, micro_batches=micro_batches, perturbation=mode)
        assert torch.equal(loss_a, loss_b)
    assert same(model_a, model_b) and opt.passes == sam.passes == 8.0


def test_beta_and_gamma_one_are_sam_bit_for_bit_by_hand_and_by_closure():
    (x, y), reference_model = batch(), mlp()
    sam = SAM(reference_model.parameters(), torch.optim.SGD, rho=RHO, **OPTIONS)
    hand_steps(reference_model, sam, x, y, 4, select=False)
    for run in ("hand", "hand-select", "closure"):
        model = mlp()
        opt = esam(model, beta=1.0, gamma=1.0)
        if run == "closure":
            closure_steps(model, opt, x, y, 4)
        else:
            hand_steps(model, opt, x, y, 4, select=run == "hand-select")
        assert same(model, reference_model), run
        assert opt.passes == 8.0, run


def test_two_step_closure_and_sam_step_agree_bit_for_bit():
    (x, y), models = batch(), [mlp() for _ in range(3)]
    opts = [esam(m, beta=0.5, gamma=0.5, seed=2) for m in models]
    hand_steps(models[0], opts[0], x, y, 5)
    losses = closure_steps(models[1], opts[1], x, y, 5)
    for _ in range(5):
        sam_step(opts[2], models[2], per_example, x, y)
    assert same(models[0], models[1]) and same(models[0], models[2])
    assert opts[0].passes == opts[1].passes == opts[2].passes == pytest.approx(5 * cost(0.5, 16), rel=1e-12)
    # the closure API returns the clean loss of the first call
    assert losses[0].item() == pytest.approx(loss_fn(mlp()(x), y).item(), rel=1e-12)


def test_selection_equals_the_plain_rule_with_ties_to_the_lower_index():
    opt = esam(mlp(), gamma=0.5)
    clean = torch.tensor([1.0, 2.0, 0.5, 0.0, 1.0, 3.0, 0.0, 2.0], dtype=torch.float64)
    rises = [0.5, 0.25, 0.5, 0.5, 0.0, 0.75, 0.5, 0.25]  # exact in binary: four rises tie at 0.5
    perturbed = clean + torch.tensor(rises, dtype=torch.float64)
    expected = sorted(sorted(range(8), key=lambda i: (-rises[i], i))[:4])
    keep = opt._select_examples(8, clean, perturbed)
    assert keep.tolist() == expected == [0, 2, 3, 5]  # of the tied 0, 2, 3, 6 the lower indices are kept
    assert keep.dtype == torch.int64
    assert opt._selected_count(100) == 50 and esam(mlp(), gamma=0.29)._selected_count(100) == 29
    assert esam(mlp(), gamma=0.01)._selected_count(16) == 1  # never an empty second pass


@pytest.mark.parametrize("peek", [False, True])
def test_state_dict_round_trip_continues_bit_exactly(peek):
    """5 steps straight = 3 steps, checkpoint, a fresh model and optimizer loaded from it, 2 steps; the draws of
    steps 4 and 5 come from the saved generator state."""
    (x, y) = batch()
    options = dict(beta=0.5, gamma=0.5, seed=6)
    straight = mlp()
    straight_opt = esam(straight, **options)
    for _ in range(5):
        sam_step(straight_opt, straight, per_example, x, y)

    first = mlp()
    opt1 = esam(first, **options)
    for _ in range(3):
        sam_step(opt1, first, per_example, x, y)
    if peek:  # step 4's draw taken before the checkpoint (an ascent started and abandoned): it must travel too
        loss_fn(first(x), y).backward()
        opt1.first_step()
        opt1.cancel_step()
        opt1.zero_grad()
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = mlp(seed=5)  # other initial weights: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt2 = esam(resumed, **options)
    opt2.load_state_dict(saved["opt"])
    for _ in range(2):
        sam_step(opt2, resumed, per_example, x, y)
    assert same(straight, resumed) and opt2.steps == 5
    assert opt2.passes == pytest.approx(straight_opt.passes, rel=1e-12)
    # the draws of steps 4-5 are not those a fresh generator would give: the state really travelled
    draws = expected_draws(6, 0.5, 5, 4)
    assert draws[3:5] != draws[0:2]
    with pytest.raises(ValueError, match="beta=0.5.*beta=0.6"):
        esam(mlp(), **{**options, "beta": 0.6}).load_state_dict(saved["opt"])


def test_a_deepcopy_continues_bit_exactly():
    (x, y), model = batch(), mlp()
    opt = esam(model, beta=0.5, gamma=0.5, seed=1)
    sam_step(opt, model, per_example, x, y)
    twin_model, twin_opt = copy.deepcopy((model, opt))
    for _ in range(3):
        sam_step(opt, model, per_example, x, y)
        sam_step(twin_opt, twin_model, per_example, x, y)
    assert same(model, twin_model)


@pytest.mark.parametrize("failing_call", [4, 5, 6])
def test_an_overflow_skips_the_step_and_its_count(failing_call):
    """Under a GradScaler an inf in any pass of step 2 skips that step: its retry (the next call) draws and
    selects as it would have, and passes count the completed steps only. A step calls the loss three times
    (clean, ranking, second pass): calls 4 to 6 are step 2's."""
    (x, y), model, plain_model = batch(), mlp(), mlp()
    calls = []

    def overflowing(outputs, targets):
        calls.append(1)
        losses = per_example(outputs, targets)
        return losses * float("inf") if len(calls) == failing_call else losses

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt, plain = esam(model, beta=0.5, gamma=0.5, seed=2), esam(plain_model, beta=0.5, gamma=0.5, seed=2)
    for _ in range(3):
        sam_step(opt, model, overflowing, x, y, scaler=scaler)
    for _ in range(2):
        sam_step(plain, plain_model, per_example, x, y)
    assert scaler.get_scale() == 2.0**9  # the overflow was seen, once
    # scaling by a power of two is exact in float64: equal to rounding at most
    torch.testing.assert_close(
        torch.cat([p.detach().flatten() for p in model.parameters()]),
        torch.cat([p.detach().flatten() for p in plain_model.parameters()]),
        rtol=0,
        atol=1e-13,
    )
    assert opt.steps == 2 and opt.passes == pytest.approx(plain.passes, rel=1e-12)


def test_a_non_finite_ranking_loss_without_a_scaler_raises_and_keeps_the_weights():
    (x, y), model = batch(), mlp()
    calls = []

    def overflowing(outputs, targets):
        calls.append(1)
        losses = per_example(outputs, targets)
        return losses * float("inf") if len(calls) == 2 else losses  # the ranking forward at w + ε̂

    before = [p.detach().clone() for p in model.parameters()]
    opt = esam(model)
    with pytest.raises(FloatingPointError, match="ranking forward.*inf or NaN"):
        sam_step(opt, model, overflowing, x, y)
    assert not opt.perturbed and opt.steps == 0
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), before))


def test_a_scalar_loss_is_refused_with_the_fix():
    model, (x, y) = mlp(), batch()
    opt = esam(model)
    with pytest.raises(ValueError, match="ESAM selects examples.*got a scalar.*reduction='none'"):
        sam_step(opt, model, loss_fn, x, y)
    assert not opt.perturbed and opt.steps == 0
    with pytest.raises(ValueError, match="backend='vmap' cannot run ESAM.*backend='loop'"):
        sam_step(opt, model, per_example, x, y, micro_batches=2, backend="vmap")
    with pytest.raises(RuntimeError, match="after first_step"):
        select_examples(opt, model, per_example, x, y, clean_losses=per_example(model(x), y))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(beta=0.0), "beta must be in \\(0, 1\\].* got 0.0"),
        (dict(beta=1.5), "beta must be .* got 1.5"),
        (dict(beta=float("nan")), "beta must be .* got nan"),
        (dict(beta=True), "beta must be .* got True"),
        (dict(gamma=0.0), "gamma must be in \\(0, 1\\].* got 0.0"),
        (dict(gamma=-0.5), "gamma must be .* got -0.5"),
        (dict(gamma="0.5"), "gamma must be .* got '0.5'"),
        (dict(seed=-1), "seed must be .* got -1"),
        (dict(seed=1.5), "seed must be .* got 1.5"),
        (dict(rho=-1.0), "rho must be .* got -1.0"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ESAM(mlp().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_sam_options_of_its_own_are_refused():
    with pytest.raises(TypeError, match="does not take 'interval'"):
        ESAM(mlp().parameters(), torch.optim.SGD, lr=0.1, interval=2)
