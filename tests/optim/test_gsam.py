"""samkit.GSAM against a plain float64 reference written from its formula, and its conventions and errors."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from samkit import SAM, sam_step
from samkit.optim.gsam import GSAM
from tests.optim.reference import batch, gradients, loss_fn, max_diff, mlp

SGD_OPTIONS = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
TOLERANCE = 1e-12  # float64, 5 steps: the implementation and the reference differ only in rounding


def inner(a: dict, b: dict) -> torch.Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def gsam_direction(g: dict, g_s: dict, alpha: float) -> dict:
    """d = g_s − α g_⊥, g_⊥ = g − (⟨g, g_s⟩ / ||g_s||²) g_s (the paper's decomposition)."""
    c = inner(g, g_s) / inner(g_s, g_s)
    return {k: g_s[k] - alpha * (g[k] - c * g_s[k]) for k in g}


def reference_gsam_sgd(model, x, y, *, rhos, lrs, alpha, momentum=0.0, weight_decay=0.0, micro_batches=1, shared=False):
    """GSAM around torch's SGD rule, one entry of ``rhos`` / ``lrs`` per step. With micro-batches: g is the
    size-weighted sum of the clean micro-batch gradients, g_s the size-weighted sum of the perturbed ones, each
    micro-batch ascending from its own gradient (or all from g when ``shared``)."""
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {}
    n = len(x)
    chunks = list(zip(torch.tensor_split(x, micro_batches), torch.tensor_split(y, micro_batches)))
    for rho, lr in zip(rhos, lrs):
        clean = [(len(xj) / n, gradients(model, w, xj, yj)) for xj, yj in chunks]
        g = {k: sum(share * gj[k] for share, gj in clean) for k in w}
        g_s = {k: torch.zeros_like(v) for k, v in w.items()}
        for (xj, yj), (share, gj) in zip(chunks, clean):
            ascent = g if shared else gj
            norm = torch.sqrt(inner(ascent, ascent))
            perturbed = gradients(model, {k: w[k] + rho * ascent[k] / (norm + 1e-12) for k in w}, xj, yj)
            g_s = {k: g_s[k] + share * perturbed[k] for k in w}
        d = gsam_direction(g, g_s, alpha)
        for k in w:
            step = d[k] + weight_decay * w[k]
            buffers[k] = step.clone() if k not in buffers else momentum * buffers[k] + step
            w[k] = w[k] - lr * buffers[k]
    return w


def two_step(model, opt, x, y, steps, scheduler=None):
    for _ in range(steps):
        loss_fn(model(x), y).backward()
        if opt.first_step(zero_grad=True):
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)
        if scheduler is not None:
            scheduler.step()


def same(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("foreach", [True, False])
def test_five_steps_equal_the_formula_with_sgd_momentum_and_weight_decay(foreach):
    model, (x, y) = mlp(), batch()
    expected = reference_gsam_sgd(
        model, x, y, rhos=[0.1] * 5, lrs=[0.1] * 5, alpha=0.3, momentum=0.9, weight_decay=5e-4
    )
    opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.1, alpha=0.3, foreach=foreach, **SGD_OPTIONS)
    two_step(model, opt, x, y, 5)
    assert max_diff(model, expected) <= TOLERANCE
    # not vacuous: SAM (alpha = 0) ends elsewhere
    sam = reference_gsam_sgd(mlp(), x, y, rhos=[0.1] * 5, lrs=[0.1] * 5, alpha=0.0, momentum=0.9, weight_decay=5e-4)
    assert max((sam[k] - expected[k]).abs().max().item() for k in sam) > 1e-6


def test_foreach_and_loop_paths_agree_bit_for_bit():
    (x, y) = batch()
    models = [mlp(), mlp()]
    for model, foreach in zip(models, (True, False)):
        opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.1, alpha=0.3, foreach=foreach, **SGD_OPTIONS)
        two_step(model, opt, x, y, 5)
    assert same(*models)


