"""The loop backend of ``sam_step``: micro-batches one after another, any model, DDP, BatchNorm.

Three shapes of step, chosen by what the optimizer can say before the clean pass (``will_perturb``):

    known one-pass step      clean passes accumulate in .grad (DDP all-reduces the last); first_step() says False
    known SAM step, shared   clean passes accumulate; ONE ascent from their sum; perturbed passes accumulate
    known SAM step, mSAM     per micro-batch: clean gradient -> first_step(grads=g_j, weight) -> perturbed pass
    decided from g           every clean gradient first (kept per micro-batch for mSAM), decide() on their
                             weighted sum (averaged over DDP replicas, so all replicas agree), then as above

Each replica's ascent uses its own gradient (no all-reduce before the ascent), so under DDP R replicas x k
micro-batches are mSAM with R k micro-batches.
"""

from __future__ import annotations

import torch

from samkit.batchnorm import frozen_running_stats
from samkit.step.common import (
    all_finite,
    forward_loss,
    forward_losses,
    is_ddp,
    is_fsdp,
    no_sync,
    replica_mean,
    split_batch,
)


def loop_step_gradients(optimizer, model, loss_fn, inputs, targets, k, mode, precision, params):
    """Leave the final (scaled) gradient in ``.grad``; return (mean clean loss, all gradients finite, mean
    perturbed loss or None on a one-pass step)."""
    chunks = split_batch(inputs, targets, k)
    plan = optimizer.will_perturb
    if plan is None:
        return _decided_from_gradient(optimizer, model, loss_fn, chunks, precision, mode, params)
    if not plan or mode == "shared":
        # FSDP2: the shared ε̂ comes from the gradient of the global batch (the ranks cannot each have their own)
        total = _accumulate_clean(model, loss_fn, chunks, precision, sync_last=not plan or is_fsdp(model))
        if not plan:
            optimizer.first_step()  # a one-pass step: .grad is the descent gradient
            return total, all_finite(_trainable(params), model, precision), None
        grads = [t.grad for t in params]
        precision.unscale_(grads)
        if not all_finite(_trainable(params), model, precision, grads):
            return total, False, None
        optimizer.first_step(zero_grad=True, grads=grads)  # .grad is dropped, the tensors in grads live on
        return total, True, _perturbed_passes(optimizer, model, loss_fn, chunks, precision)
    return _per_micro_batch(optimizer, model, loss_fn, chunks, precision, params)


def _trainable(params):
    return [t for t in params if t.requires_grad]


def _accumulate_clean(model, loss_fn, chunks, precision, *, sync_last: bool, losses=None):
    """Clean passes accumulate the (weighted, scaled) batch gradient in .grad; return the mean clean loss.

    ``losses``, a list, receives each micro-batch's per-example losses (detached) for a selecting optimizer."""
    total = 0.0
    for j, (x, y, weight) in enumerate(chunks):
        with no_sync(model, enabled=not (sync_last and j == len(chunks) - 1)):
            loss = _mean_loss(model, loss_fn, x, y, precision, losses)
            precision.scale(loss * weight).backward()
        total = total + loss.detach() * weight
    return total


def _mean_loss(model, loss_fn, x, y, precision, losses=None):
    if losses is None:
        return forward_loss(model, loss_fn, x, y, precision)
    per_example = forward_losses(model, loss_fn, x, y, precision)
    losses.append(per_example.detach())
    return per_example.mean()  # the operations of forward_loss on a per-example loss


def _perturbed_passes(optimizer, model, loss_fn, chunks, precision):
    """With the weights at w + ε̂: accumulate the perturbed gradient (DDP all-reduces the last), then restore.
    Returns the mean perturbed loss (detached)."""
    total = 0.0
    for j, (x, y, weight) in enumerate(chunks):
        with frozen_running_stats(model), no_sync(model, enabled=j < len(chunks) - 1):
            perturbed = forward_loss(model, loss_fn, x, y, precision)
            precision.scale(perturbed * weight).backward()
        total = total + perturbed.detach() * weight
    optimizer.restore()
    return total


