"""The trajectory term that MESA and SAF add to the training loss: a tempered KL divergence to reference logits.

For a batch of B examples with logits z_i (the model being trained) and reference logits r_i::

    term = tau² (1/B) Σ_i valid_i KL(softmax(r_i / tau) || softmax(z_i / tau))
         = tau² (1/B) Σ_i valid_i Σ_c q_ic (log q_ic - log p_ic),   q = softmax(r / tau), p = softmax(z / tau)

The reference is the first argument of the KL (torch's ``F.kl_div(log p, q)``), and tau² keeps the gradient's
scale independent of the temperature (d term / d z_i = tau (p_i - q_i) / B). An example with ``valid_i``
False contributes zero, and the mean still divides by B. The sum runs in float32 at least: logits from an
autocast forward (float16, bfloat16) are upcast first.

The option and state checks that both losses share live here too.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn


def trajectory_kl(outputs: Tensor, reference: Tensor, tau: float, valid: Optional[Tensor] = None) -> Tensor:
    """tau² · mean over the batch of KL(softmax(reference / tau) || softmax(outputs / tau)), a scalar.

    Args:
        outputs: (B, C) logits of the model being trained (the gradient flows through them).
        reference: (B, C) reference logits (no gradient flows through them).
        tau: the temperature, > 0.
        valid: optional (B,) bool mask; examples marked False contribute zero (the mean still divides by B).

    Example::

        >>> import torch
        >>> z = torch.tensor([[1.0, 2.0, 0.5]])
        >>> float(trajectory_kl(z, z, tau=5.0))
        0.0
    """
    if outputs.dim() != 2 or reference.shape != outputs.shape:
        raise ValueError(
            f"outputs and reference must be logits of the same shape (batch, classes), got {tuple(outputs.shape)} "
            f"and {tuple(reference.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(outputs.dtype, reference.dtype), torch.float32)
    log_p = torch.log_softmax(outputs.to(dtype) / tau, dim=-1)
    log_q = torch.log_softmax(reference.detach().to(dtype) / tau, dim=-1)
    per_example = (log_q.exp() * (log_q - log_p)).sum(dim=-1)
    if valid is not None:
        per_example = torch.where(valid, per_example, torch.zeros_like(per_example))
    return per_example.sum() * (tau * tau / outputs.shape[0])


# Checks shared by MESALoss and SAFLoss.


def check_number(name: str, value: Any, what: str, *, positive: bool = False, high: float = math.inf) -> float:
    """A finite number in [0, high] ((0, high] with ``positive``) as a float, else a ValueError naming it."""
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if bad or value < 0 or value > high or (positive and value == 0):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


def check_epochs(start_epoch: Any, end_epoch: Any, *, minimum: int = 0, why: str = "") -> None:
    if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < minimum:
        raise ValueError(
            f"start_epoch must be an integer >= {minimum} (the first epoch, counted from 0, with the trajectory "
            f"term{why}), got {start_epoch!r}"
        )
    if end_epoch is not None and (
        isinstance(end_epoch, bool) or not isinstance(end_epoch, int) or end_epoch <= start_epoch
    ):
        raise ValueError(
            f"end_epoch must be None (the term stays on) or an integer > start_epoch={start_epoch} (the first epoch "
            f"without the term again), got {end_epoch!r}"
        )


def check_epoch(epoch: Any) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an integer >= 0 (the current epoch, counted from 0), got {epoch!r}")
    return epoch


def check_saved(loss: Any, state_dict: Any) -> None:
    """Refuse a state dict of another class or saved with other options, naming the first difference."""
    name = type(loss).__name__
    if not isinstance(state_dict, dict) or "options" not in state_dict:
        raise ValueError(f"this is not a state dict saved by {name}.state_dict(), got {type(state_dict).__name__}")
    saved_class = state_dict.get("class")
    if saved_class != name:
        raise ValueError(f"this state dict was saved by {saved_class}, not {name}: build a {saved_class} to resume it")
    mine = loss._options()
    for key, then in state_dict["options"].items():
        if mine.get(key) != then:
            raise ValueError(
                f"the checkpoint was saved with {key}={then!r}, this {name} has {key}={mine.get(key)!r}: build it with "
                f"{key}={then!r} to resume"
            )


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel / torch.compile wrappers (the one that holds the weights)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model
