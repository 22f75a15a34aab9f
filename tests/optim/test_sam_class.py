"""SAM as a torch Optimizer in the loops users write: copies, schedulers, step hooks, refused bases, resumes with
other options, whole-step torch.compile, and a wrapper that copies the optimizer's __dict__ (Lightning's)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from samkit import SAM, sam_step
from tests.optim.reference import batch, loss_fn, mlp

SGD_OPTIONS = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)


def two_step(model, opt, x, y, steps):
    for _ in range(steps):
        loss_fn(model(x), y).backward()
        if opt.first_step(zero_grad=True):
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("how", ["deepcopy_dict", "pickle"])
def test_copies_of_model_and_optimizer_train_like_the_original(how):
    (x, y) = batch()
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, interval=2, **SGD_OPTIONS)
    two_step(model, opt, x, y, 3)  # momentum buffers, a saved-w buffer and an odd step count exist
    bundle = {"model": model, "opt": opt}
    twin = copy.deepcopy(bundle) if how == "deepcopy_dict" else pickle.loads(pickle.dumps(bundle))
    twin_model, twin_opt = twin["model"], twin["opt"]
    assert twin_opt.steps == 3 and twin_opt.base_optimizer.param_groups is twin_opt.param_groups
    copied = [p for g in twin_opt.param_groups for p in g["params"]]
    assert all(a is b for a, b in zip(copied, twin_model.parameters()))  # the copy optimises the copied model
    two_step(model, opt, x, y, 3)
    two_step(twin_model, twin_opt, x, y, 3)
    assert torch.equal(weights(model), weights(twin_model))
    assert twin_opt.passes == opt.passes == 9.0  # steps 0, 2, 4 perturb: 6 + 3 passes


@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.Adam])
@pytest.mark.parametrize("scheduler", ["onecycle", "cyclic"])
def test_momentum_cycling_schedulers_accept_sam_and_drive_the_base(base, scheduler):
    model = mlp()
    options = dict(lr=0.1, momentum=0.9) if base is torch.optim.SGD else dict(lr=1e-3)
    opt = SAM(model.parameters(), base, **options)
    if scheduler == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=10)
    else:
        sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.5, step_size_up=3)
    (x, y) = batch()
    seen = []
    for _ in range(4):
        two_step(model, opt, x, y, 1)
        sched.step()
        seen.append((opt.base_optimizer.param_groups[0]["lr"], opt.param_groups[0].get("momentum")))
    assert len({lr for lr, _ in seen}) == 4  # the learning rate moves, on the base optimizer's own groups
    key = "momentum" if base is torch.optim.SGD else "betas"
    assert key in opt.defaults and len({str(opt.param_groups[0][key]) for _ in seen}) == 1


def test_step_hooks_fire_once_per_step_in_every_loop():
    (x, y) = batch()
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o.perturbed)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o.steps)))
    two_step(model, opt, x, y, 1)
    sam_step(opt, model, loss_fn, x, y, micro_batches=2)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    # the pre hook sees the weights back at w; the post hook sees the step counted
    assert calls == [("pre", False), ("post", 1), ("pre", False), ("post", 2), ("pre", False), ("post", 3)]


def test_bases_that_cannot_step_with_a_given_gradient_are_refused():
    model = mlp()
    with pytest.raises(TypeError, match="LBFGS re-evaluates the loss"):
        SAM(model.parameters(), torch.optim.LBFGS, lr=0.1)
    with pytest.raises(TypeError, match="LBFGS re-evaluates the loss"):
        SAM(model.parameters(), torch.optim.LBFGS(model.parameters()))
    inner = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="itself a SAM-family optimizer"):
        SAM(model.parameters(), inner)
    with pytest.raises(TypeError, match="itself a SAM-family optimizer"):
        SAM(model.parameters(), SAM)


def test_resume_with_other_options_is_refused_and_names_them():
    (x, y) = batch()
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, interval=2, lr=0.1)
    two_step(model, opt, x, y, 3)
    saved = opt.state_dict()
    assert saved["sam"]["options"] == {"interval": 2, "eps": 1e-12}
    with pytest.raises(ValueError, match="saved with interval=2, this SAM has interval=3.*build it with interval=2"):
        SAM(mlp().parameters(), torch.optim.SGD, interval=3, lr=0.1).load_state_dict(saved)
    with pytest.raises(ValueError, match="saved with eps=1e-12, this SAM has eps=0.0"):
        SAM(mlp().parameters(), torch.optim.SGD, interval=2, eps=0.0, lr=0.1).load_state_dict(saved)
    same = SAM(mlp().parameters(), torch.optim.SGD, interval=2, lr=0.5)
    same.load_state_dict(saved)  # equal options: resumes; the groups' lr comes from the checkpoint, as in torch
    assert same.steps == 3 and same.passes == opt.passes and same.param_groups[0]["lr"] == 0.1


def test_lightning_style_wrapper_shares_the_step_state():
    """Lightning's optimizer wrapper copies the optimizer's __dict__ into an object of a subclass of its class and
    calls the SAM methods on that copy: counts, phases and the interval must still be the real optimizer's."""
    (x, y) = batch()
    model, twin = mlp(), mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, interval=2, **SGD_OPTIONS)
    reference = SAM(twin.parameters(), torch.optim.SGD, interval=2, **SGD_OPTIONS)

    class Wrapper:
        def __init__(self, optimizer):
            self.__dict__ = {k: v for k, v in optimizer.__dict__.items() if k not in ("step", "__del__")}
            self._optimizer = optimizer

    wrapper = Wrapper(opt)
    wrapper.__class__ = type("LightningSAM", (Wrapper, type(opt)), {})
    for _ in range(4):
        two_step(model, wrapper, x, y, 1)
        two_step(twin, reference, x, y, 1)
    assert opt.steps == 4 and opt.sam_steps == 2 and opt.passes == 6.0
    assert torch.equal(weights(model), weights(twin))
    assert opt.state_dict()["sam"]["steps_taken"] == 4


def test_whole_step_torch_compile_trains_like_eager_without_recompiling():
    torch._dynamo.reset()
    (x, y) = batch(dtype=torch.float32)
    model = mlp(dtype=torch.float32)
    twin = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, interval=2, **SGD_OPTIONS)
    eager_opt = SAM(twin.parameters(), torch.optim.SGD, interval=2, **SGD_OPTIONS)

    def step(m, o):
        loss = loss_fn(m(x), y)
        loss.backward()
        if o.first_step(zero_grad=True):
            loss_fn(m(x), y).backward()
        o.second_step(zero_grad=True)
        return loss.detach()

    compiled = torch.compile(step)
    counters = torch._dynamo.utils.counters
    losses = []
    for i in range(8):
        losses.append((compiled(model, opt), step(twin, eager_opt)))
        if i == 3:
            frames = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == frames  # steps 4..7 (SAM and one-pass alike) reuse the graphs
    assert opt.steps == 8 and opt.sam_steps == 4
    assert (weights(model) - weights(twin)).abs().max().item() <= 1e-5
    assert all(abs(a.item() - b.item()) <= 1e-5 for a, b in losses)
