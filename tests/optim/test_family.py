"""One suite over every optimizer of the SAM family (tests/optim/family.py): the same loops, the same guarantees.

Each variant's own formula is tested in its own file; here every member must: agree across the two-step API, the
closure API and sam_step; give SAM with gradient accumulation ("shared", k = 2) the same step as k = 1; count its
passes exactly; continue bit-exactly after a checkpoint and after a deepcopy; train under fp16 with a scaler (equal
to full precision when nothing overflows), bf16 and clipping; keep BatchNorm statistics to the clean pass; and
under DDP, 2 replicas x 1 micro-batch equal 1 process x 2 micro-batches.
"""

from __future__ import annotations

import copy
import gc
import io
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from samkit import sam_step
from samkit.step import select_examples
from tests.optim.family import FAMILY, SELECTIVE_PASSES, per_example_loss
from tests.optim.family import model as mlp
from tests.optim.reference import batch, loss_fn

NAMES = sorted(FAMILY)
STEPS = 6


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def loss_for(name):
    """The loss sam_step gets: one per example for the members that select examples, the mean for the others."""
    return per_example_loss if name in SELECTIVE_PASSES else loss_fn


def counted(name, opt) -> bool:
    """Whether opt.passes is the count the member's rule gives (1 per one-pass step, 2 per SAM step, ...)."""
    if name in SELECTIVE_PASSES:
        return opt.passes == pytest.approx(SELECTIVE_PASSES[name] * opt.steps, rel=1e-12)
    return opt.passes == opt.steps + opt.sam_steps


def two_step(model, opt, x, y, steps=STEPS):
    for _ in range(steps):
        if getattr(type(opt), "selects_examples", False):
            _selective_two_step(model, opt, x, y)
            continue
        loss_fn(model(x), y).backward()
        if opt.first_step(zero_grad=True):
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)


def _selective_two_step(model, opt, x, y):
    """The two-step API of a member that selects examples: by the clean loss before the clean pass (K-SAM), or by
    the rise of the loss after first_step (ESAM)."""
    by_rise = type(opt).ranks_perturbed_losses
    keep = slice(None) if by_rise else select_examples(opt, model, per_example_loss, x, y)
    losses = per_example_loss(model(x[keep]), y[keep])
    losses.mean().backward()
    if opt.first_step(zero_grad=True):
        if by_rise:
            keep = select_examples(opt, model, per_example_loss, x, y, clean_losses=losses)
        per_example_loss(model(x[keep]), y[keep]).mean().backward()
    opt.second_step(zero_grad=True)


def closure_steps(model, opt, x, y, steps=STEPS):
    selective = getattr(type(opt), "selects_examples", False)
    by_rise = selective and type(opt).ranks_perturbed_losses
    clean = {}

    def closure():
        opt.zero_grad()
        if not selective:
            loss = loss_fn(model(x), y)
        elif by_rise and opt.perturbed:  # ESAM's second call: the examples whose loss rose most
            keep = select_examples(opt, model, per_example_loss, x, y, clean_losses=clean["losses"])
            loss = per_example_loss(model(x[keep]), y[keep]).mean()
        else:
            clean["losses"] = per_example_loss(model(x[clean["keep"]]), y[clean["keep"]])
            loss = clean["losses"].mean()
        loss.backward()
        return loss

    for _ in range(steps):
        if selective:  # K-SAM selects before the step, for both calls; ESAM runs its first call on the batch
            clean["keep"] = slice(None) if by_rise else select_examples(opt, model, per_example_loss, x, y)
        opt.step(closure)


def stepped(name, loop, steps=STEPS, **step):
    model, (x, y) = mlp(), batch(n=24)
    opt = FAMILY[name](model)
    if loop == "two_step":
        two_step(model, opt, x, y, steps)
    elif loop == "closure":
        closure_steps(model, opt, x, y, steps)
    else:
        for _ in range(steps):
            sam_step(opt, model, loss_for(name), x, y, **step)
    return model, opt


@pytest.mark.parametrize("name", NAMES)
def test_two_step_closure_and_sam_step_agree_bit_for_bit(name):
    reference, opt = stepped(name, "two_step")
    assert (weights(reference) - weights(mlp())).abs().max() > 1e-3  # it trained
    for loop in ("closure", "sam_step"):
        model, other = stepped(name, loop)
        assert torch.equal(weights(model), weights(reference)), loop
        assert (other.steps, other.sam_steps, other.passes) == (opt.steps, opt.sam_steps, opt.passes), loop
    assert counted(name, opt) and opt.steps == STEPS


@pytest.mark.parametrize("name", NAMES)
def test_shared_perturbation_over_two_micro_batches_is_the_whole_batch_step(name):
    whole, _ = stepped(name, "sam_step", micro_batches=1)
    split, opt = stepped(name, "sam_step", micro_batches=2, perturbation="shared")
    assert (weights(whole) - weights(split)).abs().max().item() <= 1e-12
    assert counted(name, opt)  # passes count whole-batch passes, however the batch is split


