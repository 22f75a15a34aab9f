"""``sam_step``: one complete SAM / mSAM training step, right about micro-batches, AMP, BatchNorm, clipping, DDP.

mSAM (Behdin et al. 2023, arXiv 2302.09693) with k micro-batches B_1..B_k of a batch B (|B| = N)::

    for j in 1..k:
        g_j  = ∇L_{B_j}(w)                     # clean pass; BN running stats update here; DDP: no all-reduce
        ε_j  = ε̂(g_j)                          # samkit.optim.perturbation, each micro-batch its own ascent
        G   += (|B_j| / N) ∇L_{B_j}(w + ε_j)   # perturbed pass; BN stats frozen; DDP: all-reduce on the last j
        w    = saved w                          # bit-exact restore
    base_optimizer.step(G)                     # after unscale (AMP) and clipping of G's global norm

``perturbation="shared"`` instead takes ONE ε̂ from the accumulated gradient of the whole batch: SAM with
gradient accumulation, equal to plain SAM on the whole batch. k = 1 is plain SAM in both modes.

Any optimizer of the SAM family works here: ``sam_step`` follows the step protocol of
``samkit.optim.protocol`` (the optimizer decides which steps perturb and what the descent gradient is), so a
one-pass step of LookSAM, RST, AE-SAM, late-phase SAM or ``interval`` costs one forward-backward.

A note on names: the SAM paper's m is the micro-batch SIZE (m = N / k per replica); ``micro_batches`` here is
the COUNT k. Smaller m (larger k) is the stronger regulariser (their Fig. 3). Under DDP every replica perturbs
with its own gradient, so R replicas x k micro-batches give m = N_global / (R k).

Under FSDP2 (``fully_shard``) the ranks share one sharded copy of the weights, so they cannot each perturb with
their own gradient: ``perturbation="shared"`` is required, and ε̂ is the global batch's (docs/fsdp.md).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from samkit.optim.sam import SAM, check_max_grad_norm
from samkit.step.common import Precision, all_finite, is_ddp, is_fsdp, skip_step
from samkit.step.loop import loop_step_gradients
from samkit.step.selective import selective_step_gradients, selects_examples

PERTURBATIONS = ("per_micro_batch", "shared")
BACKENDS = ("loop", "vmap")


def sam_step(
    optimizer: SAM,
    model: torch.nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    micro_batches: int = 1,
    perturbation: str = "per_micro_batch",
    backend: str = "loop",
    scaler: Optional[torch.amp.GradScaler] = None,
    max_grad_norm: Optional[float] = None,
    autocast: Optional[torch.dtype] = None,
) -> Tensor:
    """Run one SAM (k = 1) or mSAM (k > 1) step; return the mean clean loss over the batch (detached).

    Args:
        optimizer: a ``samkit.SAM`` or any optimizer of its family (``samkit.GSAM``, ``samkit.LookSAM``, ...).
            Its rule decides which steps perturb: one-pass steps are one forward-backward.
        model: the module (or a ``DistributedDataParallel`` wrapping it, or a module ``fully_shard`` has sharded)
            called as ``model(inputs)``.
        loss_fn: ``loss_fn(outputs, targets)`` returning the MEAN loss over the (micro-)batch, or one loss per
            example (``reduction="none"``, shape [len(batch)]), which is averaged. An optimizer that selects
            examples by their losses (ESAM, K-SAM: ``samkit.step.selective``) needs the
            per-example form, e.g. ``lambda out, y: F.cross_entropy(out, y, reduction="none")``.
        inputs, targets: the batch; split along dim 0 into ``micro_batches`` parts.
        micro_batches: k, the number of micro-batches (not their size m; see the module docstring).
        perturbation: ``"per_micro_batch"`` (mSAM) or ``"shared"`` (one ε̂: SAM with gradient accumulation).
        backend: ``"loop"`` (any model; micro-batches one after another) or ``"vmap"`` (``torch.func``: all
            micro-batches in one vectorised call; models without BatchNorm running statistics, equal-size
            micro-batches, no DDP). Measured on CPU (BENCHMARKS.md): vmap is faster only for small
            fully-connected models with many tiny micro-batches (k = 32: 0.75x to 0.94x the loop's time for an
            MLP), and slower for convolutional models (1.05x to 1.18x for a small CNN) and at k = 4 (1.25x to
            1.29x with glibc's default allocator); it also holds k copies of the weights. The loop is the
            default for that reason. See BENCHMARKS.md.
        scaler: a ``torch.amp.GradScaler`` for fp16: both passes are scaled and unscaled here (no "unscale
            twice"), a non-finite gradient in either pass skips the whole step (weights, counters and the
            variant's state untouched) and the scale is updated once per step. Without a scaler, an inf or NaN
            gradient in either pass raises ``FloatingPointError``: the weights are w and the optimizer's step is
            abandoned (counters and state as before it; see docs/refusals.md).
        max_grad_norm: clip the final descent gradient to this global 2-norm; ε̂ never sees clipping, and
            clipping changes only the magnitude of the step.
        autocast: run the forward passes under ``torch.autocast`` with this dtype (``torch.bfloat16`` or
            ``torch.float16``); backward passes run outside autocast, as PyTorch recommends.

    Example::

        >>> model = torch.nn.Linear(4, 3)
        >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> loss = sam_step(opt, model, torch.nn.functional.cross_entropy, x, y, micro_batches=4)
    """
    _check_arguments(optimizer, model, inputs, targets, micro_batches, perturbation, backend, max_grad_norm, scaler)
    params = [t for group in optimizer.param_groups for t in group["params"]]
    trainable = [t for t in params if t.requires_grad]
    if not trainable:
        raise ValueError("the optimizer has no parameter that requires grad: nothing to train")
    precision = Precision(scaler, autocast, trainable[0].device.type)
    optimizer.zero_grad(set_to_none=True)
    try:
        if backend == "vmap":
            from samkit.step.vectorized import vectorized_step_gradients

            loss, finite, perturbed_loss = vectorized_step_gradients(
                optimizer, model, loss_fn, inputs, targets, micro_batches, perturbation, precision, params
            )
        elif selects_examples(optimizer):
            # the perturbed pass runs on the selected examples only: no loss at w + ε̂ over the batch to compare
            loss, finite = selective_step_gradients(
                optimizer, model, loss_fn, inputs, targets, micro_batches, perturbation, precision, params
            )
            perturbed_loss = None
        else:
            loss, finite, perturbed_loss = loop_step_gradients(
                optimizer, model, loss_fn, inputs, targets, micro_batches, perturbation, precision, params
            )
    except BaseException:
        optimizer.cancel_step()  # an error in a perturbed pass (e.g. out of memory) must not leave w + ε̂ behind
        raise
    if not finite:
        skip_step(optimizer, precision, trainable, unscaled=False)
        return loss
    if precision.scaler is not None:
        precision.scaler.unscale_(optimizer.base_optimizer)
        # an overflow in the perturbed pass: skip before the variant's descent reads the gradient
        if not all_finite(trainable, model, precision):
            skip_step(optimizer, precision, trainable, unscaled=True)
            return loss
    if is_ddp(model) and optimizer.clean_gradient is not None:
        _average_over_replicas(optimizer.clean_gradient)
    optimizer.second_step(
        scaler=precision.scaler, max_grad_norm=max_grad_norm, loss=loss, perturbed_loss=perturbed_loss
    )
    if precision.scaler is not None:
        precision.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss


def _average_over_replicas(tensors) -> None:
    present = [t for t in tensors if t is not None]
    world = torch.distributed.get_world_size()
    for t in present:
        torch.distributed.all_reduce(t)
    if present:
        torch._foreach_div_(present, world)


def _check_arguments(optimizer, model, inputs, targets, k, perturbation, backend, max_grad_norm, scaler):
    if not isinstance(optimizer, SAM):
        raise TypeError(
            f"sam_step needs an optimizer of the SAM family (samkit.SAM, samkit.GSAM, ...), got "
            f"{type(optimizer).__name__}: wrap it, e.g. SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)"
        )
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"micro_batches must be an integer >= 1 (the number of micro-batches), got {k!r}")
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {perturbation!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "vmap" and selects_examples(optimizer):
        raise ValueError(
            f"backend='vmap' cannot run {type(optimizer).__name__}: it runs its passes on a selection of the batch, "
            "which torch.func.vmap cannot vectorise; use backend='loop'"
        )
    if backend == "vmap" and not type(optimizer).vectorizable:
        raise ValueError(
            f"backend='vmap' cannot run {type(optimizer).__name__}: its ascent keeps per-step state that "
            "torch.func.vmap cannot carry; use backend='loop'"
        )
    if len(inputs) != len(targets):
        raise ValueError(
            f"inputs and targets have different lengths ({len(inputs)} vs {len(targets)}): they must pair up "
            "along dim 0"
        )
    if len(inputs) < k:
        raise ValueError(
            f"the batch has {len(inputs)} examples, fewer than micro_batches={k}: use a larger batch or fewer "
            "micro-batches"
        )
    if is_fsdp(model):
        _check_fsdp(optimizer, perturbation, backend)
    check_max_grad_norm(max_grad_norm)
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")


def _check_fsdp(optimizer, perturbation, backend) -> None:
    """What FSDP2 (``fully_shard``) cannot give, refused with the reason (docs/fsdp.md)."""
    if perturbation == "per_micro_batch":
        raise ValueError(
            "perturbation='per_micro_batch' under FSDP2: the ranks hold one sharded copy of the weights and every "
            "forward all-gathers it from all of them, so a rank cannot sit at its own w + ε̂ and each replica (or "
            "micro-batch) cannot perturb with its own gradient, as it does under DDP. Use perturbation='shared' "
            "(one ε̂ from the global batch's gradient: SAM on the global batch), or DDP for per-replica m-sharpness"
        )
    if backend == "vmap":
        raise ValueError(
            "backend='vmap' does not support FSDP2: torch.func.functional_call bypasses the all-gather of the "
            "sharded parameters; use backend='loop'"
        )
    if selects_examples(optimizer):
        raise ValueError(
            f"{type(optimizer).__name__} under FSDP2: it ranks the examples of the batch by their losses, and with "
            "perturbation='shared' (the only mode FSDP2 allows) the ranking must run over the global batch, which "
            "is split over the ranks; a rank-local ranking would select other examples than one process. Use DDP "
            "(each replica ranks its own examples) or one process"
        )
