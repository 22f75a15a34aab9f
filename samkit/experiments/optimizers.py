"""Build the optimizer a ``TrainConfig`` names.

    sgd   SGD(lr, momentum, weight_decay)
    adam  Adam(lr, weight_decay)
    sam   SAM(base, rho)                               (Foret et al. 2021, arXiv 2010.01412)
    msam  SAM(base, rho), stepped with K micro-batches  (Behdin et al. 2023, arXiv 2302.09693)
    asam  SAM(base, rho, adaptive=True, eta=0.01) on parameters named "weight", non-adaptive elsewhere,
          as the ASAM authors' code does (Kwon et al. 2021, arXiv 2102.11600)

mSAM is SAM the optimizer with a different step (``sam_step(..., micro_batches=K)``), so the optimizer
built here is the same for ``sam`` and ``msam``. Weight decay lives in the base optimizer, so it is not
part of the perturbation (docs/algorithms.md).
"""

from __future__ import annotations

import torch
from torch import nn

from samkit.experiments.config import ASAM_ETA, TrainConfig


def _base_class_and_options(config: TrainConfig) -> tuple[type[torch.optim.Optimizer], dict]:
    if config.base == "sgd":
        return torch.optim.SGD, {"lr": config.lr, "momentum": config.momentum, "weight_decay": config.weight_decay}
    return torch.optim.Adam, {"lr": config.lr, "weight_decay": config.weight_decay}


def asam_param_groups(model: nn.Module) -> list[dict]:
    """Parameters named "...weight" get the adaptive ball (T = |w| + eta); biases and the rest get T = 1."""
    weights, others = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (weights if name.endswith("weight") else others).append(parameter)
    groups = [{"params": weights, "adaptive": True, "eta": ASAM_ETA}]
    if others:
        groups.append({"params": others, "adaptive": False, "eta": 0.0})
    return groups


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer for ``model`` as ``config`` (already ``resolved()``) describes it."""
    if config.lr is None:
        raise ValueError("config.lr is None: call config.resolved() before build_optimizer")
    base_class, options = _base_class_and_options(config)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if not config.is_sam:
        return base_class(parameters, **options)
    from samkit.optim import SAM

    if config.optimizer == "asam":
        return SAM(asam_param_groups(model), base_class, rho=config.rho, **options)
    return SAM(parameters, base_class, rho=config.rho, **options)