@pytest.mark.parametrize("name", NAMES)
def test_micro_batch_steps_run_and_count(name):
    model, opt = stepped(name, "sam_step", micro_batches=3)
    assert torch.isfinite(weights(model)).all() and counted(name, opt)


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_and_deepcopy_continue_bit_exactly(name):
    straight, final = stepped(name, "sam_step", steps=STEPS, micro_batches=2)
    final.eval()
    first, opt = stepped(name, "sam_step", steps=3, micro_batches=2)
    opt.eval()  # the protocol's checkpoint rule: weights where evaluation must see them (Momentum-SAM moves)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = mlp(seed=7)
    resumed.load_state_dict(saved["model"])
    opt2 = FAMILY[name](resumed)
    opt2.load_state_dict(saved["opt"])
    twin_model, twin_opt = copy.deepcopy((first, opt))
    for optimizer in (opt, opt2, twin_opt):
        optimizer.train()
    (x, y) = batch(n=24)
    for model, optimizer in ((resumed, opt2), (twin_model, twin_opt), (first, opt)):
        for _ in range(STEPS - 3):
            sam_step(optimizer, model, loss_for(name), x, y, micro_batches=2)
        optimizer.eval()
        assert torch.equal(weights(model), weights(straight))
        assert optimizer.steps == STEPS


@pytest.mark.parametrize("name", NAMES)
def test_fp16_scaler_without_overflow_equals_full_precision_and_bf16_trains(name):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    scaled, opt = stepped(name, "sam_step", micro_batches=2, scaler=scaler)
    plain, reference = stepped(name, "sam_step", micro_batches=2)
    # scaling by a power of two is exact in float64: the two runs agree to rounding at most
    torch.testing.assert_close(weights(scaled), weights(plain), rtol=0, atol=1e-13)
    assert opt.passes == reference.passes and scaler.get_scale() == 2.0**13
    model, (x, y) = mlp(dtype=torch.float32), batch(n=24, dtype=torch.float32)
    opt = FAMILY[name](model)
    losses = [sam_step(opt, model, loss_for(name), x, y, micro_batches=2, autocast=torch.bfloat16) for _ in range(8)]
    assert all(torch.isfinite(loss) for loss in losses) and losses[-1] < losses[0]


@pytest.mark.parametrize("name", NAMES)
def test_clipping_bounds_the_descent_gradient_the_base_optimizer_gets(name):
    model, (x, y) = mlp(), batch(n=24)
    opt = FAMILY[name](model)
    norms = []

    def record(optimizer, args, kwargs):
        norms.append(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()])).item())

    opt.base_optimizer.register_step_pre_hook(record)
    for _ in range(STEPS):
        sam_step(opt, model, loss_for(name), x, y, max_grad_norm=0.05)
    assert len(norms) == STEPS and max(norms) <= 0.05 * (1 + 1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_batchnorm_statistics_come_from_the_clean_pass_only(name):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 3)]
    model = torch.nn.Sequential(*layers).double()
    reference = copy.deepcopy(model)
    (x, y) = batch(n=24)
    opt = FAMILY[name](model)
    for _ in range(3):
        before = copy.deepcopy(model)
        sam_step(opt, model, loss_for(name), x, y)
        reference.load_state_dict(before.state_dict())
        reference(x)  # one clean forward in training mode at the step's starting weights
        assert torch.equal(model[1].running_mean, reference[1].running_mean)
        assert torch.equal(model[1].running_var, reference[1].running_var)
    assert model[1].num_batches_tracked.item() == 3


# ---------------------------------------------------------------------------------------------------------------
# DDP: every member, one spawn


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        x, y = batch(n=24)
        half = slice(rank * 12, (rank + 1) * 12)
        for name in NAMES:
            model = torch.nn.parallel.DistributedDataParallel(mlp())
            opt = FAMILY[name](model.module)
            for _ in range(STEPS):
                sam_step(opt, model, loss_for(name), x[half], y[half])
            torch.save(weights(model.module), f"{out_dir}/{name}-rank{rank}.pt")
            del model, opt
    finally:
        gc.collect()  # no DDP reducer may outlive the process group: gloo would abort the process at exit
        dist.destroy_process_group()


def test_two_replicas_equal_one_process_with_two_micro_batches(tmp_path):
    mp.spawn(_replica, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for name in NAMES:
        rank0 = torch.load(tmp_path / f"{name}-rank0.pt", weights_only=True)
        rank1 = torch.load(tmp_path / f"{name}-rank1.pt", weights_only=True)
        assert torch.equal(rank0, rank1), name
        expected, _ = stepped(name, "sam_step", micro_batches=2)
        assert (rank0 - weights(expected)).abs().max().item() <= 1e-10, name