@pytest.mark.parametrize("foreach", [True, False])
def test_rho_follows_a_torch_lr_scheduler(foreach):
    model, (x, y) = mlp(), batch()
    lr_max, lr_min, rho_max, rho_min = 0.2, 0.02, 0.2, 0.05
    opt = GSAM(
        model.parameters(), torch.optim.SGD, rho=rho_max, alpha=0.2, rho_min=rho_min, lr_max=lr_max, lr_min=lr_min,
        lr=lr_max, momentum=0.9, weight_decay=5e-4, foreach=foreach,
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4, eta_min=lr_min)
    lrs = [lr_min + (lr_max - lr_min) * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(5)]
    rhos = [rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min) for lr in lrs]
    assert rhos[0] == pytest.approx(rho_max) and rhos[4] == pytest.approx(rho_min)  # the whole range is visited
    expected = reference_gsam_sgd(mlp(), x, y, rhos=rhos, lrs=lrs, alpha=0.2, momentum=0.9, weight_decay=5e-4)
    two_step(model, opt, x, y, 5, scheduler)
    assert max_diff(model, expected) <= TOLERANCE
    # not vacuous: a constant rho_max ends elsewhere
    constant = reference_gsam_sgd(mlp(), x, y, rhos=[rho_max] * 5, lrs=lrs, alpha=0.2, momentum=0.9, weight_decay=5e-4)
    assert max((constant[k] - expected[k]).abs().max().item() for k in constant) > 1e-6


@pytest.mark.parametrize("lr,rho", [(0.0, 0.05), (0.01, 0.05), (0.11, 0.125), (0.5, 0.2)])
def test_rho_schedule_is_linear_in_lr_and_clamped_outside_the_range(lr, rho):
    """||ε̂|| = rho_t exactly with eps = 0: a warm-up below lr_min gives rho_min, not less (never negative)."""
    model, (x, y) = mlp(), batch()
    opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.2, rho_min=0.05, lr_max=0.2, lr_min=0.02, lr=lr, eps=0.0)
    loss_fn(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.first_step()
    moved = torch.sqrt(sum(((p.detach() - w) ** 2).sum() for p, w in zip(model.parameters(), before)))
    assert moved.item() == pytest.approx(rho, rel=1e-12)
    opt.restore()


@pytest.mark.parametrize("foreach", [True, False])
def test_alpha_zero_is_sam_bit_for_bit(foreach):
    (x, y) = batch()
    gsam_model, sam_model = mlp(), mlp()
    gsam = GSAM(gsam_model.parameters(), torch.optim.SGD, rho=0.1, alpha=0.0, foreach=foreach, **SGD_OPTIONS)
    sam = SAM(sam_model.parameters(), torch.optim.SGD, rho=0.1, foreach=foreach, **SGD_OPTIONS)
    for _ in range(5):
        two_step(gsam_model, gsam, x, y, 1)
        two_step(sam_model, sam, x, y, 1)
        assert same(gsam_model, sam_model)


@pytest.mark.parametrize("foreach", [True, False])
def test_the_extra_component_of_the_descent_is_orthogonal_to_the_perturbed_gradient(foreach):
    model, (x, y) = mlp(), batch()
    two_step(model, GSAM(model.parameters(), torch.optim.SGD, **SGD_OPTIONS), x, y, 3)  # away from the init
    # eps = 0: the stabiliser tilts g_⊥ by about eps / ||g_s|| (1e-11 here), above the rounding this test resolves
    opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.1, alpha=0.5, lr=1.0, eps=0.0, foreach=foreach)
    before = [p.detach().clone() for p in model.parameters()]
    loss_fn(model(x), y).backward()
    g = [p.grad.clone() for p in model.parameters()]
    opt.first_step(zero_grad=True)
    loss_fn(model(x), y).backward()
    g_s = [p.grad.clone() for p in model.parameters()]
    opt.second_step(zero_grad=True)
    d = [w - p.detach() for w, p in zip(before, model.parameters())]  # plain SGD with lr = 1: w - w' = d
    extra = [di - si for di, si in zip(d, g_s)]  # = −α g_⊥
    dot = sum((e * s).sum() for e, s in zip(extra, g_s))
    extra_norm = torch.sqrt(sum((e * e).sum() for e in extra))
    s_norm = torch.sqrt(sum((s * s).sum() for s in g_s))
    assert extra_norm > 1e-3 * s_norm  # a real component, not rounding
    assert abs(dot.item()) <= 1e-13 * (extra_norm * s_norm).item()  # cosine ~ 0 up to float64 rounding
    # and it is −α times the clean gradient's orthogonal part
    c = sum((a * b).sum() for a, b in zip(g, g_s)) / s_norm**2
    for e, gi, si in zip(extra, g, g_s):
        torch.testing.assert_close(e, -0.5 * (gi - c * si), rtol=0, atol=1e-14)


