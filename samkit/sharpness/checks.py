"""Early argument checks shared by the flatness measurements.

Each check raises at the call site, before any Hessian-vector product is spent, with the bad value and
the fix in the message (``ValueError("rho must be > 0, got -0.1")``).
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import torch
from torch import nn

Choice = TypeVar("Choice")


def check_int(name: str, value: Any, *, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (bools are refused: ``k=True`` is a bug, not 1)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_positive_float(name: str, value: Any) -> float:
    """``value`` as a finite float > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number > 0, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_nonnegative_float(name: str, value: Any) -> float:
    """``value`` as a finite float >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number >= 0, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: tuple[Choice, ...]) -> Choice:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    return seed


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_model_and_loss(model: Any, loss_fn: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model(inputs), targets), got {loss_fn!r}")


def trainable_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    """The parameters with ``requires_grad=True``, all of one dtype on one device.

    These span the space the Hessian lives in; frozen parameters are constants of the loss.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or sum(p.numel() for p in params) == 0:
        raise ValueError(
            f"model {type(model).__name__} has no trainable parameters (none with requires_grad=True and "
            "numel > 0); unfreeze the parameters whose flatness you want to measure"
        )
    dtypes = {p.dtype for p in params}
    if len(dtypes) > 1:
        raise ValueError(
            f"trainable parameters have mixed dtypes {sorted(str(d) for d in dtypes)}; the Hessian needs one "
            "dtype: convert the model with model.to(torch.float32) (or float64) first"
        )
    if not dtypes.pop().is_floating_point:
        raise ValueError(f"trainable parameters must be floating point, got {params[0].dtype}")
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(
            f"trainable parameters live on several devices {sorted(str(d) for d in devices)}; move the model "
            "to one device (model.to(device)) to measure its flatness"
        )
    return params
