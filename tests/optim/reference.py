"""Plain references written from the formulas (docs/algorithms.md), used to check samkit's optimizers."""

from __future__ import annotations

import torch
from torch.func import functional_call


def mlp(seed: int = 0, dtype=torch.float64) -> torch.nn.Module:
    """A small MLP with biases (4 -> 8 -> 3)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)


def batch(seed: int = 1, n: int = 16, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def loss_fn(outputs, targets):
    return torch.nn.functional.cross_entropy(outputs, targets)


def max_diff(model, weights: dict) -> float:
    """The largest |w - reference| over the model's parameters (``weights``: name -> tensor)."""
    return max((p.detach() - weights[k]).abs().max().item() for k, p in model.named_parameters())


def gradients(model, weights: dict, x, y) -> dict:
    """∇L(w) at the given weights, by autograd on a functional call (the model's own weights are not touched)."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in weights.items()}
    loss = loss_fn(functional_call(model, leaves, (x,)), y)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads))


def _epsilon(w, g, rho, adaptive, eta):
    t = {k: (w[k].abs() + eta) if adaptive else torch.ones_like(w[k]) for k in w}
    norm = torch.sqrt(sum(((t[k] * g[k]) ** 2).sum() for k in w))
    return {k: rho * t[k] ** 2 * g[k] / (norm + 1e-12) for k in w}


def reference_sam_sgd(
    model,
    x,
    y,
    *,
    steps,
    rho,
    lr,
    momentum=0.0,
    weight_decay=0.0,
    adaptive=False,
    eta=0.0,
    micro_batches=1,
    shared=False,
    max_grad_norm=None,
):
    """SAM / mSAM around SGD(momentum, weight decay), written out from eq. 2-3, the mSAM definition
    (mean of per-micro-batch perturbed gradients, weighted by size) and torch's SGD and clipping rules."""
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {}
    n = len(x)
    chunks = list(zip(torch.tensor_split(x, micro_batches), torch.tensor_split(y, micro_batches)))
    for _ in range(steps):
        total = {k: torch.zeros_like(v) for k, v in w.items()}
        if shared:
            g = {k: sum(len(xj) / n * gradients(model, w, xj, yj)[k] for xj, yj in chunks) for k in w}
            e = _epsilon(w, g, rho, adaptive, eta)
        for xj, yj in chunks:
            if not shared:
                e = _epsilon(w, gradients(model, w, xj, yj), rho, adaptive, eta)
            g2 = gradients(model, {k: w[k] + e[k] for k in w}, xj, yj)
            for k in w:
                total[k] = total[k] + len(xj) / n * g2[k]
        if max_grad_norm is not None:
            norm = torch.sqrt(sum((v**2).sum() for v in total.values()))
            coefficient = min(1.0, max_grad_norm / (norm.item() + 1e-6))
            total = {k: v * coefficient for k, v in total.items()}
        for k in w:
            d = total[k] + weight_decay * w[k]
            buffers[k] = d.clone() if k not in buffers else momentum * buffers[k] + d
            w[k] = w[k] - lr * buffers[k]
    return w