def test_closure_api_equals_two_step_api():
    (x, y) = batch()
    model_a, model_b = mlp(), mlp()
    opt_a = GSAM(model_a.parameters(), torch.optim.SGD, alpha=0.3, **SGD_OPTIONS)
    opt_b = GSAM(model_b.parameters(), torch.optim.SGD, alpha=0.3, **SGD_OPTIONS)
    two_step(model_a, opt_a, x, y, 4)

    def closure():
        opt_b.zero_grad()
        loss = loss_fn(model_b(x), y)
        loss.backward()
        return loss

    for _ in range(4):
        opt_b.step(closure)
    assert same(model_a, model_b)
    assert opt_a.passes == opt_b.passes == 8.0 and opt_b.sam_steps == 4


def test_sam_step_with_one_micro_batch_equals_the_two_step_api():
    (x, y) = batch()
    model_a, model_b = mlp(), mlp()
    opt_a = GSAM(model_a.parameters(), torch.optim.SGD, alpha=0.3, **SGD_OPTIONS)
    opt_b = GSAM(model_b.parameters(), torch.optim.SGD, alpha=0.3, **SGD_OPTIONS)
    two_step(model_a, opt_a, x, y, 3)
    for _ in range(3):
        sam_step(opt_b, model_b, loss_fn, x, y, micro_batches=1)
    assert same(model_a, model_b)
    assert opt_b.passes == 6.0


@pytest.mark.parametrize("perturbation", ["per_micro_batch", "shared"])
def test_sam_step_with_two_micro_batches_equals_the_reference(perturbation):
    model, (x, y) = mlp(), batch(n=15)  # micro-batches of 8 and 7: the weights 8/15 and 7/15 matter
    expected = reference_gsam_sgd(
        model, x, y, rhos=[0.1] * 3, lrs=[0.1] * 3, alpha=0.3, momentum=0.9, weight_decay=5e-4, micro_batches=2,
        shared=perturbation == "shared",
    )  # fmt: skip
    opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.1, alpha=0.3, **SGD_OPTIONS)
    for _ in range(3):
        sam_step(opt, model, loss_fn, x, y, micro_batches=2, perturbation=perturbation)
    assert max_diff(model, expected) <= TOLERANCE
    assert opt.passes == 6.0  # two passes over the whole batch per step, whatever k
    # not vacuous: the two modes differ, and so does GSAM on the whole batch (k = 1)
    other = reference_gsam_sgd(
        mlp(), x, y, rhos=[0.1] * 3, lrs=[0.1] * 3, alpha=0.3, momentum=0.9, weight_decay=5e-4, micro_batches=2,
        shared=perturbation != "shared",
    )  # fmt: skip
    assert max((other[k] - expected[k]).abs().max().item() for k in other) > 1e-8


