"""MESA: a one-pass loss whose trajectory term pulls the model's outputs toward those of an EMA of its weights.

One training step (e = the epoch, counted from 0; θ the weights; θ̄ their exponential moving average)::

    loss = L_B(θ)                                                              e < start_epoch or e >= end_epoch
    loss = L_B(θ) + lam tau² (1/|B|) Σ_i KL(softmax(f_θ̄(x_i)/tau) || softmax(f_θ(x_i)/tau))     otherwise
    loss.backward(); optimizer.step()
    θ̄ ← decay θ̄ + (1 - decay) θ        after every optimizer step, from the first one (``update()``)

f_θ̄ is one extra forward (no backward) of a copy of the model held in eval mode; θ̄ covers the parameters and
the floating-point buffers (BatchNorm's running statistics), so its forward uses averaged statistics.

Paper: Jiawei Du, Daquan Zhou, Jiashi Feng, Vincent Y. F. Tan, Joey Tianyi Zhou, "Sharpness-Aware Training for
Free", NeurIPS 2022, arXiv 2205.14083 (MESA is its memory-efficient variant; SAF, ``samkit.losses.saf``, the
other). Source followed: the authors' code, AngusDujw/SAF ``MESA_train.py``: in ``train_one_epoch`` the EMA
forward under ``no_grad`` inside the autocast region, the term
``kl_div(log softmax(z/T), softmax(z_ema/T)).sum(-1).mean() * T**2 * reinforce`` (the EMA's distribution is the
KL's first argument; the tau² factor is theirs) added while ``kl_start_epoch < epoch < kl_end_epoch``, and
``model_ema.update(model)`` after every optimizer step; the EMA is timm's ``ModelEmaV2`` (a deepcopy put in
eval mode, every state-dict entry averaged, default decay from ``--model-ema-decay``). Defaults: lam = 0.8 (the
README's value for MESA and run.sh's ImageNet command; the script's argparse default is 0.3), tau = 5
(``--temperature``), decay = 0.9998 (``--model-ema-decay``), start_epoch = 6 (see below), end_epoch = None
(their ``--kl_end_epoch`` equals the number of epochs trained).

Choices where this differs from that code, and why:

- ``start_epoch`` is the first epoch with the term (``epoch >= start_epoch``). Their test is
  ``epoch > kl_start_epoch`` with ``--kl_start_epoch 5``, so the term starts at epoch 6 (0-based): the default.
- Their EMA forward runs on every step, also before the term starts; here it runs only when the term is used
  (the same losses, fewer forwards). ``extra_forwards`` counts the ones run.
- Integer buffers (BatchNorm's ``num_batches_tracked``) are copied, not averaged (ModelEmaV2 averages and then
  truncates them to integers); the eval-mode copy never reads them.
- log_softmax in place of log(softmax(.)): the same value without underflow to -inf.

A paper form without the tau² factor is this loss with lam / tau².
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from samkit.losses.kl import check_epoch, check_epochs, check_number, check_saved, trajectory_kl, unwrap


class MESALoss:
    """The training loss plus lam · tau² · KL(EMA model's softmax(·/tau) || the model's), with the EMA it needs.

    Args:
        model: the model being trained, already on its device (a DDP / DataParallel / compiled wrapper is
            unwrapped). A deepcopy of it, kept in eval mode, holds the EMA weights and buffers.
        base_loss: ``base_loss(outputs, targets)`` -> the scalar training loss (e.g. cross-entropy).
        lam: the term's coefficient λ, >= 0 (authors' README for MESA: 0.8).
        tau: the temperature, > 0 (authors: 5).
        start_epoch: the first epoch (counted from 0) with the term (authors: 6, their ``epoch > 5``).
        decay: the EMA's decay per optimizer step, in [0, 1] (authors: 0.9998).
        end_epoch: the first epoch without the term again, or None for never (authors: their last epoch + 1).

    Per step: ``loss = mesa(x, model(x), y, epoch=e)``; ``loss.backward()``; ``optimizer.step()``;
    ``mesa.update()``. ``mesa.bind(x, epoch=e)`` is the same loss as a ``loss_fn(outputs, targets)``.

    Example::

        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> mesa = MESALoss(model, torch.nn.functional.cross_entropy, start_epoch=0)
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> loss = mesa(x, model(x), y, epoch=0)
        >>> loss.backward(); opt.step(); mesa.update()
        >>> mesa.extra_forwards, mesa.updates
        (1, 1)
    """

    def __init__(
        self,
        model: nn.Module,
        base_loss: Callable[[Tensor, Tensor], Tensor],
        *,
        lam: float = 0.8,
        tau: float = 5.0,
        start_epoch: int = 6,
        decay: float = 0.9998,
        end_epoch: Optional[int] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be the torch.nn.Module being trained, got {type(model).__name__}")
        if not callable(base_loss):
            raise ValueError(f"base_loss must be a callable base_loss(outputs, targets), got {base_loss!r}")
        self.lam = check_number("lam", lam, "a number >= 0 (the trajectory term's weight; the authors use 0.8)")
        self.tau = check_number("tau", tau, "a number > 0 (the temperature; the authors use 5)", positive=True)
        self.decay = check_number("decay", decay, "in [0, 1] (the EMA's decay per step; authors: 0.9998)", high=1.0)
        check_epochs(start_epoch, end_epoch)
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.base_loss = base_loss
        self.model = unwrap(model)
        self.ema = copy.deepcopy(self.model).eval()
        for t in self.ema.parameters():
            t.requires_grad_(False)
        self.extra_forwards = 0  # forwards of the EMA model run so far
        self.updates = 0  # EMA updates so far

    def active(self, epoch: int) -> bool:
        """Whether the trajectory term is part of the loss at this epoch (and lam > 0)."""
        epoch = check_epoch(epoch)
        in_window = epoch >= self.start_epoch and (self.end_epoch is None or epoch < self.end_epoch)
        return in_window and self.lam > 0.0

    def __call__(self, inputs: Any, outputs: Tensor, targets: Tensor, *, epoch: int) -> Tensor:
        """The loss of one step: ``base_loss(outputs, targets)`` itself where the term is off, else that plus
        lam times the term (one forward of the EMA model on ``inputs``, under no_grad)."""
        loss = self.base_loss(outputs, targets)
        if not self.active(epoch):
            return loss
        return loss + self.lam * self.trajectory(inputs, outputs)

    def trajectory(self, inputs: Any, outputs: Tensor) -> Tensor:
        """tau² · mean KL(softmax(f_EMA(inputs)/tau) || softmax(outputs/tau)), without lam; one EMA forward."""
        return trajectory_kl(outputs, self.reference(inputs), self.tau)

    def reference(self, inputs: Any) -> Tensor:
        """The EMA model's logits for ``inputs`` (no_grad, eval mode, in the caller's autocast region)."""
        self._check_device()
        with torch.no_grad():
            logits = self.ema(inputs)
        self.extra_forwards += 1
        return logits

    def bind(self, inputs: Any, *, epoch: int) -> Callable[[Tensor, Tensor], Tensor]:
        """This step's loss as ``loss_fn(outputs, targets)``, for a step function that calls
        ``loss_fn(model(inputs), targets)`` once (a plain one-pass step)."""
        return lambda outputs, targets: self(inputs, outputs, targets, epoch=epoch)

    @torch.no_grad()
    def update(self) -> None:
        """θ̄ ← decay θ̄ + (1 - decay) θ over the parameters and floating buffers (integer buffers are copied):
        call it after each optimizer step."""
        self._check_device()
        live = self.model.state_dict()
        averaged, current = [], []
        for name, mine in self.ema.state_dict().items():
            theirs = live[name]
            if mine.is_floating_point():
                averaged.append(mine)
                current.append(theirs.detach())
            else:
                mine.copy_(theirs)
        if averaged:
            torch._foreach_mul_(averaged, self.decay)
            torch._foreach_add_(averaged, current, alpha=1.0 - self.decay)
        self.updates += 1

    def _check_device(self) -> None:
        mine = next(self.ema.parameters(), None)
        theirs = next(self.model.parameters(), None)
        if mine is not None and theirs is not None and mine.device != theirs.device:
            raise RuntimeError(
                f"the EMA copy is on {mine.device} and the model on {theirs.device}: build MESALoss after moving the "
                "model to its device, or move both with mesa.ema.to(...)"
            )

    def _options(self) -> dict[str, Any]:
        return {
            "lam": self.lam,
            "tau": self.tau,
            "start_epoch": self.start_epoch,
            "decay": self.decay,
            "end_epoch": self.end_epoch,
        }

    def state_dict(self) -> dict[str, Any]:
        """The EMA model's state dict (sharing storage with it, as torch's do: save it before the next update),
        the counters and the options a resume must agree with."""
        return {
            "class": type(self).__name__,
            "ema": self.ema.state_dict(),
            "extra_forwards": self.extra_forwards,
            "updates": self.updates,
            "options": self._options(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of ``state_dict()`` saved with the same options (a mismatch raises and names it)."""
        check_saved(self, state_dict)
        self.ema.load_state_dict(state_dict["ema"])
        self.extra_forwards = int(state_dict["extra_forwards"])
        self.updates = int(state_dict["updates"])

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({type(self.model).__name__}, {options})"
