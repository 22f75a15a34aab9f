"""samkit.optim.ksam.KSAM against a plain float64 reference of SAM on the top-k examples, its selection and its cost."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from samkit import SAM, sam_step
from samkit.optim.ksam import KSAM
from samkit.step import select_examples
from tests.optim.reference import batch, gradients, loss_fn, mlp

OPTIONS = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
RHO = 0.1


def per_example(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def ksam(model, **kwargs):
    return KSAM(model.parameters(), torch.optim.SGD, rho=RHO, **{**OPTIONS, **kwargs})


def top(losses, m):
    """The m largest losses' indices, ties to the lower index, in batch order: the documented rule, written out."""
    values = losses.tolist()
    return sorted(sorted(range(len(values)), key=lambda i: (-values[i], i))[:m])


def reference(model, x, y, *, count, steps, micro_batches=1, shared=False):
    """K-SAM around SGD(momentum, weight decay), written out: rank by ℓ(w), then SAM (eq. 2-3) on the top `count`
    examples (mSAM: per micro-batch, each weighted by its size; shared: one ranking and one ε̂ for the batch)."""
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers, n = {}, len(x)
    chunks = list(zip(torch.tensor_split(x, micro_batches), torch.tensor_split(y, micro_batches)))
    if shared:
        chunks = [(x, y)]

    def losses(at, xs, ys):
        return F.cross_entropy(functional_call(model, at, (xs,)), ys, reduction="none")

    for _ in range(steps):
        total = {k: torch.zeros_like(v) for k, v in w.items()}
        for xj, yj in chunks:
            keep = top(losses(w, xj, yj), count(len(xj)))
            g = gradients(model, w, xj[keep], yj[keep])
            norm = torch.sqrt(sum((v**2).sum() for v in g.values()))
            g2 = gradients(model, {k: w[k] + RHO * g[k] / (norm + 1e-12) for k in w}, xj[keep], yj[keep])
            total = {k: total[k] + len(xj) / n * g2[k] for k in w}
        for k in w:
            d = total[k] + OPTIONS["weight_decay"] * w[k]
            buffers[k] = d.clone() if k not in buffers else OPTIONS["momentum"] * buffers[k] + d
            w[k] = w[k] - OPTIONS["lr"] * buffers[k]
    return w


def hand_steps(model, opt, x, y, steps, *, select=True):
    """The two-step API, both passes on select_examples' choice (on the whole batch with select=False)."""
    for _ in range(steps):
        keep = select_examples(opt, model, per_example, x, y) if select else slice(None)
        per_example(model(x[keep]), y[keep]).mean().backward()
        if opt.first_step(zero_grad=True):
            per_example(model(x[keep]), y[keep]).mean().backward()
        opt.second_step(zero_grad=True)


def closure_steps(model, opt, x, y, steps):
    losses = []
    for _ in range(steps):
        keep = select_examples(opt, model, per_example, x, y)

        def closure(keep=keep):
            opt.zero_grad()
            loss = per_example(model(x[keep]), y[keep]).mean()
            loss.backward()
            return loss

        losses.append(opt.step(closure))
    return losses


def same(model_a, model_b):
    return all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters()))


def max_diff(model, weights):
    return max((p.detach() - weights[k]).abs().max().item() for k, p in model.named_parameters())


def cost(m, n):
    """Passes of one step: the ranking forward (a third of a pass), then both passes on m of n examples."""
    return 2.0 if m == n else 1.0 / 3.0 + 2.0 * m / n


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("k", [4, 0.25])
@pytest.mark.parametrize("loop", ["sam_step", "two_step"])
def test_equals_the_reference(foreach, k, loop):
    model, (x, y) = mlp(), batch()
    opt = ksam(model, k=k, foreach=foreach)
    if loop == "sam_step":
        for _ in range(5):
            sam_step(opt, model, per_example, x, y)
    else:
        hand_steps(model, opt, x, y, 5)
    assert max_diff(model, reference(mlp(), x, y, count=lambda n: 4, steps=5)) <= 1e-12  # float64, 5 steps
    # the selection matters: SAM on the whole batch ends elsewhere
    assert max_diff(model, reference(mlp(), x, y, count=lambda n: n, steps=5)) > 1e-6
    assert opt.steps == 5 and opt.passes == pytest.approx(5 * cost(4, 16), rel=1e-12)


@pytest.mark.parametrize("mode", ["per_micro_batch", "shared"])
def test_micro_batches_equal_the_reference(mode):
    model, (x, y) = mlp(), batch(n=24)
    opt = ksam(model, k=0.25)
    for _ in range(4):
        sam_step(opt, model, per_example, x, y, micro_batches=2, perturbation=mode)
    count = lambda n: math.floor(0.25 * n)  # noqa: E731
    expected = reference(mlp(), x, y, count=count, steps=4, micro_batches=2, shared=mode == "shared")
    assert max_diff(model, expected) <= 1e-12  # float64, 4 steps
    assert opt.passes == pytest.approx(4 * cost(6, 24), rel=1e-12)


