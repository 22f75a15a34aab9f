"""``optimizer.last_step_stats``: each number against a float64 reference written out by hand on a tiny model.

References: g = ∇L(w) by autograd at fixed weights, then the formulas of docs/algorithms.md by hand (ε̂ = rho g/||g||;
ASAM ε̂ = rho T² g/||T g||, T = |w| + eta), L and ∇L at w + ε̂ evaluated functionally. Tolerance: 1e-12 relative
(every reference and the optimizer run in float64; the references add the optimizer's eps = 1e-12 to ||g||).
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch.func import functional_call

import samkit
from samkit import sam_step
from samkit.optim.step_stats import FIELDS, StepStats
from tests.optim.reference import batch, loss_fn, mlp

RHO, LR = 0.05, 0.1
TOL = dict(rel=1e-12, abs=1e-15)


def loss_at(model, weights, x, y):
    return loss_fn(functional_call(model, weights, (x,)), y)


def grads_at(model, weights, x, y):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in weights.items()}
    loss = loss_at(model, leaves, x, y)
    return loss.item(), dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


def norm(tensors) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors))


def dot(a, b) -> float:
    return sum(float((s * t).sum()) for s, t in zip(a, b))


def reference(model, x, y, *, rho=RHO, adaptive=False, eta=0.0, rhos=None):
    """The first step's stats by hand: (||g|| or ||T g||, ||ε̂||, L(w), L(w + ε̂), cos(g, g_s))."""
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    loss, g = grads_at(model, w, x, y)
    t = {k: (w[k].abs() + eta) if adaptive else torch.ones_like(w[k]) for k in w}
    scaled = norm([t[k] * g[k] for k in w])
    rho_of = rhos or {k: rho for k in w}
    eps = {k: rho_of[k] * t[k] ** 2 * g[k] / (scaled + 1e-12) for k in w}  # the optimizer's eps, 1e-12
    perturbed, gs = grads_at(model, {k: w[k] + eps[k] for k in w}, x, y)
    cosine = dot(g.values(), gs.values()) / (norm(g.values()) * norm(gs.values()))
    return scaled, norm(eps.values()), loss, perturbed, cosine


def sam(model, **options):
    return samkit.SAM(model.parameters(), torch.optim.SGD, rho=options.pop("rho", RHO), lr=LR, **options)


def two_step(model, opt, x, y, *, losses=True):
    loss = loss_fn(model(x), y)
    loss.backward()
    perturbed = None
    if opt.first_step(zero_grad=True):
        perturbed = loss_fn(model(x), y)
        perturbed.backward()
    if losses:
        opt.second_step(zero_grad=True, loss=loss, perturbed_loss=perturbed)
    else:
        opt.second_step(zero_grad=True)


def check(stats: StepStats, expected, *, cosine: bool = True):
    grad_norm, eps_norm, loss, perturbed, cos = expected
    assert stats.sam is True
    assert stats.grad_norm == pytest.approx(grad_norm, **TOL)
    assert stats.eps_norm == pytest.approx(eps_norm, **TOL)
    assert stats.loss == pytest.approx(loss, **TOL)
    assert stats.perturbed_loss == pytest.approx(perturbed, **TOL)
    assert stats.loss_rise == pytest.approx(perturbed - loss, rel=1e-9, abs=1e-15)
    if cosine:
        assert stats.cosine == pytest.approx(cos, **TOL)


@pytest.mark.parametrize("api", ["two_step", "closure", "sam_step"])
@pytest.mark.parametrize("foreach", [True, False])
def test_sam_stats_against_the_reference(api, foreach):
    model, (x, y) = mlp(), batch()
    expected = reference(model, x, y)
    assert expected[1] == pytest.approx(RHO, rel=1e-10)  # ||ε̂|| = rho for SAM (up to eps / ||g||)
    opt = sam(model, foreach=foreach).record_step_stats(cosine=True)
    assert opt.last_step_stats is None  # before the first step
    if api == "two_step":
        two_step(model, opt, x, y)
    elif api == "closure":

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    else:
        sam_step(opt, model, loss_fn, x, y)
    stats = opt.last_step_stats
    check(stats, expected)
    assert (stats.step, stats.lr) == (1, LR)
    assert isinstance(stats.grad_norm, float) and type(stats.loss_rise) is float


@pytest.mark.parametrize("restore_by", ["copy", "swap"])
def test_asam_reports_the_adaptive_norms(restore_by):
    model, (x, y) = mlp(), batch()
    expected = reference(model, x, y, rho=0.5, adaptive=True, eta=0.01)
    assert expected[1] != pytest.approx(0.5, rel=1e-3)  # ||ε̂|| is not rho under ASAM: the test tells them apart
    opt = sam(model, rho=0.5, adaptive=True, eta=0.01, restore_by=restore_by).record_step_stats(cosine=True)
    two_step(model, opt, x, y)
    check(opt.last_step_stats, expected)


