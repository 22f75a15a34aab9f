"""Learning-rate schedules as pure functions of the step count, so a resumed run needs no scheduler state.

    factor(step) = 1                                    constant
                 = 0.5 * (1 + cos(pi * step / total))   cosine (SGDR without restarts, Loshchilov & Hutter 2017)
                 = 0.1 ** (milestones passed)           step: x0.1 at 50 % and 75 % of training
    lr(step) = base_lr * factor(step)

``set_learning_rate(optimizer, step, total_steps, schedule)`` writes ``lr`` into every param group from the
group's ``initial_lr`` (recorded on first use, as torch's schedulers do). A SAM optimizer shares its
param_groups with its base optimizer, so this drives both.
"""

from __future__ import annotations

import math

import torch

from samkit.experiments.config import SCHEDULES

STEP_MILESTONES = (0.5, 0.75)
STEP_GAMMA = 0.1


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= step <= total_steps:
        raise ValueError(f"step must be in [0, {total_steps}], got {step}")
    progress = step / total_steps
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        return STEP_GAMMA ** sum(progress >= milestone for milestone in STEP_MILESTONES)
    return 1.0


def set_learning_rate(optimizer: torch.optim.Optimizer, step: int, total_steps: int, schedule: str) -> float:
    """Set every group's lr for ``step``; return the first group's lr."""
    factor = lr_factor(schedule, step, total_steps)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * factor
    return optimizer.param_groups[0]["lr"]
