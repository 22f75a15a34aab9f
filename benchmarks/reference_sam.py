"""The per-tensor reference: SAM's ascent and restore as the most used public PyTorch implementation writes them.

That implementation (davda54/sam, ``SAM.first_step`` / ``second_step``) takes one norm per tensor in a Python
list, then clones and perturbs each tensor in turn, and restores by pointing ``.data`` back at the clone::

    norm = || stack([||g_i|| for each tensor i]) ||
    for each tensor i:  saved_i = w_i.clone();  w_i += g_i * (rho / (norm + 1e-12))
    restore:            w_i.data = saved_i

It is the baseline that samkit's foreach path is measured against (``loop_over_foreach_small``). It is kept
literal on purpose (a ``.clone()`` per tensor per step, ``scale.to(p)`` per tensor); do not optimise it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


class LoopSAMPerturbation:
    """first_step / restore of plain SAM (p = 2, non-adaptive) over ``params``, one tensor at a time."""

    def __init__(self, params: Sequence[Tensor], *, rho: float = 0.05) -> None:
        if not rho > 0:
            raise ValueError(f"rho must be > 0, got {rho!r}")
        self.params = list(params)
        self.rho = rho
        self.saved: dict[Tensor, Tensor] = {}

    @torch.no_grad()
    def first_step(self) -> None:
        grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in self.params if p.grad is not None]), p=2)
        scale = self.rho / (grad_norm + 1e-12)
        for p in self.params:
            if p.grad is None:
                continue
            self.saved[p] = p.data.clone()
            e_w = p.grad * scale.to(p)
            p.add_(e_w)

    @torch.no_grad()
    def restore(self) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            p.data = self.saved[p]
