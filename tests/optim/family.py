"""Every optimizer of the SAM family, built with options under which its own mechanism acts within a few steps.

The shared suite (test_family.py) runs each through the same loops: two-step API, closure, sam_step (micro-batches,
both perturbation modes, AMP, bf16, clipping, BatchNorm, DDP), checkpoints and copies; test_step_stats_family.py
checks each member's ``last_step_stats`` against what its steps measurably did.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

import samkit
from samkit.optim.esam import ESAM
from samkit.optim.ksam import KSAM

SGD_OPTIONS = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)


# name -> build(model) -> optimizer
FAMILY: dict[str, Callable[[torch.nn.Module], samkit.SAM]] = {
    "sam": lambda m: samkit.SAM(m.parameters(), torch.optim.SGD, rho=0.1, **SGD_OPTIONS),
    "interval": lambda m: samkit.SAM(m.parameters(), torch.optim.SGD, rho=0.1, interval=2, **SGD_OPTIONS),
    "asam": lambda m: samkit.SAM(m.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, eta=0.01, **SGD_OPTIONS),
    "fsam": lambda m: samkit.FriendlySAM(m.parameters(), torch.optim.SGD, rho=0.1, sigma=0.5, **SGD_OPTIONS),
    "looksam": lambda m: samkit.LookSAM(m.parameters(), torch.optim.SGD, rho=0.1, k=2, alpha=0.7, **SGD_OPTIONS),
    "gsam": lambda m: samkit.GSAM(m.parameters(), torch.optim.SGD, rho=0.1, alpha=0.3, **SGD_OPTIONS),
    "sam-on": lambda m: samkit.SAMOn(m.parameters(), torch.optim.SGD, model=m, rho=0.5, **SGD_OPTIONS),
    "rst": lambda m: samkit.RandomSAM(m.parameters(), torch.optim.SGD, rho=0.1, prob=0.5, seed=3, **SGD_OPTIONS),
    "aesam": lambda m: samkit.AESAM(m.parameters(), torch.optim.SGD, rho=0.1, total_steps=6, **SGD_OPTIONS),
    "late-sam": lambda m: samkit.LateSAM(m.parameters(), torch.optim.SGD, rho=0.1, start_step=3, **SGD_OPTIONS),
    "momentum-sam": lambda m: samkit.MomentumSAM(m.parameters(), torch.optim.SGD, rho=0.5, **SGD_OPTIONS),
    "esam": lambda m: ESAM(m.parameters(), torch.optim.SGD, rho=0.1, beta=0.6, gamma=0.5, seed=3, **SGD_OPTIONS),
    "ksam": lambda m: KSAM(m.parameters(), torch.optim.SGD, rho=0.1, k=0.5, **SGD_OPTIONS),
}

# The members that select examples (they need one loss per example) and their passes per step on the suite's
# batches (24 examples, whole or in 2 or 3 micro-batches: half of each is selected): ESAM the clean pass, a
# ranking forward (a third of a pass) and the second pass on half; K-SAM the ranking forward and both passes on half.
SELECTIVE_PASSES = {"esam": 1 + 1 / 3 + 1 / 2, "ksam": 1 / 3 + 2 * (1 / 2)}


def per_example_loss(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def model(seed: int = 0, dtype=torch.float64) -> torch.nn.Module:
    """The suite's model: 4 -> 8 (LayerNorm) -> 3, so that SAM-ON has normalization parameters to perturb."""
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Tanh(), torch.nn.Linear(8, 3)]
    return torch.nn.Sequential(*layers).to(dtype)