def test_both_passes_run_on_the_top_k_and_the_ranking_forward_on_all():
    """What the model sees, counted by hooks: forwards (examples, with gradient?) and backwards (examples)."""
    model, (x, y) = mlp(), batch()
    forwards, backwards = [], []

    def count(module, inputs, output):
        forwards.append((len(inputs[0]), torch.is_grad_enabled()))
        if output.requires_grad:
            output.register_hook(lambda g: backwards.append(len(g)))

    model.register_forward_hook(count)
    for k, kept in ((4, 4), (0.5, 8), (16, 16), (1.0, 16)):
        forwards.clear()
        backwards.clear()
        opt = ksam(model, k=k)
        sam_step(opt, model, per_example, x, y)
        ranking = [(16, False)] if kept < 16 else []  # SAM's two passes when k covers the batch
        assert forwards == ranking + [(kept, True), (kept, True)]
        assert backwards == [kept, kept]
        assert opt.passes == cost(kept, 16)


def test_the_selection_is_the_top_k_of_the_clean_losses_in_batch_order():
    model, (x, y) = mlp(), batch()
    opt = ksam(model, k=5)
    losses = per_example(model(x), y).detach()
    assert select_examples(opt, model, per_example, x, y).tolist() == top(losses, 5)
    # ties go to the lower index (exact ties: values representable in binary)
    tied = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 0.5], dtype=torch.float64)
    assert ksam(mlp(), k=2)._select_examples(6, tied).tolist() == top(tied, 2) == [1, 2]
    assert ksam(mlp(), k=0.5)._select_examples(6, tied).tolist() == top(tied, 3) == [1, 2, 4]
    # a count or a fraction of the batch
    assert ksam(mlp(), k=20)._selected_count(16) == 16 and ksam(mlp(), k=1)._selected_count(16) == 1
    assert ksam(mlp(), k=1.0)._selected_count(16) == 16 and ksam(mlp(), k=0.29)._selected_count(100) == 29
    assert ksam(mlp(), k=0.01)._selected_count(16) == 1  # never an empty pass


@pytest.mark.parametrize("k", [16, 100, 1.0])
@pytest.mark.parametrize("mode,micro_batches", [("per_micro_batch", 1), ("per_micro_batch", 2), ("shared", 2)])
def test_k_covering_the_batch_is_sam_bit_for_bit(k, mode, micro_batches):
    (x, y), model_a, model_b = batch(), mlp(), mlp()
    opt = ksam(model_a, k=k)
    sam = SAM(model_b.parameters(), torch.optim.SGD, rho=RHO, **OPTIONS)
    for _ in range(4):
        loss_a = sam_step(opt, model_a, per_example, x, y, micro_batches=micro_batches, perturbation=mode)
        loss_b = sam_step(sam, model_b, per_example, x, y, micro_batches=micro_batches, perturbation=mode)
        assert torch.equal(loss_a, loss_b)
    assert same(model_a, model_b) and opt.passes == sam.passes == 8.0


def test_k_covering_the_batch_is_sam_bit_for_bit_by_hand_and_by_closure():
    (x, y), reference_model = batch(), mlp()
    sam = SAM(reference_model.parameters(), torch.optim.SGD, rho=RHO, **OPTIONS)
    hand_steps(reference_model, sam, x, y, 4, select=False)
    for run in ("hand", "hand-select", "closure"):
        model = mlp()
        opt = ksam(model, k=16)
        if run == "closure":
            closure_steps(model, opt, x, y, 4)
        else:
            hand_steps(model, opt, x, y, 4, select=run == "hand-select")
        assert same(model, reference_model), run
        assert opt.passes == 8.0, run


def test_two_step_closure_and_sam_step_agree_bit_for_bit():
    (x, y), models = batch(), [mlp() for _ in range(3)]
    opts = [ksam(m, k=6) for m in models]
    hand_steps(models[0], opts[0], x, y, 5)
    losses = closure_steps(models[1], opts[1], x, y, 5)
    returned = [sam_step(opts[2], models[2], per_example, x, y) for _ in range(5)]
    assert same(models[0], models[1]) and same(models[0], models[2])
    assert opts[0].passes == opts[1].passes == opts[2].passes == pytest.approx(5 * cost(6, 16), rel=1e-12)
    # sam_step returns the mean clean loss over the whole batch; the closure API the loss of its first call (top k)
    start = mlp()
    assert returned[0].item() == pytest.approx(loss_fn(start(x), y).item(), rel=1e-12)
    keep = top(per_example(start(x), y), 6)
    assert losses[0].item() == pytest.approx(loss_fn(start(x[keep]), y[keep]).item(), rel=1e-12)


