"""The ascent and the restore alone: samkit's foreach path against an optimizer step and a per-tensor loop.

Two rows, both timed interleaved (``benchmarks.timing``) on parameters whose ``.grad`` is already set::

    perturb_over_sgd_step:   t(SAM.first_step(); SAM.restore()) / t(SGD(momentum).step())
                             on a WRN-16-4's parameters (2.7M in 44 tensors)             target <= 1.5
    perturb_over_sgd_step_swap: the same with SAM(restore_by="swap"): w + ε̂ built in a second buffer and
                             swapped in and out with ``param.data = ...`` (no save, no copy back)
                                                                                         target <= 1.5
    loop_over_foreach_small: t(per-tensor reference first_step + restore) / t(samkit's)
                             on 800 small tensors (biases and 3x3 kernels)               target >= 1.5

An SGD(momentum) step reads the gradient, the momentum buffer and the weights and writes two of them, so it
is the natural unit: the ascent does comparable work (a norm, a save, an add, a copy back). The reference
loop is ``benchmarks.reference_sam`` (the most used public implementation's style).

Beside samkit's time, ``perturb_over_sgd_step`` times the floor of any bit-exact save/perturb/restore that
keeps the weights in place: the five kernels it cannot do without, on buffers allocated beforehand and with
no bookkeeping at all (no torch kernel fuses w + g * s without an FMA, which would change the rounding)::

    norms = foreach_norm(g);  s = ||norms|| ...     # the global norm
    saved <- w                                     # the save (a copy)
    e <- g * (rho / (norm + eps))                  # ε̂ into a buffer (torch.mul(..., out=e) per tensor)
    w += e                                         # the ascent
    w <- saved                                     # the restore (a copy)
"""

from __future__ import annotations

import torch

from benchmarks.allocator import minor_page_faults
from benchmarks.reference_sam import LoopSAMPerturbation
from benchmarks.timing import check_count, interleaved, median_ratio, medians
from benchmarks.workloads import small_parameters, wide_parameters
from samkit import SAM

LR, MOMENTUM, RHO = 0.01, 0.9, 0.05


def perturb_over_sgd_step(*, width: int = 4, repeats: int = 31, warmup: int = 3, device: str = "cpu") -> dict:
    """Row ``perturb_over_sgd_step``: {"value": ratio, "details": {...}}."""
    params = wide_parameters(width=width, device=device)
    sgd = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    sam = SAM(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)
    sam_swap = SAM(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, restore_by="swap")
    sgd.step()  # creates the momentum buffers: later steps are the steady state

    def ascent_and_restore(optimizer) -> None:
        optimizer.first_step()
        optimizer.restore()

    kernels = _kernels(params, sgd)
    variants = {
        "sgd_step": sgd.step,
        "first_step_restore": lambda: ascent_and_restore(sam),
        "first_step_restore_swap": lambda: ascent_and_restore(sam_swap),
        "floor": _floor(params),
        **kernels,
    }
    times = interleaved(variants, repeats=repeats, warmup=warmup)
    return {
        "value": median_ratio(times, "first_step_restore", "sgd_step"),
        "swap": median_ratio(times, "first_step_restore_swap", "sgd_step"),
        "details": {
            "floor_over_sgd_step": median_ratio(times, "floor", "sgd_step"),
            "samkit_over_floor": median_ratio(times, "first_step_restore", "floor"),
            "parameters": sum(p.numel() for p in params),
            "tensors": len(params),
            "sgd_implementation": _sgd_implementation(sgd),
            "repeats": repeats,
            "median_seconds": medians(times),
            "ratio_of_minimums": min(times["first_step_restore"]) / min(times["sgd_step"]),
            "kernel_over_sgd_step": {name: median_ratio(times, name, "sgd_step") for name in kernels},
            "minor_page_faults_per_call": {
                name: minor_page_faults(variants[name])
                for name in ("sgd_step", "first_step_restore", "first_step_restore_swap")
            },
        },
    }


