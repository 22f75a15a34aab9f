"""Measure a model and hand it back exactly as it was found.

Public flatness tools flip the model to eval mode behind the user's back, leave it there, and draw from
the global RNG. Every samkit measurement runs inside ``measuring(model, train_mode=...)``:

    save   per-module .training, per-parameter requires_grad and .grad, weights and buffers (copies),
           the global CPU/CUDA RNG states
    set    model.train(train_mode)          # eval mode unless the caller asks for train mode, deliberately
    run    the measurement (it may perturb the weights; train-mode BatchNorm may update running stats)
    restore weights and buffers by COPY (bit-exact), .grad objects, requires_grad, modes, RNG states

Inside, ``seed_forward(seed)`` fixes the global RNG before a forward pass, so that in train mode the
dropout mask of a given batch is the same in every pass: the loss stays one fixed function of the
weights while Lanczos or an ascent loop evaluates it many times. The RNG fork makes that invisible to the
caller's own random stream.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def _cuda_indices(model: nn.Module) -> list[int]:
    tensors = list(model.parameters()) + list(model.buffers())
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


class _RngSeeder:
    """Seeds the global CPU generator and the CUDA generators of the model's devices (never others)."""

    def __init__(self, cuda_indices: list[int]):
        self.cuda_indices = cuda_indices

    def __call__(self, seed: int) -> None:
        seed = seed % (2**63)
        torch.random.default_generator.manual_seed(seed)
        for index in self.cuda_indices:
            torch.cuda.default_generators[index].manual_seed(seed)


@contextmanager
def measuring(model: nn.Module, *, train_mode: bool) -> Iterator[_RngSeeder]:
    """Run a measurement on ``model`` in ``train_mode`` and restore everything on exit (even on error).

    Yields ``seed_forward(seed)``, to call before each forward pass.
    """
    modes = [(module, module.training) for module in model.modules()]
    params = list(model.parameters())
    requires_grad = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    weights = [p.detach().clone() for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cuda_indices = _cuda_indices(model)
    try:
        with torch.random.fork_rng(devices=cuda_indices):
            model.train(train_mode)
            yield _RngSeeder(cuda_indices)
    finally:
        with torch.no_grad():
            for p, saved in zip(params, weights):
                p.copy_(saved)
            for b, saved in buffers:
                b.copy_(saved)
        for p, flag, grad in zip(params, requires_grad, grads):
            p.requires_grad_(flag)
            p.grad = grad
        for module, flag in modes:
            module.training = flag
