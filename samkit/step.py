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

A note on names: the SAM paper's m is the micro-batch SIZE (m = N / k per replica); ``micro_batches`` here is
the COUNT k. Smaller m (larger k) is the stronger regulariser (their Fig. 3). Under DDP every replica perturbs
with its own gradient, so R replicas x k micro-batches give m = N_global / (R k).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from samkit.batchnorm import frozen_running_stats
from samkit.optim.sam import SAM

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
        optimizer: a ``samkit.SAM``. Its ``interval`` is honoured: skipped steps are one plain pass.
        model: the module (or a ``DistributedDataParallel`` wrapping it) called as ``model(inputs)``.
        loss_fn: ``loss_fn(outputs, targets)`` returning the MEAN loss over the (micro-)batch.
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
            twice"), a non-finite gradient in either pass skips the whole step (weights untouched) and the scale
            is updated once per step.
        max_grad_norm: clip the final (averaged, perturbed) gradient to this global 2-norm; ε̂ never sees
            clipping, and clipping changes only the magnitude of the step.
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
    precision = _Precision(scaler, autocast, trainable[0].device.type)
    optimizer.zero_grad(set_to_none=True)
    try:
        if backend == "vmap":
            from samkit.vectorized import vectorized_step_gradients

            loss, finite = vectorized_step_gradients(
                optimizer, model, loss_fn, inputs, targets, micro_batches, perturbation, precision, trainable
            )
        else:
            loss, finite = _loop_step_gradients(
                optimizer, model, loss_fn, inputs, targets, micro_batches, perturbation, precision, params
            )
    except BaseException:
        optimizer.cancel_step()  # an error in a perturbed pass (e.g. out of memory) must not leave w + ε̂ behind
        raise
    if not finite:
        _skip_step(optimizer, precision, trainable)
        return loss
    if precision.scaler is not None:
        precision.scaler.unscale_(optimizer.base_optimizer)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    optimizer.second_step(scaler=precision.scaler)
    if precision.scaler is not None:
        precision.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss


# ----------------------------------------------------------------------------------------------------------------
# the loop backend


def _loop_step_gradients(optimizer, model, loss_fn, inputs, targets, k, perturbation, precision, params):
    """Leave the final (scaled) gradient in ``.grad``; return (mean clean loss, all gradients finite)."""
    chunks = split_batch(inputs, targets, k)
    trainable = [t for t in params if t.requires_grad]
    total = 0.0
    sam = optimizer.is_sam_step

    if not sam or perturbation == "shared":
        # clean passes accumulate the (weighted) batch gradient in .grad; DDP all-reduces only when no ascent follows
        for j, (x, y, weight) in enumerate(chunks):
            sync = not sam and j == len(chunks) - 1
            with _no_sync(model, enabled=not sync):
                loss = _forward_loss(model, loss_fn, x, y, precision)
                precision.scale(loss * weight).backward()
            total = total + loss.detach() * weight
        if not sam:
            optimizer.first_step()  # a step that interval skips: nothing moves, .grad is kept for the base step
            return total, _all_finite(trainable, model, precision)
        grads = [t.grad for t in params]
        precision.unscale_(grads)
        if not _all_finite(trainable, model, precision, grads):
            return total, False
        optimizer.first_step(zero_grad=True, grads=grads)  # .grad is dropped, the tensors in grads live on
        for j, (x, y, weight) in enumerate(chunks):
            with frozen_running_stats(model), _no_sync(model, enabled=j < len(chunks) - 1):
                perturbed = _forward_loss(model, loss_fn, x, y, precision)
                precision.scale(perturbed * weight).backward()
        optimizer.restore()
        return total, True

    for j, (x, y, weight) in enumerate(chunks):
        with _no_sync(model, enabled=True):  # each replica's ascent uses its own gradient (m-sharpness)
            loss = _forward_loss(model, loss_fn, x, y, precision)
            grads = torch.autograd.grad(precision.scale(loss), trainable, allow_unused=True)
        total = total + loss.detach() * weight
        local = [g for g in grads if g is not None]
        precision.unscale_(local)
        if not _all_finite(trainable, model, precision, local):
            optimizer.cancel_step()
            return total, False
        by_param = dict(zip(trainable, grads))
        optimizer.first_step(grads=[by_param.get(t) for t in params])
        del grads, local, by_param
        with frozen_running_stats(model), _no_sync(model, enabled=j < len(chunks) - 1):
            perturbed = _forward_loss(model, loss_fn, x, y, precision)
            precision.scale(perturbed * weight).backward()
        optimizer.restore()
    return total, True