@pytest.mark.parametrize("perturbation", ["per_micro_batch", "shared"])
def test_vmap_backend_equals_the_loop(perturbation):
    (x, y) = batch(n=16)
    model_a, model_b = mlp(), mlp()
    opt_a = GSAM(model_a.parameters(), torch.optim.SGD, rho=0.1, alpha=0.3, **SGD_OPTIONS)
    opt_b = GSAM(model_b.parameters(), torch.optim.SGD, rho=0.1, alpha=0.3, **SGD_OPTIONS)
    for _ in range(3):
        sam_step(opt_a, model_a, loss_fn, x, y, micro_batches=4, perturbation=perturbation)
        sam_step(opt_b, model_b, loss_fn, x, y, micro_batches=4, perturbation=perturbation, backend="vmap")
    expected = dict(model_a.named_parameters())
    assert max_diff(model_b, {k: v.detach() for k, v in expected.items()}) <= TOLERANCE
    assert opt_a.passes == opt_b.passes == 6.0


def test_state_dict_round_trip_continues_bit_exactly():
    (x, y) = batch()
    options = dict(rho=0.2, alpha=0.3, rho_min=0.05, lr_max=0.2, lr_min=0.02, lr=0.2, momentum=0.9, weight_decay=5e-4)

    def build(model):
        opt = GSAM(model.parameters(), torch.optim.SGD, **options)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5, eta_min=0.02)

    straight = mlp()
    opt, scheduler = build(straight)
    two_step(straight, opt, x, y, 5, scheduler)

    first = mlp()
    opt1, scheduler1 = build(first)
    two_step(first, opt1, x, y, 3, scheduler1)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict(), "sched": scheduler1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = mlp(seed=5)
    resumed.load_state_dict(saved["model"])
    opt2, scheduler2 = build(resumed)
    opt2.load_state_dict(saved["opt"])
    scheduler2.load_state_dict(saved["sched"])
    two_step(resumed, opt2, x, y, 2, scheduler2)
    assert same(straight, resumed)
    assert opt2.steps == 5 and opt2.passes == 10.0


@pytest.mark.parametrize("option", [dict(alpha=0.1), dict(rho_min=0.1), dict(lr_min=0.01)])
def test_resume_with_other_options_is_refused(option):
    model = mlp()
    options = dict(alpha=0.3, rho=0.2, rho_min=0.05, lr_max=0.2, lr_min=0.02, lr=0.1)
    saved = GSAM(model.parameters(), torch.optim.SGD, **options).state_dict()
    other = GSAM(model.parameters(), torch.optim.SGD, **{**options, **option})
    name = next(iter(option))
    with pytest.raises(ValueError, match=f"saved with {name}="):
        other.load_state_dict(copy.deepcopy(saved))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(alpha=-0.1), "alpha must be .* got -0.1"),
        (dict(alpha=float("nan")), "alpha must be .* got nan"),
        (dict(alpha=True), "alpha must be .* got True"),
        (dict(rho_min=0.01), "needs rho_min, lr_max and lr_min together.*without \\['lr_max', 'lr_min'\\]"),
        (dict(lr_max=0.1, lr_min=0.01), "without \\['rho_min'\\]"),
        (dict(rho_min=0.01, lr_max=0.1, lr_min=0.1), "lr_max must be > lr_min, got lr_max=0.1, lr_min=0.1"),
        (dict(rho_min=0.01, lr_max=0.01, lr_min=0.1), "lr_max must be > lr_min, got lr_max=0.01, lr_min=0.1"),
        (dict(rho_min=-0.01, lr_max=0.1, lr_min=0.0), "rho_min must be .* got -0.01"),
        (dict(rho_min=0.01, lr_max=0.1, lr_min=-1.0), "lr_min must be .* got -1.0"),
        (dict(rho_min=0.01, lr_max=float("inf"), lr_min=0.0), "lr_max must be .* got inf"),
        (dict(rho=0.05, rho_min=0.1, lr_max=0.1, lr_min=0.0), "rho_min must be <= rho.*rho_min=0.1.*rho=0.05"),
        (dict(rho=-0.05), "rho must be .* got -0.05"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_reserved_sam_options_are_refused():
    with pytest.raises(TypeError, match="does not take 'interval'"):
        GSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, interval=2)
