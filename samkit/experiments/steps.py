"""One training step for any optimizer of a ``TrainConfig``: ``sam_step`` for SAM/ASAM/mSAM, a plain step else.

    sam, asam   sam_step(optimizer, model, loss_fn, x, y)                  two passes
    msam        sam_step(..., micro_batches=K)                             two passes per micro-batch
    sgd, adam   zero grads; loss = loss_fn(model(x), y); backward; (unscale, clip); step    one pass

Both run the forward under autocast for --amp (bf16, or fp16 with a GradScaler) and clip the final
gradient's global norm when --max-grad-norm is set. A non-finite loss or gradient raises
``FloatingPointError`` (the trainer marks the run as diverged), except under fp16 where the scaler skips
the step and lowers the scale, as usual.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samkit.experiments.config import AMP_DTYPES, TrainConfig


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
    """One forward-backward and one optimizer step; return the detached mean loss."""
    optimizer.zero_grad(set_to_none=True)
    device_type = inputs.device.type
    with torch.autocast(device_type, dtype=autocast, enabled=autocast is not None):
        loss = loss_fn(model(inputs), targets)
    loss = loss.float()
    if scaler is None and not bool(torch.isfinite(loss)):
        raise FloatingPointError(f"the training loss is {loss.item()}: the run diverged")
    (loss if scaler is None else scaler.scale(loss)).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return loss.detach()


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
    """The step ``config.optimizer`` calls for (see the module doc)."""
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

    return sam_step(
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
