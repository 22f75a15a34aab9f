"""The vmap backend of ``sam_step``: all k micro-batches of an mSAM step in one ``torch.func`` call.

The batch is reshaped to [k, N/k, ...] and, with w fixed::

    g_j   = vmap(grad L)(w, B_j)             # k clean gradients at once
    ε_j   = vmap(ε̂)(g_j)                     # the same ε̂ code as everywhere (its per-tensor path)
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
from samkit.optim.perturbation import PerturbationGroup, perturbation


def vectorized_step_gradients(optimizer, model, loss_fn, inputs, targets, k, mode, precision, trainable):
    """Leave the final (scaled) gradient in ``.grad``; return (mean clean loss, all gradients finite)."""
    from samkit.step import _all_finite, _forward_loss, _is_ddp

    _check_vectorisable(model, inputs, k, _is_ddp(model))
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

        loss = _forward_loss(functional_model, loss_fn, x, y, precision)
        return precision.scale(loss), loss.detach()

    gradient = grad(scaled_loss, has_aux=True)
    weights = tuple(t.detach() for t in trainable)
    try:
        if not optimizer.is_sam_step:
            grads, losses = vmap(gradient, in_dims=(None, 0, 0), randomness="different")(weights, xs, ys)
            _set_mean_grads(trainable, grads)
            optimizer.first_step()  # a step that interval skips: nothing moves
            return losses.mean(), _all_finite(trainable, model, precision)
        grads, losses = vmap(gradient, in_dims=(None, 0, 0), randomness="different")(weights, xs, ys)
        grads = list(grads)
        precision.unscale_(grads)
        if not _all_finite(trainable, model, precision, grads):
            return losses.mean(), False

        def ascent(g):
            return _epsilons(optimizer, trainable, g)

        if mode == "shared":
            eps = ascent(tuple(g.mean(0) for g in grads))
            perturbed, weight_dims = tuple(w + e for w, e in zip(weights, eps)), None
        else:
            eps = vmap(ascent)(tuple(grads))
            perturbed, weight_dims = tuple(w + e for w, e in zip(weights, eps)), 0
        del grads, eps
        perturbed_grads, _ = vmap(gradient, in_dims=(weight_dims, 0, 0), randomness="different")(perturbed, xs, ys)
    except RuntimeError as error:
        raise RuntimeError(
            f"backend='vmap' could not vectorise this model ({error}); use backend='loop'"
        ) from error
    _set_mean_grads(trainable, perturbed_grads)
    optimizer.first_step(grads=[None] * sum(len(g["params"]) for g in optimizer.param_groups))  # weights stay put
    return losses.mean(), True


def _epsilons(optimizer, trainable, grads) -> tuple[Tensor, ...]:
    """ε̂ per trainable parameter (in their order), from the optimizer's groups, by the per-tensor path."""
    by_param = {id(t): g for t, g in zip(trainable, grads)}
    groups = []
    for group in optimizer.param_groups:
        params = [t for t in group["params"] if id(t) in by_param]
        groups.append(
            PerturbationGroup(
                params,
                [by_param[id(t)] for t in params],
                rho=group["rho"],
                p=group["p"],
                adaptive=group["adaptive"],
                eta=group["eta"],
            )
        )
    epsilons, _ = perturbation(groups, eps=optimizer.eps, foreach=False)
    by_id = {id(t): e for group, eps in zip(groups, epsilons) for t, e in zip(group.params, eps)}
    return tuple(by_id[id(t)] for t in trainable)


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