def test_param_groups_with_their_own_rho():
    """||ε̂||² = Σ_i rho_i² ||g_i||² / ||g||²: the per-group path of the norm computed without reading ε̂."""
    model, (x, y) = mlp(), batch()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    names = [k for k, _ in model.named_parameters()]
    rhos = dict(zip(names, [0.05, 0.05, 0.2, 0.2]))
    expected = reference(model, x, y, rhos=rhos)
    opt = samkit.SAM([{"params": first}, {"params": second, "rho": 0.2}], torch.optim.SGD, rho=0.05, lr=LR)
    two_step(model, opt, x, y)
    check(opt.last_step_stats, expected, cosine=False)
    assert opt.last_step_stats.cosine is None  # off by default


def test_p_inf_norms():
    """p = inf: ε̂ = rho sign(g), ||ε̂||_2 = rho sqrt(#{g != 0}), and the norm divided by is ||g||_1."""
    model, (x, y) = mlp(), batch()
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    _, g = grads_at(model, w, x, y)
    nonzero = sum(int((t != 0).sum()) for t in g.values())
    opt = sam(model, p=float("inf"))
    two_step(model, opt, x, y)
    stats = opt.last_step_stats
    assert stats.eps_norm == pytest.approx(RHO * math.sqrt(nonzero), **TOL)
    assert stats.grad_norm == pytest.approx(sum(float(t.abs().sum()) for t in g.values()), **TOL)


def test_micro_batches_average_the_ascents():
    """mSAM (k = 2): ||g|| and ||ε̂|| are the means over the micro-batches' ascents weighted by their shares (1/2
    each), the losses the weighted means, the cosine that of the summed gradients."""
    model, (x, y) = mlp(), batch(n=16)
    parts = [(x[:8], y[:8]), (x[8:], y[8:])]  # torch.tensor_split(16, 2): 8 and 8
    expected = [reference(model, xj, yj) for xj, yj in parts]
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    clean = [grads_at(model, w, xj, yj)[1] for xj, yj in parts]
    perturbed = []
    for (xj, yj), g in zip(parts, clean):
        n = norm(g.values())
        perturbed.append(grads_at(model, {k: w[k] + RHO * g[k] / (n + 1e-12) for k in w}, xj, yj)[1])
    g_sum = [0.5 * a + 0.5 * b for a, b in zip(clean[0].values(), clean[1].values())]
    gs_sum = [0.5 * a + 0.5 * b for a, b in zip(perturbed[0].values(), perturbed[1].values())]
    opt = sam(model).record_step_stats(cosine=True)
    sam_step(opt, model, loss_fn, x, y, micro_batches=2)
    stats = opt.last_step_stats
    assert stats.grad_norm == pytest.approx(0.5 * expected[0][0] + 0.5 * expected[1][0], **TOL)
    assert stats.eps_norm == pytest.approx(0.5 * expected[0][1] + 0.5 * expected[1][1], **TOL)
    assert stats.loss == pytest.approx(0.5 * expected[0][2] + 0.5 * expected[1][2], **TOL)
    assert stats.perturbed_loss == pytest.approx(0.5 * expected[0][3] + 0.5 * expected[1][3], **TOL)
    assert stats.cosine == pytest.approx(dot(g_sum, gs_sum) / (norm(g_sum) * norm(gs_sum)), **TOL)


def test_vmap_backend_records_the_losses_and_cosine_but_not_the_ascent_norms():
    model, (x, y) = mlp(), batch()
    expected = reference(model, x, y)
    opt = sam(model).record_step_stats(cosine=True)
    sam_step(opt, model, loss_fn, x, y, backend="vmap")
    stats = opt.last_step_stats
    assert stats.grad_norm is None and stats.eps_norm is None  # the ascent ran outside the optimizer
    assert stats.loss == pytest.approx(expected[2], **TOL)
    assert stats.perturbed_loss == pytest.approx(expected[3], **TOL)
    assert stats.cosine == pytest.approx(expected[4], **TOL)


def test_two_step_without_losses_leaves_the_rise_unknown():
    model, (x, y) = mlp(), batch()
    opt = sam(model)
    two_step(model, opt, x, y, losses=False)
    stats = opt.last_step_stats
    assert stats.loss is None and stats.perturbed_loss is None and stats.loss_rise is None
    assert stats.grad_norm is not None


