"""Tiny float64 models, data and slow dense references for the flatness tests.

The dense Hessian is built by ``torch.autograd.functional.hessian`` on a flat copy of the trainable
parameters through ``torch.func.functional_call``: none of samkit.sharpness is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

loss_fn = F.cross_entropy


def tiny_mlp(seed: int = 0, dtype=torch.float64) -> nn.Module:
    """3 -> 4 -> 3 tanh MLP: 31 parameters."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)


def tiny_data(seed: int = 0, size: int = 24, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(size, 3, generator=g, dtype=dtype)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


def train(model: nn.Module, x, y, steps: int = 300, lr: float = 0.5) -> nn.Module:
    """Full-batch gradient descent (by hand: torch.optim's first step imports torch._dynamo, ~3 s)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(steps):
        grads = torch.autograd.grad(loss_fn(model(x), y), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
    return model


def flat_weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad]).clone()


def loss_at(model: nn.Module, w: torch.Tensor, batches, loss=loss_fn) -> torch.Tensor:
    """Σ_b |B_b| loss_b(w) / Σ_b |B_b| with the trainable parameters replaced by the flat ``w``."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params, offset = {}, 0
    for name, p in named:
        params[name] = w[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    total = sum(x.shape[0] * loss(functional_call(model, params, (x,)), y) for x, y in batches)
    return total / sum(x.shape[0] for x, _ in batches)


def dense_hessian(model: nn.Module, batches, loss=loss_fn) -> torch.Tensor:
    return torch.autograd.functional.hessian(lambda w: loss_at(model, w, batches, loss), flat_weights(model))


class Snapshot:
    """Everything a measurement must leave alone: weights, buffers, modes, requires_grad, .grad, RNG."""

    def __init__(self, model: nn.Module):
        self.weights = [p.detach().clone() for p in model.parameters()]
        self.buffers = [b.detach().clone() for b in model.buffers()]
        self.modes = [m.training for m in model.modules()]
        self.requires_grad = [p.requires_grad for p in model.parameters()]
        self.grad_ids = [id(p.grad) if p.grad is not None else None for p in model.parameters()]
        self.grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        self.rng = torch.get_rng_state()

    def assert_unchanged(self, model: nn.Module) -> None:
        for before, p in zip(self.weights, model.parameters()):
            assert torch.equal(before, p.detach()), "weights changed"
        for before, b in zip(self.buffers, model.buffers()):
            assert torch.equal(before, b), "buffers changed"
        assert self.modes == [m.training for m in model.modules()], "modes changed"
        assert self.requires_grad == [p.requires_grad for p in model.parameters()], "requires_grad changed"
        for grad_id, before, p in zip(self.grad_ids, self.grads, model.parameters()):
            if before is None:
                assert p.grad is None, ".grad appeared"
            else:
                assert id(p.grad) == grad_id and torch.equal(before, p.grad), ".grad changed"
        assert torch.equal(self.rng, torch.get_rng_state()), "the global RNG stream moved"
