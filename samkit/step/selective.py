"""The per-example part of ``sam_step``: optimizers whose passes run on a selection of the batch (ESAM, K-SAM).

An optimizer that selects examples says so with the class attribute ``selects_examples = True``, says by which
losses it ranks with ``ranks_perturbed_losses`` (False: by ℓ(w), before the clean pass; True: by ℓ(w) and
ℓ(w + ε̂), after the ascent), and implements two hooks::

    _selected_count(n)                                  how many of n examples its passes use (n: all, no ranking)
    _select_examples(n, clean_losses, perturbed_losses) the selected indices, sorted (None: all of them); the
                                                        optimizer counts them for its ``passes``

``sam_step`` then needs a ``loss_fn`` with ``reduction="none"`` (one loss per example). Per micro-batch B_j of
weight |B_j| / N (``perturbation="per_micro_batch"``; one micro-batch is the plain step)::

    by ℓ(w):           ℓ(w) on B_j without gradient (BatchNorm statistics update here) -> S_j
                       clean pass on S_j (statistics frozen); ascent; perturbed pass on S_j, weight |B_j| / N
    by ℓ(w + ε̂) - ℓ(w): clean pass on B_j, keeping ℓ(w); ascent; ℓ(w + ε̂) on B_j without gradient -> S_j
                       perturbed pass on S_j, weight |B_j| / N

With ``perturbation="shared"`` (one ε̂ from the whole batch) the ranking runs over the whole batch and the
selected examples are split into (at most) as many micro-batches again. Under DDP each replica ranks its own
examples; only the last perturbed backward all-reduces. When the selection is the whole batch, no ranking forward
runs and the step is SAM's, operation for operation.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from samkit.batchnorm import frozen_running_stats
from samkit.step.common import Precision, all_finite, check_per_example, forward_losses, is_ddp, split_batch
from samkit.step.loop import (
    _accumulate_clean,
    _ascend_and_pass,
    _clean_gradient,
    _perturbed_pass,
    _perturbed_passes,
    _trainable,
    loop_step_gradients,
)

_AS_IS = Precision(None, None, "cpu")  # a hand-written loop's forward: under whatever autocast the caller set


def selects_examples(optimizer) -> bool:
    """Whether ``optimizer`` runs its passes on a selection of the batch (needs per-example losses)."""
    return bool(getattr(type(optimizer), "selects_examples", False))


def select_examples(optimizer, model, loss_fn, inputs: Tensor, targets: Tensor, *, clean_losses=None) -> Tensor:
    """The indices (sorted) of the examples the step's remaining passes run on, for a hand-written loop.

    ``loss_fn`` returns one loss per example (``reduction="none"``). An optimizer that ranks by the clean loss
    (K-SAM) is asked before the clean pass: this runs a forward at w without gradient (``clean_losses``, if
    given, are used instead), and both passes then run on ``inputs[idx]``. One that ranks by the rise of the loss
    (ESAM) is asked after ``first_step`` moved the weights, with the clean pass's ``clean_losses``: this runs a
    forward at w + ε̂ without gradient (BatchNorm statistics frozen), and the second pass runs on ``inputs[idx]``.
    Ask once per step (per micro-batch with micro-batches): the optimizer counts the passes from these calls.
    The forward at w updates BatchNorm's running statistics; run the passes on the selection inside
    ``samkit.frozen_running_stats(model)`` so that they count once (``sam_step`` does).

    >>> import torch, torch.nn.functional as F
    >>> from samkit.optim.ksam import KSAM
    >>> model = torch.nn.Linear(3, 2)
    >>> opt = KSAM(model.parameters(), torch.optim.SGD, k=2, lr=0.1)
    >>> x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    >>> select_examples(opt, model, lambda o, t: F.cross_entropy(o, t, reduction="none"), x, y).shape
    torch.Size([2])
    """
    if not selects_examples(optimizer):
        raise TypeError(
            f"{type(optimizer).__name__} does not select examples: its passes run on the whole batch (nothing to ask)"
        )
    n = len(inputs)
    if clean_losses is not None:
        check_per_example(clean_losses, n, optimizer)
    ranking = optimizer._selected_count(n) < n
    if type(optimizer).ranks_perturbed_losses:
        if not optimizer.perturbed:
            raise RuntimeError(
                f"{type(optimizer).__name__} ranks examples by the rise of their loss from w to w + ε̂: call "
                "select_examples after first_step() (the weights must be at w + ε̂)"
            )
        if clean_losses is None:
            raise ValueError(
                f"{type(optimizer).__name__} ranks examples by the rise of their loss: pass the clean pass's "
                "per-example losses as clean_losses"
            )
        perturbed = None
        if ranking:
            perturbed = _ranking_losses(optimizer, model, loss_fn, inputs, targets, _AS_IS, frozen=True)
        keep = optimizer._select_examples(n, clean_losses.detach(), perturbed)
    else:
        if optimizer.perturbed:
            raise RuntimeError(
                f"{type(optimizer).__name__} ranks examples by their clean loss: call select_examples before the "
                "clean pass, with the weights at w"
            )
        if ranking and clean_losses is None:
            clean_losses = _ranking_losses(optimizer, model, loss_fn, inputs, targets, _AS_IS, frozen=False)
        keep = optimizer._select_examples(n, None if clean_losses is None else clean_losses.detach(), None)
    return torch.arange(n, device=_device(inputs)) if keep is None else keep


def selective_step_gradients(optimizer, model, loss_fn, inputs, targets, k, mode, precision, params):
    """``loop_step_gradients`` for an optimizer that selects examples: the (scaled) descent gradient in ``.grad``;
    return (mean clean loss over the whole batch, all gradients finite)."""
    losses_fn = _per_example(loss_fn, optimizer)
    if optimizer.will_perturb is not True:  # a one-pass step: nothing to select, the batch's mean loss
        return loop_step_gradients(optimizer, model, losses_fn, inputs, targets, k, mode, precision, params)[:2]
    chunks = split_batch(inputs, targets, k)
    if mode == "shared":
        return _shared(optimizer, model, losses_fn, inputs, targets, chunks, precision, params)
    return _per_micro_batch(optimizer, model, losses_fn, chunks, precision, params)


def _per_example(loss_fn, optimizer):
    def checked(outputs, targets):
        losses = loss_fn(outputs, targets)
        check_per_example(losses, len(targets), optimizer)
        return losses

    return checked


def _ranking_losses(optimizer, model, loss_fn, x, y, precision, *, frozen: bool) -> Tensor:
    """Per-example losses by a forward without gradient (at w + ε̂ the BatchNorm statistics stay frozen)."""
    context = frozen_running_stats(model) if frozen else contextlib.nullcontext()
    with torch.no_grad(), context:
        return forward_losses(model, loss_fn, x, y, precision, optimizer)


def _finite(losses: Optional[Tensor], model, precision) -> bool:
    """Whether the ranking losses (None: no ranking) are finite, agreed across DDP replicas under a scaler (asked
    whether or not this replica ranked, so that every replica runs the same collectives)."""
    finite = torch.tensor(True, device=precision.device_type) if losses is None else torch.isfinite(losses).all()
    if is_ddp(model) and precision.scaler is not None:
        flag = (~finite).to(torch.float32).reshape(1)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        finite = flag[0] == 0
    if precision.scaler is None and not bool(finite):
        raise FloatingPointError(
            "a per-example loss of the ranking forward in sam_step is inf or NaN: the step cannot select examples "
            "by it. Lower the learning rate, or pass scaler=torch.amp.GradScaler() under fp16 to skip such steps"
        )
    return bool(finite)


def _subset(x, y, keep: Optional[Tensor]):
    return (x, y) if keep is None else (x[keep], y[keep])


def _device(x):
    return x.device if isinstance(x, Tensor) else None


def _per_micro_batch(optimizer, model, loss_fn, chunks, precision, params):
    trainable = _trainable(params)
    total = 0.0
    for j, (x, y, weight) in enumerate(chunks):
        last = j == len(chunks) - 1
        n = len(x)
        ranking = optimizer._selected_count(n) < n
        if type(optimizer).ranks_perturbed_losses:
            clean = [] if ranking else None
            loss, grads = _clean_gradient(model, loss_fn, x, y, precision, params, losses=clean)
            total = total + loss * weight
            precision.unscale_(grads)
            if not all_finite(trainable, model, precision, grads):
                optimizer.cancel_step()
                return total, False
            optimizer.first_step(grads=grads, weight=weight)
            del grads
            perturbed = _ranking_losses(optimizer, model, loss_fn, x, y, precision, frozen=True) if ranking else None
            if not _finite(perturbed, model, precision):
                optimizer.cancel_step()
                return total, False
            keep = optimizer._select_examples(n, clean[0] if ranking else None, perturbed)
            _perturbed_pass(optimizer, model, loss_fn, *_subset(x, y, keep), weight, last, precision)
            continue
        clean = _ranking_losses(optimizer, model, loss_fn, x, y, precision, frozen=False) if ranking else None
        if not _finite(clean, model, precision):
            optimizer.cancel_step()
            return total + clean.mean() * weight, False
        keep = optimizer._select_examples(n, clean, None)
        xs, ys = _subset(x, y, keep)
        with frozen_running_stats(model) if ranking else contextlib.nullcontext():  # the ranking forward updated them
            loss, grads = _clean_gradient(model, loss_fn, xs, ys, precision, params)
        total = total + (clean.mean() if ranking else loss) * weight
        precision.unscale_(grads)
        if not all_finite(trainable, model, precision, grads):
            optimizer.cancel_step()
            return total, False
        _ascend_and_pass(optimizer, model, loss_fn, xs, ys, weight, last, precision, grads)
        del grads
    return total, True


def _shared(optimizer, model, loss_fn, inputs, targets, chunks, precision, params):
    """One ε̂ from the whole batch's clean gradient; the ranking over the whole batch."""
    trainable = _trainable(params)
    n = len(inputs)
    ranking = optimizer._selected_count(n) < n
    if type(optimizer).ranks_perturbed_losses:
        clean = [] if ranking else None
        total = _accumulate_clean(model, loss_fn, chunks, precision, sync_last=False, losses=clean)
        grads = [t.grad for t in params]
        precision.unscale_(grads)
        if not all_finite(trainable, model, precision, grads):
            return total, False
        optimizer.first_step(zero_grad=True, grads=grads)  # .grad is dropped, the tensors in grads live on
        del grads
        perturbed = None
        if ranking:
            perturbed = torch.cat(
                [_ranking_losses(optimizer, model, loss_fn, x, y, precision, frozen=True) for x, y, _ in chunks]
            )
            clean = torch.cat(clean)
        if not _finite(perturbed, model, precision):
            return total, False
        keep = optimizer._select_examples(n, clean, perturbed)
        passes = chunks if keep is None else split_batch(inputs[keep], targets[keep], min(len(chunks), len(keep)))
        _perturbed_passes(optimizer, model, loss_fn, passes, precision)
        return total, True
    if ranking:
        parts = [_ranking_losses(optimizer, model, loss_fn, x, y, precision, frozen=False) for x, y, _ in chunks]
        total = 0.0
        for part, (_, _, weight) in zip(parts, chunks):
            total = total + part.mean() * weight
        if not _finite(torch.cat(parts), model, precision):
            return total, False
        keep = optimizer._select_examples(n, torch.cat(parts), None)
        passes = split_batch(inputs[keep], targets[keep], min(len(chunks), len(keep)))
        with frozen_running_stats(model):  # the ranking forwards updated them
            _accumulate_clean(model, loss_fn, passes, precision, sync_last=False)
    else:
        _finite(None, model, precision)  # the replicas that rank agree on their losses' finiteness with this one
        optimizer._select_examples(n, None, None)
        passes = chunks
        total = _accumulate_clean(model, loss_fn, chunks, precision, sync_last=False)
    grads = [t.grad for t in params]
    precision.unscale_(grads)
    if not all_finite(trainable, model, precision, grads):
        return total, False
    optimizer.first_step(zero_grad=True, grads=grads)
    del grads
    _perturbed_passes(optimizer, model, loss_fn, passes, precision)
    return total, True
