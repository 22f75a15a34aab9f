"""Every optimizer of the SAM family, built with options under which its own mechanism acts within a few steps.

The shared suite (test_family.py) runs each through the same loops: two-step API, closure, sam_step (micro-batches,
both perturbation modes, AMP, bf16, clipping, BatchNorm, DDP), checkpoints and copies.
"""

from __future__ import annotations

from typing import Callable

import torch

import samkit

SGD_OPTIONS = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)


# name -> build(model) -> optimizer
FAMILY: dict[str, Callable[[torch.nn.Module], samkit.SAM]] = {
    "sam": lambda m: samkit.SAM(m.parameters(), torch.optim.SGD, rho=0.1, **SGD_OPTIONS),
    "interval": lambda m: samkit.SAM(m.parameters(), torch.optim.SGD, rho=0.1, interval=2, **SGD_OPTIONS),
    "asam": lambda m: samkit.SAM(m.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, eta=0.01, **SGD_OPTIONS),
    "fsam": lambda m: samkit.FriendlySAM(m.parameters(), torch.optim.SGD, rho=0.1, sigma=0.5, **SGD_OPTIONS),
    "looksam": lambda m: samkit.LookSAM(m.parameters(), torch.optim.SGD, rho=0.1, k=2, alpha=0.7, **SGD_OPTIONS),
}
