"""What the loop and vmap backends of ``sam_step`` share: batch splitting, precision, finiteness, overflow skips."""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence, cast

import torch
from torch import Tensor
from torch.distributed.fsdp import FSDPModule

from samkit.optim.sam import finite_by_norms, first_non_finite, sparse_gradient_message
from samkit.optim.sharded import to_local


def split_batch(inputs: Tensor, targets: Tensor, k: int) -> list[tuple[Tensor, Tensor, float]]:
    """k micro-batches along dim 0 with their weights |B_j| / N (sizes differ by at most one)."""
    n = len(inputs)
    return [(x, y, len(x) / n) for x, y in zip(torch.tensor_split(inputs, k), torch.tensor_split(targets, k))]


class Precision:
    """Autocast for the forward passes and GradScaler bookkeeping, or nothing at all."""

    def __init__(self, scaler: Optional[torch.amp.GradScaler], autocast_dtype, device_type: str):
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.autocast_dtype = autocast_dtype
        self.device_type = device_type

    def forward_context(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def scale(self, loss: Tensor) -> Tensor:
        return loss if self.scaler is None else self.scaler.scale(loss)

    def unscale_(self, grads: Sequence[Optional[Tensor]]) -> None:
        grads = [to_local(g) for g in grads if g is not None]  # FSDP2: in place on each rank's shards
        if self.scaler is not None and grads:
            torch._foreach_mul_(cast(list[Tensor], grads), 1.0 / self.scaler.get_scale())  # the None are gone

    def unscaled(self, grads: Sequence[Optional[Tensor]]) -> list[Optional[Tensor]]:
        """Unscaled copies (the tensors themselves when there is no scaler)."""
        if self.scaler is None:
            return list(grads)
        inverse = 1.0 / self.scaler.get_scale()
        return [None if g is None else g * inverse for g in grads]


def forward_loss(model, loss_fn, x, y, precision: Precision) -> Tensor:
    """The mean loss over the micro-batch: ``loss_fn`` may return it, or one loss per example (averaged here)."""
    with precision.forward_context():
        loss = loss_fn(model(x), y)
    if isinstance(loss, Tensor) and loss.dim() == 1 and len(loss) == len(x):
        return _full(loss).mean()  # the same operations as a selecting optimizer's mean over its examples
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn must return a scalar tensor (the mean loss over the micro-batch) or one loss per example "
            f"(shape ({len(x)},)), got {shape}; use reduction='mean' or reduction='none'"
        )
    return _full(loss)


def _full(loss: Tensor) -> Tensor:
    return loss.float() if loss.dtype in (torch.float16, torch.bfloat16) else loss


def forward_losses(model, loss_fn, x, y, precision: Precision, optimizer=None) -> Tensor:
    """One loss per example (shape [len(x)]), for an optimizer that selects examples by their losses."""
    with precision.forward_context():
        losses = loss_fn(model(x), y)
    check_per_example(losses, len(x), optimizer)
    return _full(losses)


def check_per_example(losses, n: int, optimizer=None) -> None:
    """Refuse, naming the fix, a loss that is not one value per example (shape [n])."""
    if isinstance(losses, Tensor) and losses.dim() == 1 and len(losses) == n:
        return
    shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
    name = "this optimizer" if optimizer is None else type(optimizer).__name__
    raise ValueError(
        f"{name} selects examples by their losses: loss_fn must return one loss per example (shape ({n},)), got "
        f"{'a scalar' if shape == () else shape}; pass a loss_fn with reduction='none', e.g. "
        "lambda out, y: F.cross_entropy(out, y, reduction='none')"
    )


def all_finite(trainable, model, precision: Precision, grads=None) -> bool:
    """Whether every gradient is finite (agreed across DDP replicas, so that all of them skip together; under FSDP2
    each rank sees only its shards, so the ranks always agree, or one would raise while the others wait)."""
    grads = [t.grad for t in trainable] if grads is None else grads
    sparse = next((g for g in grads if g is not None and g.is_sparse), None)
    if sparse is not None:
        raise RuntimeError(sparse_gradient_message(sparse))
    grads = [to_local(g) for g in grads if g is not None]
    finite = finite_by_norms(grads)  # fp16 / bf16 norms summed in float32: a large finite gradient is finite
    if finite is None:
        return True
    if not bool(finite) and first_non_finite(grads) is None:  # finite values whose float32 norm overflowed
        finite = torch.ones((), dtype=torch.bool, device=finite.device)
    if is_fsdp(model) or (is_ddp(model) and precision.scaler is not None):
        flag = (~finite).to(torch.float32).reshape(1)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        finite = flag[0] == 0
    if precision.scaler is None and not bool(finite):
        raise FloatingPointError(
            "a gradient in sam_step is inf or NaN: SAM will not write non-finite values into the weights. "
            "Lower the learning rate, or pass scaler=torch.amp.GradScaler() under fp16 to skip such steps"
        )
    return bool(finite)


def skip_step(optimizer, precision: Precision, trainable, *, unscaled: bool) -> None:
    """An overflow under a GradScaler: weights untouched, the optimizer's step abandoned (its counters and a
    variant's state stay as they were), and the scaler backs off through its own logic."""
    optimizer.cancel_step()
    scaler = cast(torch.amp.GradScaler, precision.scaler)  # an overflow is only skipped under a GradScaler
    if not unscaled:
        for t in trainable:
            t.grad = None
        # one non-finite gradient makes the scaler record the overflow (same on every replica), skip and back off
        trainable[0].grad = torch.full_like(trainable[0], float("inf"))
        scaler.unscale_(optimizer.base_optimizer)
    scaler.step(optimizer.base_optimizer)  # found the overflow when unscaling: skips the step
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def is_ddp(model) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def is_fsdp(model) -> bool:
    """Whether ``model`` is sharded by FSDP2 (``torch.distributed.fsdp.fully_shard`` applied to it)."""
    return isinstance(model, FSDPModule)


def no_sync(model, *, enabled: bool):
    """No gradient all-reduce (DDP) or reduce-scatter (FSDP2) in the backward passes run inside."""
    if enabled and is_ddp(model):
        return model.no_sync()
    if enabled and is_fsdp(model):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)  # gradients accumulate unsharded until a backward that syncs
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def replica_mean(grads: Sequence[Optional[Tensor]]) -> list[Optional[Tensor]]:
    """The mean over DDP replicas of each gradient, as new tensors (the inputs are left as they are)."""
    world = torch.distributed.get_world_size()
    out: list[Optional[Tensor]] = []
    for g in grads:
        if g is None:
            out.append(None)
            continue
        total = g.clone()
        torch.distributed.all_reduce(total)
        out.append(total.div_(world))
    return out