def loop_over_foreach_small(*, count: int = 800, repeats: int = 31, warmup: int = 3, device: str = "cpu") -> dict:
    """Row ``loop_over_foreach_small``: {"value": ratio, "details": {...}} (also samkit's own loop path)."""
    check_count("count", count, minimum=1)
    params = small_parameters(count, device=device)
    reference = LoopSAMPerturbation(params, rho=RHO)
    sam = SAM(params, torch.optim.SGD, rho=RHO, lr=LR)
    sam_loop = SAM(params, torch.optim.SGD, rho=RHO, lr=LR, foreach=False)

    def run(optimizer) -> None:
        optimizer.first_step()
        optimizer.restore()

    times = interleaved(
        {"reference_loop": lambda: run(reference), "samkit": lambda: run(sam), "samkit_loop": lambda: run(sam_loop)},
        repeats=repeats,
        warmup=warmup,
    )
    return {
        "value": median_ratio(times, "reference_loop", "samkit"),
        "details": {
            "tensors": count,
            "parameters": sum(p.numel() for p in params),
            "repeats": repeats,
            "median_seconds": medians(times),
            "samkit_loop_over_samkit": median_ratio(times, "samkit_loop", "samkit"),
            "ratio_of_minimums": min(times["reference_loop"]) / min(times["samkit"]),
        },
    }


def _floor(params: list[torch.Tensor]):
    weights = [p.detach() for p in params]
    grads = [p.grad for p in params]
    saved = [torch.empty_like(w) for w in weights]
    epsilon = [torch.empty_like(w) for w in weights]

    @torch.no_grad()
    def run() -> None:
        scale = RHO / (torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)), 2) + 1e-12)
        torch._foreach_copy_(saved, weights)
        for g, e in zip(grads, epsilon):
            torch.mul(g, scale, out=e)
        torch._foreach_add_(weights, epsilon)
        torch._foreach_copy_(weights, saved)

    return run


def _kernels(params: list[torch.Tensor], sgd: torch.optim.SGD) -> dict:
    """Each foreach kernel of the floor and of an SGD(momentum) step alone, on the same tensors (the profile)."""
    weights = [p.detach() for p in params]
    grads = [p.grad for p in params]
    buffers = [torch.zeros_like(w) for w in weights]
    momentum = [sgd.state[p]["momentum_buffer"] for p in params]
    scale = torch.tensor(1.0)
    no_grad = torch.no_grad()
    return {
        "floor_norm": no_grad(lambda: torch._foreach_norm(grads)),
        "floor_copy": no_grad(lambda: torch._foreach_copy_(buffers, weights)),
        "floor_mul_out": no_grad(lambda: [torch.mul(g, scale, out=b) for g, b in zip(grads, buffers)]),
        "floor_add_": no_grad(lambda: torch._foreach_add_(buffers, grads)),
        "sgd_momentum_mul_": no_grad(lambda: torch._foreach_mul_(momentum, 1.0)),
        "sgd_momentum_add_": no_grad(lambda: torch._foreach_add_(momentum, grads, alpha=0.0)),
        "sgd_weights_add_": no_grad(lambda: torch._foreach_add_(buffers, momentum, alpha=-0.0)),
    }


def _sgd_implementation(optimizer: torch.optim.SGD) -> str:
    """Which torch SGD path runs: an explicit choice, or torch's default for this device (per-tensor on CPU)."""
    group = optimizer.param_groups[0]
    if group.get("fused"):
        return "fused"
    if group.get("foreach") is not None:
        return "foreach" if group["foreach"] else "for-loop"
    from torch.optim.optimizer import _default_to_fused_or_foreach

    _, foreach = _default_to_fused_or_foreach(group["params"], differentiable=False, use_fused=False)
    return "foreach (torch default here)" if foreach else "for-loop (torch default here)"