def test_one_pass_steps_say_so():
    """interval = 2: the second step has one pass, no ascent, no rise; its LR is the scheduled one."""
    model, (x, y) = mlp(), batch()
    opt = sam(model, interval=2).record_step_stats(cosine=True)
    two_step(model, opt, x, y)
    assert opt.last_step_stats.sam is True
    for group in opt.param_groups:
        group["lr"] = 0.03
    clean = loss_fn(model(x), y).item()
    two_step(model, opt, x, y)
    stats = opt.last_step_stats
    assert (stats.step, stats.sam, stats.lr) == (2, False, 0.03)
    assert stats.grad_norm is None and stats.eps_norm is None and stats.cosine is None
    assert stats.perturbed_loss is None and stats.loss_rise is None
    assert stats.loss == clean  # the loss the loop handed to second_step


def test_recording_switched_off_and_on():
    model, (x, y) = mlp(), batch()
    opt = sam(model)
    two_step(model, opt, x, y)
    assert opt.last_step_stats is not None
    assert opt.record_step_stats(False) is opt
    assert opt.last_step_stats is None
    two_step(model, opt, x, y)
    assert opt.last_step_stats is None
    opt.record_step_stats()
    two_step(model, opt, x, y)
    assert opt.last_step_stats.step == 3


def test_bad_switches_are_refused():
    opt = sam(mlp())
    with pytest.raises(ValueError, match="cosine=True needs the recording on"):
        opt.record_step_stats(False, cosine=True)
    with pytest.raises(TypeError, match="enabled and cosine must be True or False, got enabled=1"):
        opt.record_step_stats(1)


def test_the_step_never_reads_a_tensor_on_the_host(monkeypatch):
    """Recording keeps device tensors; only the first read of ``last_step_stats`` copies them, in one tolist()."""
    model, (x, y) = mlp(), batch()
    opt = sam(model).record_step_stats(cosine=True)
    calls = {"tolist": 0}
    tolist = torch.Tensor.tolist

    def forbidden(*_):
        raise AssertionError("a step read a tensor on the host")

    def counted(self):
        calls["tolist"] += 1
        return tolist(self)

    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "item", forbidden)
        patch.setattr(torch.Tensor, "__float__", forbidden)
        patch.setattr(torch.Tensor, "tolist", forbidden)
        for _ in range(3):
            sam_step(opt, model, loss_fn, x, y)
    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    first = opt.last_step_stats
    assert opt.last_step_stats is first  # built once
    assert calls["tolist"] == 1
    assert all(getattr(first, k) is not None for k in FIELDS)


def test_a_cancelled_step_records_nothing():
    model, (x, y) = mlp(), batch()
    opt = sam(model)
    two_step(model, opt, x, y)
    loss_fn(model(x), y).backward()
    opt.first_step(zero_grad=True)
    opt.cancel_step()
    two_step(model, opt, x, y, losses=False)
    stats = opt.last_step_stats
    assert stats.step == 2 and stats.loss is None  # nothing of the cancelled step leaked into this one


def test_copies_keep_the_settings_and_the_last_stats_as_floats():
    model, (x, y) = mlp(), batch()
    opt = sam(model).record_step_stats(cosine=True)
    two_step(model, opt, x, y)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.last_step_stats == opt.last_step_stats
        assert (clone._stats.enabled, clone._stats.cosine) == (True, True)


def test_a_wrapper_sharing_the_dict_shares_the_stats():
    """Lightning's optimizer wrapper copies the optimizer's __dict__: stats recorded through either are the same."""
    model, (x, y) = mlp(), batch()
    opt = sam(model)
    wrapper = object.__new__(type(opt))
    wrapper.__dict__ = dict(opt.__dict__)
    two_step(model, wrapper, x, y)
    assert opt.last_step_stats is not None and opt.last_step_stats == wrapper.last_step_stats


def test_as_dict_is_json_ready():
    model, (x, y) = mlp(), batch()
    opt = sam(model)
    two_step(model, opt, x, y)
    row = opt.last_step_stats.as_dict()
    assert list(row) == list(FIELDS)
    assert all(v is None or type(v) in (int, float, bool) for v in row.values())


def test_a_step_that_raised_leaves_nothing_to_the_next():
    """first_step refuses a non-finite gradient after keeping its copy for the cosine: the next step starts clean."""
    model, (x, y) = mlp(), batch()
    expected = reference(model, x, y)
    opt = sam(model).record_step_stats(cosine=True)
    loss_fn(model(x), y).backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        opt.first_step(zero_grad=True)
    opt.zero_grad()
    two_step(model, opt, x, y)
    check(opt.last_step_stats, expected)