def test_batchnorm_statistics_come_from_the_ranking_forward_on_the_whole_batch():
    torch.manual_seed(0)
    layers = [torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 3)]
    model = torch.nn.Sequential(*layers).double()
    (x, y) = batch()
    opt = ksam(model, k=4)
    for _ in range(3):
        reference = copy.deepcopy(model)
        sam_step(opt, model, per_example, x, y)
        reference(x)  # one forward in training mode on the whole batch at the step's starting weights
        assert torch.equal(model[1].running_mean, reference[1].running_mean)
        assert torch.equal(model[1].running_var, reference[1].running_var)
    assert model[1].num_batches_tracked.item() == 3


def test_state_dict_round_trip_continues_bit_exactly():
    (x, y) = batch()
    straight = mlp()
    opt_straight = ksam(straight, k=5)
    for _ in range(5):
        sam_step(opt_straight, straight, per_example, x, y)
    first = mlp()
    opt1 = ksam(first, k=5)
    for _ in range(3):
        sam_step(opt1, first, per_example, x, y)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = mlp(seed=5)  # other initial weights: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt2 = ksam(resumed, k=5)
    opt2.load_state_dict(saved["opt"])
    for _ in range(2):
        sam_step(opt2, resumed, per_example, x, y)
    assert same(straight, resumed) and opt2.steps == 5
    assert opt2.passes == pytest.approx(opt_straight.passes, rel=1e-12)
    with pytest.raises(ValueError, match="k=5.*k=6"):
        ksam(mlp(), k=6).load_state_dict(saved["opt"])
    one = ksam(mlp(), k=1)
    with pytest.raises(ValueError, match="k_is_count=False.*k_is_count=True"):
        one.load_state_dict(ksam(mlp(), k=1.0).state_dict())  # one example is not the whole batch


@pytest.mark.parametrize("failing_call", [4, 5, 6])
def test_an_overflow_skips_the_step_and_its_count(failing_call):
    """Under a GradScaler an inf in any pass of step 2 skips that step: its retry (the next call) draws and
    selects as it would have, and passes count the completed steps only. A step calls the loss three times
    (ranking, clean, perturbed): calls 4 to 6 are step 2's."""
    (x, y), model, plain_model = batch(), mlp(), mlp()
    calls = []

    def overflowing(outputs, targets):
        calls.append(1)
        losses = per_example(outputs, targets)
        return losses * float("inf") if len(calls) == failing_call else losses

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt, plain = ksam(model, k=6), ksam(plain_model, k=6)
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


def test_a_scalar_loss_is_refused_with_the_fix():
    model, (x, y) = mlp(), batch()
    for k in (4, 16):  # also when k covers the batch: the same loss_fn must work for every k
        opt = ksam(model, k=k)
        with pytest.raises(ValueError, match="KSAM selects examples.*got a scalar.*reduction='none'"):
            sam_step(opt, model, loss_fn, x, y)
        assert not opt.perturbed and opt.steps == 0
    with pytest.raises(ValueError, match="backend='vmap' cannot run KSAM.*backend='loop'"):
        sam_step(opt, model, per_example, x, y, micro_batches=2, backend="vmap")
    with pytest.raises(TypeError, match="SAM does not select examples"):
        select_examples(SAM(model.parameters(), torch.optim.SGD, lr=0.1), model, per_example, x, y)


@pytest.mark.parametrize(
    "k,match",
    [
        (0, "k must be a count >= 1.* got 0"),
        (-3, "k must be a count >= 1.* got -3"),
        (0.0, "k must be a fraction of the batch in \\(0, 1\\].* got 0.0"),
        (1.5, "k must be a fraction .* got 1.5"),
        (float("nan"), "k must be a fraction .* got nan"),
        (True, "k must be a count .* or a fraction .* got True"),
        ("4", "k must be a count .* got '4'"),
        (None, "k must be a count .* got None"),
    ],
)
def test_bad_k(k, match):
    with pytest.raises(ValueError, match=match):
        KSAM(mlp().parameters(), torch.optim.SGD, k=k, lr=0.1)


def test_bad_sam_options():
    with pytest.raises(ValueError, match="rho must be .* got -1.0"):
        KSAM(mlp().parameters(), torch.optim.SGD, k=4, rho=-1.0, lr=0.1)
    with pytest.raises(TypeError, match="does not take 'interval'"):
        KSAM(mlp().parameters(), torch.optim.SGD, k=4, lr=0.1, interval=2)
