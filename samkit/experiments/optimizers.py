"""Build the optimizer a ``TrainConfig`` names: the base optimizer alone, or a method of the SAM family.

    sgd   SGD(lr, momentum, weight_decay)
    adam  Adam(lr, weight_decay)
    any name of samkit.experiments.methods.METHODS: that method around SGD or Adam (--base-optimizer)

Weight decay lives in the base optimizer, so it is not part of the perturbation (docs/algorithms.md).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from samkit.experiments.config import TrainConfig
from samkit.experiments.methods import METHODS, BuildContext


def _base_class_and_options(config: TrainConfig) -> tuple[type[torch.optim.Optimizer], dict]:
    if config.base == "sgd":
        return torch.optim.SGD, {"lr": config.lr, "momentum": config.momentum, "weight_decay": config.weight_decay}
    return torch.optim.Adam, {"lr": config.lr, "weight_decay": config.weight_decay}


def build_optimizer(
    model: nn.Module, config: TrainConfig, *, total_steps: Optional[int] = None
) -> torch.optim.Optimizer:
    """The optimizer for ``model`` as ``config`` (already ``resolved()``) describes it.

    ``total_steps`` (the run's number of optimizer steps) is what schedules inside a method read (RST's
    probability schedule, AE-SAM's c_t, late-phase SAM's switch); it defaults to a single epoch's worth of 1 step.
    """
    if config.lr is None:
        raise ValueError("config.lr is None: call config.resolved() before build_optimizer")
    base_class, options = _base_class_and_options(config)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if not config.is_sam:
        return base_class(parameters, **options)
    context = BuildContext(
        model=model,
        params=parameters,
        base_class=base_class,
        base_options=options,
        rho=config.rho,
        lr=config.lr,
        schedule=config.schedule,
        total_steps=max(1, total_steps or 1),
        seed=config.seed,
    )
    return METHODS[config.optimizer].build(context, dict(config.options or {}))
