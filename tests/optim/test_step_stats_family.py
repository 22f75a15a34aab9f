"""``last_step_stats`` of every member of the SAM family (tests/optim/family.py), by sam_step and the two-step API.

What each member's step actually did is measured by hand around its calls (float64): the displacement
||w + ε̂ - w|| right after ``first_step`` moved the weights, the clean gradient it was given, the gradient in
``.grad`` when ``second_step`` starts (g_s), and the loss at w and at w + ε̂. The stats must equal them, and a
one-pass step (LookSAM, RST, AE-SAM, late-phase SAM, interval, Momentum-SAM) must say so.
"""

from __future__ import annotations

import math

import pytest
import torch

import samkit
from samkit import sam_step
from tests.optim.family import FAMILY, SELECTIVE_PASSES, SGD_OPTIONS, per_example_loss
from tests.optim.family import model as mlp
from tests.optim.reference import batch, loss_fn

NAMES = sorted(FAMILY)
STEPS = 6
ONE_PASS = {"interval", "looksam", "rst", "aesam", "late-sam", "momentum-sam"}  # have one-pass steps in 6 steps
TOL = dict(rel=1e-12, abs=1e-15)


def build(name, model):
    """The registry's member; AE-SAM with a stricter threshold (c_t = 1), under which the suite's batch gives it
    one-pass steps within 6 steps (the registry's options make all 6 SAM steps)."""
    if name == "aesam":
        options = dict(rho=0.1, total_steps=6, lambda1=1.0, lambda2=1.0, **SGD_OPTIONS)
        return samkit.AESAM(model.parameters(), torch.optim.SGD, **options).record_step_stats(cosine=True)
    return FAMILY[name](model).record_step_stats(cosine=True)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().double().flatten() for t in tensors])


class Observed:
    """Wraps an optimizer's first_step/second_step (instance attributes, so sam_step calls them) and measures."""

    def __init__(self, opt, model, x, y, selective: bool):
        self.opt, self.model, self.x, self.y, self.selective = opt, model, x, y, selective
        self.steps: list[dict] = []
        self.step: dict = {}
        first, second = opt.first_step, opt.second_step

        def first_step(*args, **kwargs):
            params = [t for g in opt.param_groups for t in g["params"]]
            grads = kwargs.get("grads") or [t.grad for t in params]
            before = flat(params)
            with torch.no_grad():
                clean = loss_fn(model(x), y).item()
            moved = first(*args, **kwargs)
            if moved and opt.perturbed:
                with torch.no_grad():
                    self.step["perturbed"] = loss_fn(model(x), y).item()
                self.step["eps_norm"] = (flat(params) - before).norm().item()
                self.step["clean_grad"] = flat([torch.zeros_like(t) if g is None else g for t, g in zip(params, grads)])
            self.step["clean"] = clean
            return moved

        def second_step(*args, **kwargs):
            params = [t for g in opt.param_groups for t in g["params"]]
            self.step["descent"] = flat([torch.zeros_like(t) if t.grad is None else t.grad for t in params])
            second(*args, **kwargs)
            self.steps.append(self.step)
            self.step = {}

        opt.first_step, opt.second_step = first_step, second_step


def check_steps(name, opt, observed: Observed, history, *, losses_known: bool):
    assert len(history) == STEPS and [s.step for s in history] == list(range(1, STEPS + 1))
    assert sum(s.sam for s in history) == opt.sam_steps
    if name in ONE_PASS:
        assert not all(s.sam for s in history), "a member with one-pass steps had none: the check is idle"
    for stats, seen in zip(history, observed.steps):
        assert stats.lr == 0.1
        if not stats.sam:
            assert stats.grad_norm is None and stats.eps_norm is None and stats.cosine is None
            assert stats.perturbed_loss is None and stats.loss_rise is None
            continue
        assert stats.eps_norm == pytest.approx(seen["eps_norm"], rel=1e-9)  # w + ε̂ - w rounds at ~1e-16 |w|
        assert math.isfinite(stats.grad_norm) and stats.grad_norm > 0
        g, gs = seen["clean_grad"], seen["descent"]
        assert stats.cosine == pytest.approx(float(g @ gs / (g.norm() * gs.norm())), **TOL)
        if losses_known:
            assert stats.loss == pytest.approx(seen["clean"], **TOL)
            assert stats.perturbed_loss == pytest.approx(seen["perturbed"], **TOL)
            assert stats.loss_rise == pytest.approx(seen["perturbed"] - seen["clean"], rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_sam_step_stats_for_every_member(name):
    model, (x, y) = mlp(), batch(n=24)
    opt = build(name, model)
    selective = name in SELECTIVE_PASSES
    observed = Observed(opt, model, x, y, selective)
    history = []
    for _ in range(STEPS):
        loss = sam_step(opt, model, per_example_loss if selective else loss_fn, x, y)
        history.append(opt.last_step_stats)
        assert history[-1].loss == pytest.approx(loss.item(), **TOL)  # sam_step's clean loss, as it returns it
    # the members that select examples run the perturbed pass on a selection: no batch loss at w + ε̂ to compare
    check_steps(name, opt, observed, history, losses_known=not selective)
    if selective:
        assert all(s.perturbed_loss is None for s in history)


@pytest.mark.parametrize("name", sorted(set(NAMES) - set(SELECTIVE_PASSES)))
def test_two_step_stats_for_every_member(name):
    model, (x, y) = mlp(), batch(n=24)
    opt = build(name, model)
    observed = Observed(opt, model, x, y, False)
    history = []
    for _ in range(STEPS):
        loss = loss_fn(model(x), y)
        loss.backward()
        perturbed = None
        if opt.first_step(zero_grad=True):
            perturbed = loss_fn(model(x), y)
            perturbed.backward()
        opt.second_step(zero_grad=True, loss=loss, perturbed_loss=perturbed)
        history.append(opt.last_step_stats)
    check_steps(name, opt, observed, history, losses_known=True)