def _clean_gradient(model, loss_fn, x, y, precision, params, losses=None):
    """One micro-batch's clean loss and its (scaled) gradient, one entry per parameter, .grad untouched.

    ``losses``, a list, receives the per-example losses (detached) for a selecting optimizer."""
    trainable = _trainable(params)
    with no_sync(model, enabled=True):  # each replica's ascent uses its own gradient (m-sharpness)
        loss = _mean_loss(model, loss_fn, x, y, precision, losses)
        grads = torch.autograd.grad(precision.scale(loss), trainable, allow_unused=True)
    by_param = dict(zip(trainable, grads))
    return loss.detach(), [by_param.get(t) for t in params]


def _ascend_and_pass(optimizer, model, loss_fn, x, y, weight, last, precision, grads):
    optimizer.first_step(grads=grads, weight=weight)
    return _perturbed_pass(optimizer, model, loss_fn, x, y, weight, last, precision)


def _perturbed_pass(optimizer, model, loss_fn, x, y, weight, last, precision):
    """With the weights at w + ε̂: one micro-batch's perturbed gradient added to .grad (DDP: synced if last), restore.
    Returns its perturbed loss times ``weight`` (detached)."""
    with frozen_running_stats(model), no_sync(model, enabled=not last):
        perturbed = forward_loss(model, loss_fn, x, y, precision)
        precision.scale(perturbed * weight).backward()
    optimizer.restore()
    return perturbed.detach() * weight


def _per_micro_batch(optimizer, model, loss_fn, chunks, precision, params):
    total, perturbed = 0.0, 0.0
    for j, (x, y, weight) in enumerate(chunks):
        loss, grads = _clean_gradient(model, loss_fn, x, y, precision, params)
        total = total + loss * weight
        precision.unscale_(grads)
        if not all_finite(_trainable(params), model, precision, grads):
            optimizer.cancel_step()
            return total, False, None
        last = j == len(chunks) - 1
        perturbed = perturbed + _ascend_and_pass(optimizer, model, loss_fn, x, y, weight, last, precision, grads)
        del grads
    return total, True, perturbed


def _decided_from_gradient(optimizer, model, loss_fn, chunks, precision, mode, params):
    """A rule that reads the clean gradient (AE-SAM): all clean passes first, then the decision, then the ascents.

    For mSAM each micro-batch's gradient is kept until its ascent (k gradient-sized buffers)."""
    trainable = _trainable(params)
    separate = mode == "per_micro_batch" and len(chunks) > 1
    if separate:
        total, parts = 0.0, []
        for x, y, weight in chunks:
            loss, grads = _clean_gradient(model, loss_fn, x, y, precision, params)
            total = total + loss * weight
            parts.append(grads)
        summed = [
            None if gs[0] is None else sum(g * w for g, (_, _, w) in zip(gs, chunks)) for gs in zip(*parts)
        ]
    else:
        total = _accumulate_clean(model, loss_fn, chunks, precision, sync_last=is_fsdp(model))
        summed = [t.grad for t in params]
    whole = replica_mean(summed) if is_ddp(model) else summed  # every replica decides on the same gradient (FSDP2:
    # the synced gradient already is the global one)
    decision = precision.unscaled(whole)
    if not all_finite(trainable, model, precision, decision):
        return total, False, None
    if not optimizer.decide(decision):
        for t, g in zip(params, whole):  # a one-pass step: the (scaled) batch gradient, averaged over replicas
            t.grad = g
        return total, True, None
    if not separate:
        grads = [t.grad for t in params]
        precision.unscale_(grads)
        optimizer.first_step(zero_grad=True, grads=grads)
        return total, True, _perturbed_passes(optimizer, model, loss_fn, chunks, precision)
    for t in params:
        t.grad = None
    perturbed = 0.0
    for j, ((x, y, weight), grads) in enumerate(zip(chunks, parts)):
        precision.unscale_(grads)
        last = j == len(chunks) - 1
        perturbed = perturbed + _ascend_and_pass(optimizer, model, loss_fn, x, y, weight, last, precision, grads)
    return total, True, perturbed