# ----------------------------------------------------------------------------------------------------------------
# shared pieces (also used by samkit.vectorized)


def split_batch(inputs: Tensor, targets: Tensor, k: int) -> list[tuple[Tensor, Tensor, float]]:
    """k micro-batches along dim 0 with their weights |B_j| / N (sizes differ by at most one)."""
    n = len(inputs)
    return [(x, y, len(x) / n) for x, y in zip(torch.tensor_split(inputs, k), torch.tensor_split(targets, k))]


class _Precision:
    """Autocast for the forward passes and GradScaler bookkeeping, or nothing at all."""

    def __init__(self, scaler, autocast_dtype, device_type):
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.autocast_dtype = autocast_dtype
        self.device_type = device_type

    def forward_context(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def scale(self, loss: Tensor) -> Tensor:
        return loss if self.scaler is None else self.scaler.scale(loss)

    def unscale_(self, grads: Sequence[Tensor]) -> None:
        grads = [g for g in grads if g is not None]
        if self.scaler is not None and grads:
            torch._foreach_mul_(grads, 1.0 / self.scaler.get_scale())


def _forward_loss(model, loss_fn, x, y, precision) -> Tensor:
    with precision.forward_context():
        loss = loss_fn(model(x), y)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn must return a scalar tensor (the mean loss over the micro-batch), got {shape}; "
            "use reduction='mean'"
        )
    return loss.float() if loss.dtype in (torch.float16, torch.bfloat16) else loss


def _all_finite(trainable, model, precision, grads=None) -> bool:
    """Whether every gradient is finite (agreed across DDP replicas, so that all of them skip together)."""
    grads = [t.grad for t in trainable] if grads is None else grads
    grads = [g for g in grads if g is not None]
    if not grads:
        return True
    finite = torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(grads)])).all()
    if _is_ddp(model) and precision.scaler is not None:
        flag = (~finite).to(torch.float32).reshape(1)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        finite = flag[0] == 0
    if precision.scaler is None and not bool(finite):
        raise FloatingPointError(
            "a gradient in sam_step is inf or NaN: SAM will not write non-finite values into the weights. "
            "Lower the learning rate, or pass scaler=torch.amp.GradScaler() under fp16 to skip such steps"
        )
    return bool(finite)


def _skip_step(optimizer: SAM, precision: _Precision, trainable) -> None:
    """An overflow under a GradScaler: weights untouched, and the scaler backs off through its own logic."""
    optimizer.cancel_step()
    for t in trainable:
        t.grad = None
    # one non-finite gradient makes the scaler record the overflow (same on every replica), skip and back off
    trainable[0].grad = torch.full_like(trainable[0], float("inf"))
    precision.scaler.unscale_(optimizer.base_optimizer)
    precision.scaler.step(optimizer.base_optimizer)
    precision.scaler.update()
    optimizer.zero_grad(set_to_none=True)


def _is_ddp(model) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def _no_sync(model, *, enabled: bool):
    return model.no_sync() if enabled and _is_ddp(model) else contextlib.nullcontext()


def _check_arguments(optimizer, model, inputs, targets, k, perturbation, backend, max_grad_norm, scaler):
    if not isinstance(optimizer, SAM):
        raise TypeError(
            f"sam_step needs a samkit.SAM optimizer, got {type(optimizer).__name__}: wrap it, e.g. "
            "SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)"
        )
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"micro_batches must be an integer >= 1 (the number of micro-batches), got {k!r}")
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {perturbation!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
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
    if max_grad_norm is not None and not (max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be > 0 (or None for no clipping), got {max_grad_norm!r}")
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
