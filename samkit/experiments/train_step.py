"""One training step for any optimizer of a ``TrainConfig``, and the one rule that says a run diverged.

    sam, asam   sam_step(optimizer, model, loss_fn, x, y)                  two passes
    msam        sam_step(..., micro_batches=K)                             two passes per micro-batch
    sgd, adam   plain_step: zero grads; loss = loss_fn(model(x), y); backward; (unscale, clip); step    one pass

Both paths share ``samkit.step``'s precision and finiteness code: the forward runs under autocast for --amp (bf16,
or fp16 with a GradScaler), the gradients are unscaled once, checked, and the final gradient's global norm is
clipped when --max-grad-norm is set, then the base optimizer steps.

The divergence rule, the same for every method: a step whose loss or any gradient is inf or NaN raises
``Diverged``, and the trainer ends the run as diverged. A non-finite gradient is caught before the step writes the
weights (they stay as they were), by ``samkit.step``'s check in both paths.
Under fp16 a GradScaler handles such a step instead: it skips the step and lowers the scale, as usual.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samkit.experiments.config import AMP_DTYPES, TrainConfig
from samkit.step.common import Precision, all_finite


class Diverged(FloatingPointError):
    """A training step met an inf or NaN loss or gradient (without a GradScaler to skip it): the run diverged."""


def make_loss_fn(label_smoothing: float, *, per_example: bool = False) -> Callable[[Tensor, Tensor], Tensor]:
    """Mean cross-entropy; targets are class indices or (mixup) class probabilities. ``per_example``: one loss per
    example (``reduction="none"``), what the methods that select examples (ESAM, K-SAM) rank by."""
    reduction = "none" if per_example else "mean"

    def loss_fn(outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs.float(), targets, label_smoothing=label_smoothing, reduction=reduction)

    return loss_fn


def make_scaler(config: TrainConfig, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """A GradScaler for fp16 (loss scaling), None otherwise (bf16 has float32's range and needs none)."""
    return torch.amp.GradScaler(device.type) if config.amp == "fp16" else None


def plain_step(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    scaler: Optional[torch.amp.GradScaler] = None,
    max_grad_norm: Optional[float] = None,
    autocast: Optional[torch.dtype] = None,
) -> Tensor:
    """One forward-backward and one optimizer step; return the detached mean loss. Raises ``Diverged`` (weights
    untouched) on an inf or NaN loss or gradient without a scaler."""
    optimizer.zero_grad(set_to_none=True)
    precision = Precision(scaler, autocast, inputs.device.type)
    with precision.forward_context():
        loss = loss_fn(model(inputs), targets)
    loss = loss.float()
    if precision.scaler is None:
        _check_loss(loss)
    precision.scale(loss).backward()
    params = [t for group in optimizer.param_groups for t in group["params"] if t.requires_grad]
    if precision.scaler is not None:
        precision.scaler.unscale_(optimizer)  # once: the finiteness check and the clipping see the true gradient
    elif not _finite_gradients(params, model, precision):
        optimizer.zero_grad(set_to_none=True)
        raise Diverged("an inf or NaN gradient: the run diverged (the weights are those before this step)")
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    if precision.scaler is None:
        optimizer.step()
    else:
        precision.scaler.step(optimizer)  # skips the step when the unscaled gradients overflowed
        precision.scaler.update()
    return loss.detach()


def _check_loss(loss: Tensor) -> None:
    if not bool(torch.isfinite(loss)):
        raise Diverged(f"the training loss is {loss.item()}: the run diverged (the weights are those before this step)")


def _finite_gradients(params, model: nn.Module, precision: Precision) -> bool:
    """``samkit.step``'s check, the one ``sam_step`` applies (agreed across replicas under FSDP2)."""
    try:
        return all_finite(params, model, precision)
    except FloatingPointError:
        return False


def train_step(
    config: TrainConfig,
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    scaler: Optional[torch.amp.GradScaler] = None,
) -> Tensor:
    """The step ``config.optimizer`` calls for (see the module doc); raises ``Diverged`` by the one rule."""
    autocast = AMP_DTYPES.get(config.amp)
    if not config.is_sam:
        return plain_step(
            optimizer,
            model,
            loss_fn,
            inputs,
            targets,
            scaler=scaler,
            max_grad_norm=config.max_grad_norm,
            autocast=autocast,
        )
    from samkit.step import sam_step
    from samkit.step.common import is_fsdp

    try:
        loss = sam_step(
            optimizer,
            model,
            loss_fn,
            inputs,
            targets,
            micro_batches=config.micro_batches,
            # FSDP2: one ε̂ from the global batch's gradient (the ranks cannot each perturb with their own)
            perturbation="shared" if is_fsdp(model) else "per_micro_batch",
            scaler=scaler,
            max_grad_norm=config.max_grad_norm,
            autocast=autocast,
        )
    except FloatingPointError as error:  # sam_step abandons such a step: the weights are those before it
        optimizer.zero_grad(set_to_none=True)
        raise Diverged(f"an inf or NaN loss or gradient: the run diverged ({error})") from error
    if scaler is None:
        _check_loss(loss)
    return loss
