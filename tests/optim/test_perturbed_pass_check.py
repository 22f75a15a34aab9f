"""An inf or NaN gradient of the perturbed pass (at w + ε̂) never reaches the weights.

Without a GradScaler it raises ``FloatingPointError`` as the clean pass's does in ``first_step``: w restored, the
step abandoned (no base step; counters, base state and the variant's state as a ``cancel_step`` leaves them).
With a GradScaler an overflow is the scaler's business: the step is skipped whole, no error.
"""

from __future__ import annotations

import copy

import pytest
import torch

from samkit import SAM, sam_step
from tests.optim.family import FAMILY, model
from tests.optim.reference import batch, loss_fn

PERTURBING = [name for name in FAMILY if name not in ("late-sam", "momentum-sam")]  # these start one-pass


def flat(net):
    return torch.cat([t.detach().flatten() for t in net.parameters()])


def two_step(opt, net, x, y, *, perturbed_loss=loss_fn, scaler=None):
    clean = loss_fn(net(x), y)
    # ε̂ needs the clean gradient unscaled; a one-pass step's clean gradient is the descent gradient: scaled
    (clean if scaler is None or opt.will_perturb else scaler.scale(clean)).backward()
    if opt.first_step(zero_grad=True):
        loss = perturbed_loss(net(x), y)
        (loss if scaler is None else scaler.scale(loss)).backward()
    opt.second_step(zero_grad=True, scaler=scaler)
    if scaler is not None:
        scaler.update()


def poisoned(bad):
    def perturbed_loss(outputs, targets):
        return loss_fn(outputs, targets) * bad  # every gradient of the pass at w + ε̂ becomes bad (inf or NaN)

    return perturbed_loss


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("name", PERTURBING)
def test_two_step_api_refuses_a_non_finite_perturbed_gradient_and_abandons_the_step(name, bad):
    x, y = batch(n=24)
    net, twin = model(), model()
    opt, opt_twin = FAMILY[name](net), FAMILY[name](twin)
    two_step(opt, net, x, y)  # a complete step first: the base optimizer has momenta
    two_step(opt_twin, twin, x, y)
    while opt.will_perturb is False:  # up to a step that perturbs
        two_step(opt, net, x, y)
        two_step(opt_twin, twin, x, y)
    weights, base = flat(net).clone(), copy.deepcopy(opt.base_optimizer.state_dict()["state"])
    counters = (opt.steps, opt.sam_steps, opt.passes)
    with pytest.raises(FloatingPointError, match=r"gradient of the perturbed pass \(at w \+ ε̂\) is inf or NaN"):
        two_step(opt, net, x, y, perturbed_loss=poisoned(bad))
    assert torch.equal(flat(net), weights)  # bit for bit w, finite
    assert (opt.steps, opt.sam_steps, opt.passes) == counters and opt.phase.value == "ready"
    after = opt.base_optimizer.state_dict()["state"]
    assert all(torch.equal(after[k]["momentum_buffer"], base[k]["momentum_buffer"]) for k in base)
    # the same as a twin whose step was abandoned by cancel_step, from there on
    loss_fn(twin(x), y).backward()
    assert opt_twin.first_step(zero_grad=True)
    opt_twin.cancel_step()
    for o, m in ((opt, net), (opt_twin, twin)):
        m.zero_grad(set_to_none=True)
        two_step(o, m, x, y)
    assert torch.equal(flat(net), flat(twin))


@pytest.mark.parametrize("path", [dict(foreach=False), dict(restore_by="swap")], ids=["per-tensor", "swap"])
def test_every_restore_path_refuses_a_non_finite_perturbed_gradient(path):
    x, y = batch()
    net = model()
    opt = SAM(net.parameters(), torch.optim.SGD, lr=0.1, **path)
    weights = flat(net).clone()
    with pytest.raises(FloatingPointError, match="perturbed pass"):
        two_step(opt, net, x, y, perturbed_loss=poisoned(float("nan")))
    assert torch.equal(flat(net), weights) and opt.steps == 0


def test_step_with_a_closure_refuses_a_non_finite_perturbed_gradient():
    x, y = batch()
    net = model()
    opt = SAM(net.parameters(), torch.optim.SGD, lr=0.1)
    weights, calls = flat(net).clone(), []

    def closure():
        opt.zero_grad()
        loss = loss_fn(net(x), y) * (float("nan") if calls else 1.0)
        calls.append(1)
        loss.backward()
        return loss

    with pytest.raises(FloatingPointError, match="perturbed pass"):
        opt.step(closure)
    assert len(calls) == 2 and torch.equal(flat(net), weights) and opt.steps == 0 and not opt.perturbed


@pytest.mark.parametrize("name", ["sam", "looksam", "gsam", "fsam"])
def test_with_a_grad_scaler_an_overflow_in_the_perturbed_pass_skips_the_step_whole(name):
    """No error; weights, counters and the variant's state untouched; the scale backs off; the run goes on as a
    fresh optimizer's (scaling by powers of two is exact in float64)."""
    x, y = batch(n=24)
    net, twin = model(), model()
    opt, opt_twin = FAMILY[name](net), FAMILY[name](twin)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    weights = flat(net).clone()
    two_step(opt, net, x, y, perturbed_loss=lambda o, t: loss_fn(o, t) * 1e305, scaler=scaler)  # inf once scaled
    assert torch.equal(flat(net), weights)
    assert (opt.steps, opt.sam_steps, opt.passes) == (0, 0, 0.0) and opt.phase.value == "ready"
    kept = [v for value in opt._step.memory.values() for v in (value if isinstance(value, list) else [value])]
    assert all(v is None for v in kept)  # no g_v (LookSAM), no EMA (F-SAM) from the skipped step
    assert scaler.get_scale() == 2.0**15
    twin_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    for _ in range(3):  # LookSAM (k = 2): a SAM step, then a one-pass step that reuses g_v
        two_step(opt, net, x, y, scaler=scaler)
        two_step(opt_twin, twin, x, y, scaler=twin_scaler)
    torch.testing.assert_close(flat(net), flat(twin), rtol=0, atol=1e-15)


PASSES = {
    ("loop", "per_micro_batch"): 4,
    ("loop", "shared"): 4,
    ("vmap", "per_micro_batch"): 2,
    ("vmap", "shared"): 2,
}


@pytest.mark.parametrize("backend,mode", list(PASSES))
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_sam_step_without_a_scaler_raises_on_a_non_finite_perturbed_gradient(backend, mode, bad):
    x, y = batch()
    net = model()
    opt = SAM(net.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    sam_step(opt, net, loss_fn, x, y, micro_batches=2, perturbation=mode, backend=backend)
    weights, calls = flat(net).clone(), []
    perturbed = {"loop": {"per_micro_batch": (2, 4), "shared": (3, 4)}, "vmap": {mode: (2,)}}[backend][mode]

    def last_pass_poisoned(outputs, targets):
        calls.append(1)
        return loss_fn(outputs, targets) * (bad if len(calls) == perturbed[-1] else 1.0)

    with pytest.raises(FloatingPointError, match=r"perturbed pass \(at w \+ ε̂\) is inf or NaN"):
        sam_step(opt, net, last_pass_poisoned, x, y, micro_batches=2, perturbation=mode, backend=backend)
    assert len(calls) == PASSES[backend, mode]
    assert torch.equal(flat(net), weights) and (opt.steps, opt.sam_steps) == (1, 1) and not opt.perturbed
    sam_step(opt, net, loss_fn, x, y, micro_batches=2, perturbation=mode, backend=backend)  # and training goes on
    assert bool(torch.isfinite(flat(net)).all()) and opt.steps == 2
