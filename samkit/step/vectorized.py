"""The vmap backend of ``sam_step``: all k micro-batches of an mSAM step in one ``torch.func`` call.

The batch is reshaped to [k, N/k, ...] and, with w fixed::

    g_j   = vmap(grad L)(w, B_j)             # k clean gradients at once
    first_step(grads=mean_j g_j, move=False) # the optimizer decides and records g; the weights stay at w
    ε_j   = vmap(ε̂)(g_j)                     # the optimizer's ascent groups, the per-tensor ε̂ path
    g'_j  = vmap(grad L)(w + ε_j, B_j)       # k perturbed gradients at once, each at its own weights
    .grad = mean_j g'_j

The model's weights are never moved (the perturbed weights are separate tensors), so there is nothing to
restore. What vmap cannot do: update BatchNorm running statistics (in-place buffer writes), DDP, and
micro-batches of unequal size. Those raise and point to ``backend="loop"``.
"""

from __future__ import annotations

from torch import Tensor
from torch.func import functional_call, grad, vmap

from samkit.batchnorm import has_running_stats
from samkit.optim.perturbation import perturbation
from samkit.step.common import all_finite, forward_loss, is_ddp


def vectorized_step_gradients(optimizer, model, loss_fn, inputs, targets, k, mode, precision, params):
    """Leave the final (scaled) gradient in ``.grad``; return (mean clean loss, all gradients finite, mean perturbed
    loss or None on a one-pass step)."""
    trainable = [t for t in params if t.requires_grad]
    _check_vectorisable(model, inputs, k, is_ddp(model))
    names = {id(t): name for name, t in model.named_parameters()}
    missing = [tuple(t.shape) for t in trainable if id(t) not in names]
    if missing:
        raise ValueError(
            f"backend='vmap' needs every optimised parameter to belong to the model; parameters of shapes {missing} "
            "do not: use backend='loop'"
        )
    keys = [names[id(t)] for t in trainable]
    trainable_ids = {id(t) for t in trainable}
    fixed = {name: t.detach() for name, t in model.named_parameters() if id(t) not in trainable_ids}
    fixed.update(dict(model.named_buffers()))
    xs = inputs.reshape(k, len(inputs) // k, *inputs.shape[1:])
    ys = targets.reshape(k, len(targets) // k, *targets.shape[1:])

    def scaled_loss(weights, x, y):
        def functional_model(batch):
            return functional_call(model, {**fixed, **dict(zip(keys, weights))}, (batch,))

        loss = forward_loss(functional_model, loss_fn, x, y, precision)
        return precision.scale(loss), loss.detach()

    gradient = grad(scaled_loss, has_aux=True)
    weights = tuple(t.detach() for t in trainable)
    try:
        grads, losses = vmap(gradient, in_dims=(None, 0, 0), randomness="different")(weights, xs, ys)
        _set_mean_grads(trainable, grads)  # the (scaled) clean batch gradient: the descent gradient of a one-pass step
        if optimizer.will_perturb is False:
            optimizer.first_step()
            return losses.mean(), all_finite(trainable, model, precision), None
        grads = list(grads)
        precision.unscale_(grads)
        if not all_finite(trainable, model, precision, grads):
            return losses.mean(), False, None
        by_param = {id(t): g.mean(0) for t, g in zip(trainable, grads)}
        if not optimizer.first_step(grads=[by_param.get(id(t)) for t in params], move=False):
            return losses.mean(), True, None  # the rule read g and chose one pass

        def ascent(g):
            return _epsilons(optimizer, params, trainable, g)

        if mode == "shared":
            eps = ascent(tuple(g.mean(0) for g in grads))
            perturbed, weight_dims = _add(weights, eps), None
        else:
            eps = vmap(ascent)(tuple(grads))
            perturbed, weight_dims = _add(weights, eps), 0
        del grads, eps
        perturbed_grads, perturbed_losses = vmap(gradient, in_dims=(weight_dims, 0, 0), randomness="different")(
            perturbed, xs, ys
        )
    except RuntimeError as error:
        raise RuntimeError(
            f"backend='vmap' could not vectorise this model ({error}); use backend='loop'"
        ) from error
    _set_mean_grads(trainable, perturbed_grads)
    return losses.mean(), True, perturbed_losses.mean()


def _add(weights, eps):
    return tuple(w + e for w, e in zip(weights, eps))


def _epsilons(optimizer, params, trainable, grads) -> tuple[Tensor, ...]:
    """ε̂ per trainable parameter (in their order), from the optimizer's ascent groups, by the per-tensor path;
    zero for a parameter the ascent leaves out (SAM-ON's non-normalization weights)."""
    by_param = {id(t): g for t, g in zip(trainable, grads)}
    groups = optimizer.ascent_groups([by_param.get(id(t)) for t in params])
    epsilons, _ = perturbation(groups, eps=optimizer.eps, foreach=False)
    by_id = {id(t): e for group, eps in zip(groups, epsilons) for t, e in zip(group.params, eps)}
    return tuple(by_id[id(t)] if id(t) in by_id else g * 0 for t, g in zip(trainable, grads))


def _set_mean_grads(trainable, stacked) -> None:
    for t, g in zip(trainable, stacked):
        t.grad = g.mean(0)


def _check_vectorisable(model, inputs, k, ddp) -> None:
    if ddp:
        raise ValueError(
            "backend='vmap' does not support DistributedDataParallel (its gradient hooks need .backward()); "
            "use backend='loop'"
        )
    if has_running_stats(model):
        raise ValueError(
            "backend='vmap' cannot update BatchNorm running statistics inside torch.func.vmap (the model has "
            "BatchNorm layers in training mode); use backend='loop'"
        )
    if len(inputs) % k != 0:
        raise ValueError(
            f"backend='vmap' needs equal micro-batches: a batch of {len(inputs)} does not split into {k}; use a "
            "batch size divisible by micro_batches, or backend='loop'"
        )
