"""The trainer's side of the one-pass trajectory losses (samkit.losses): MESA and SAF as training methods.

    per step:  loss_fn = term.loss_fn(inputs, indices, epoch)     # what plain_step calls once: loss_fn(model(x), y)
               plain_step(optimizer, model, loss_fn, x, y)        # one forward-backward (+ MESA's EMA forward)
               term.after_step()                                  # MESA: the EMA moves; SAF: nothing
    checkpoint: term.state_dict() beside the model and optimizer (the EMA model, the logit memory)

Under DDP every replica trains on its shard of each batch, so an example may sit on another replica than the
one that saw it ``delay`` epochs ago: SAF records every replica's logits on every replica (an all-gather of the
logits and indices per step), so each keeps the whole memory.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from samkit.losses import MESALoss, SAFLoss


class TrajectoryTerm:
    """A MESA or SAF loss, driven by the trainer (see the module docstring)."""

    def __init__(self, loss: Any, *, distributed: bool = False) -> None:
        self.loss = loss
        self.distributed = distributed

    def loss_fn(self, inputs: Tensor, indices: Tensor, epoch: int) -> Callable[[Tensor, Tensor], Tensor]:
        if isinstance(self.loss, MESALoss):
            return self.loss.bind(inputs, epoch=epoch)
        if not self.distributed:
            return self.loss.bind(indices, epoch=epoch)

        def gathered(outputs: Tensor, targets: Tensor) -> Tensor:
            value = self.loss(outputs, targets, indices, epoch=epoch, record=False)
            self.loss.record(_all_gather(indices), _all_gather(outputs.detach()), epoch=epoch)
            return value

        return gathered

    def after_step(self) -> None:
        if isinstance(self.loss, MESALoss):
            self.loss.update()

    @property
    def extra_forwards(self) -> int:
        return int(getattr(self.loss, "extra_forwards", 0))

    def state_dict(self) -> dict:
        return self.loss.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loss.load_state_dict(state)


def build_term(
    kind: str,
    options: dict,
    *,
    model: nn.Module,
    base_loss: Callable[[Tensor, Tensor], Tensor],
    num_examples: int,
    num_classes: int,
    distributed: bool,
) -> Optional[TrajectoryTerm]:
    """The term a method names ("mesa" or "saf"), from its resolved options."""
    if kind == "mesa":
        return TrajectoryTerm(MESALoss(model, base_loss, **options), distributed=distributed)
    if kind == "saf":
        loss = SAFLoss(base_loss, num_examples=num_examples, num_classes=num_classes, **options)
        return TrajectoryTerm(loss, distributed=distributed)
    raise ValueError(f"unknown trajectory loss {kind!r}; valid: mesa, saf")


def _all_gather(tensor: Tensor) -> Tensor:
    parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)
