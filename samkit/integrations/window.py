"""One optimizer step of the SAM family over a window of batches, for the framework integrations.

A framework's training loop hands over the batches of one optimizer step (its gradient-accumulation window) and
says how to compute a batch's loss (``_loss``) and how to run a backward pass (``_backward``: its own scaling,
and under DDP whether this backward all-reduces). ``WindowStep`` runs the passes and leaves the descent gradient
(scaled, under a GradScaler) in ``.grad`` with the weights at w; the framework then runs the base step. Batch j
weighs ``weights[j]`` (the weights sum to 1)::

    clean passes       g = Σ_j weights[j] ∇L(b_j; w)              BN statistics update; DDP: no all-reduce
    "shared"           ε̂ from g;  G = Σ_j weights[j] ∇L(b_j; w + ε̂)           = SAM on the union of the batches
    "per_micro_batch"  ε̂_j from ∇L(b_j; w);  G = Σ_j weights[j] ∇L(b_j; w + ε̂_j)   = mSAM, batches as micro-batches
    perturbed passes   BN statistics frozen; DDP: G all-reduced once, on the last pass

The optimizer's rule decides as in ``sam_step``: a one-pass step (LookSAM, RST, AE-SAM, ``interval`` ...) runs the
clean passes only. With ``same_dropout_mask`` the perturbed pass of batch j runs with the random-number state its
clean pass started from (dropout draws the same mask), and the generators then continue from where the clean
passes left them. Nothing here imports a framework.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from samkit.batchnorm import frozen_running_stats
from samkit.optim.sam import SAM, finite_by_norms, first_non_finite
from samkit.step.common import Precision, replica_mean

PERTURBATIONS = ("shared", "per_micro_batch")


class WindowStep:
    """The passes of one step over a window of batches (see the module docstring).

    A subclass sets ``optimizer``, ``model``, ``precision``, ``perturbation``, ``distributed`` and
    ``same_dropout_mask`` (``setup`` does it) and implements ``_loss`` and ``_backward``."""

    optimizer: SAM
    model: torch.nn.Module
    precision: Precision
    perturbation: str = "shared"
    distributed: bool = False
    same_dropout_mask: bool = False
    loss: Optional[Tensor] = None  # the last window's weighted mean clean loss
    perturbed_loss: Optional[Tensor] = None  # ... and perturbed loss (None: a one-pass step)

    def setup(self, optimizer: SAM, model: torch.nn.Module, scaler: Optional[torch.amp.GradScaler]) -> None:
        self.optimizer = optimizer
        self.model = model
        self.params = [t for group in optimizer.param_groups for t in group["params"]]
        self.trainable = [t for t in self.params if t.requires_grad]
        if not self.trainable:
            raise ValueError("the optimizer has no parameter that requires grad: nothing to train")
        self.precision = Precision(scaler, None, self.trainable[0].device.type)
        self._rng = _Generators(self.trainable[0].device)
        self._rng_at: dict[int, Any] = {}  # batch index -> the generators' state before its clean pass

    # ----------------------------------------------------------------------------------------------------------
    # what a framework provides

    def _loss(self, batch: Any) -> Tensor:
        """The mean loss over ``batch`` at the current weights, a scalar tensor."""
        raise NotImplementedError

    def _backward(self, loss: Tensor, *, sync: bool) -> None:
        """``loss.backward()`` as the framework runs it (scaled under a GradScaler); ``sync``: all-reduce under DDP."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------------------------
    # the passes

    def _clean(self, batch: Any, index: int, weight: float, *, sync: bool) -> Tensor:
        if self.same_dropout_mask:
            self._rng_at[index] = self._rng.state()
        loss = self._loss(batch)
        self._backward(loss * weight, sync=sync)
        loss = loss.detach()
        return loss.float() if loss.dtype in (torch.float16, torch.bfloat16) else loss

    def _clean_passes(self, batches: list, weights: Sequence[float], *, sync_last: bool) -> Tensor:
        """The clean passes accumulate the window's (weighted, scaled) gradient in .grad; return the mean loss."""
        total = self._zero()
        for j, (b, weight) in enumerate(zip(batches, weights)):
            total = total + self._clean(b, j, weight, sync=sync_last and j == len(batches) - 1) * weight
        return total

    def _zero(self) -> Tensor:
        return torch.zeros((), device=self.trainable[0].device)

    def _perturbed(self, batch: Any, index: int, weight: float, *, sync: bool) -> None:
        after = self._rng.state() if self.same_dropout_mask else None
        if after is not None:
            self._rng.set(self._rng_at[index])  # the random numbers of this batch's clean pass: the same mask
        try:
            with frozen_running_stats(self.model):  # the pass at w + ε̂ leaves BatchNorm statistics alone
                loss = self._loss(batch)
                self._backward(loss * weight, sync=sync)
            loss = loss.detach()
            loss = loss.float() if loss.dtype in (torch.float16, torch.bfloat16) else loss
            self.perturbed_loss = loss * weight if self.perturbed_loss is None else self.perturbed_loss + loss * weight
        finally:
            if after is not None:
                self._rng.set(after)

    def _perturbed_passes(self, batches: list, weights: Sequence[float]) -> None:
        last = len(batches) - 1
        for j, (b, weight) in enumerate(zip(batches, weights)):
            self._perturbed(b, j, weight, sync=j == last)

    def _clean_alone(self, batch: Any, index: int) -> tuple[Tensor, list]:
        """One batch's clean loss and gradient (scaled), with whatever .grad held before put back."""
        held = self._take_grads()
        loss = self._clean(batch, index, 1.0, sync=False)
        grads = self._take_grads()
        for t, g in zip(self.params, held):
            t.grad = g
        return loss, grads

    def _take_grads(self) -> list:
        grads = [t.grad for t in self.params]
        for t in self.params:
            t.grad = None
        return grads

    # ----------------------------------------------------------------------------------------------------------
    # the step's shapes (as in samkit.step.loop)

    def gradients(self, batches: list, weights: Sequence[float]) -> tuple[Tensor, bool]:
        """Leave the descent gradient (scaled) in .grad with the weights at w; return the weighted mean clean loss
        and whether the gradients are finite (always True without a GradScaler: a non-finite one raises).
        ``loss`` and ``perturbed_loss`` then hold the window's weighted mean clean and perturbed losses (the
        latter None on a one-pass step), for the step's diagnostics (``second_step(loss=, perturbed_loss=)``)."""
        self._rng_at = {}
        self.loss, self.perturbed_loss = None, None
        try:
            loss, finite = self._gradients(batches, weights)
            self.loss = loss
            return loss, finite
        finally:
            self._rng_at = {}

    def _gradients(self, batches: list, weights: Sequence[float]) -> tuple[Tensor, bool]:
        optimizer = self.optimizer
        plan = optimizer.will_perturb
        if plan is None:
            return self._decided_from_gradient(batches, weights)
        if not plan:  # a one-pass step: the clean gradient is the descent gradient (DDP: all-reduced on the last)
            total = self._clean_passes(batches, weights, sync_last=True)
            optimizer.first_step()
            return total, self._finite([t.grad for t in self.trainable])
        if self.perturbation == "shared" or len(batches) == 1:
            total = self._clean_passes(batches, weights, sync_last=False)
            grads = [t.grad for t in self.params]
            self.precision.unscale_(grads)
            if not self._finite(grads):
                return total, False
            optimizer.first_step(zero_grad=True, grads=grads)
            self._perturbed_passes(batches, weights)
            optimizer.restore()
            return total, True
        total = self._zero()
        last = len(batches) - 1
        for j, (b, weight) in enumerate(zip(batches, weights)):
            loss, grads = self._clean_alone(b, j)
            total = total + loss * weight
            self.precision.unscale_(grads)
            if not self._finite(grads):
                optimizer.cancel_step()
                return total, False
            optimizer.first_step(grads=grads, weight=weight)
            del grads
            self._perturbed(b, j, weight, sync=j == last)
            optimizer.restore()
        return total, True

    def _decided_from_gradient(self, batches: list, weights: Sequence[float]) -> tuple[Tensor, bool]:
        """A rule that reads the clean gradient (AE-SAM): every clean pass, the decision on the window's gradient
        (averaged over DDP replicas, so that all of them decide alike), then the ascents."""
        optimizer, last = self.optimizer, len(batches) - 1
        separate = self.perturbation == "per_micro_batch" and len(batches) > 1
        if separate:
            total, parts = self._zero(), []
            for j, (b, weight) in enumerate(zip(batches, weights)):
                loss, grads = self._clean_alone(b, j)
                total = total + loss * weight
                parts.append(grads)
            summed = [None if gs[0] is None else weighted_sum(gs, weights) for gs in zip(*parts)]
        else:
            total = self._clean_passes(batches, weights, sync_last=False)
            summed = [t.grad for t in self.params]
        whole = replica_mean(summed) if self.distributed else summed
        decision = self.precision.unscaled(whole)
        if not self._finite(decision):
            return total, False
        if not optimizer.decide(decision):
            for t, g in zip(self.params, whole):  # a one-pass step: the window's (scaled) gradient, replica mean
                t.grad = g
            return total, True
        if not separate:
            grads = [t.grad for t in self.params]
            self.precision.unscale_(grads)
            optimizer.first_step(zero_grad=True, grads=grads)
            self._perturbed_passes(batches, weights)
            optimizer.restore()
            return total, True
        self._take_grads()
        for j, (b, grads, weight) in enumerate(zip(batches, parts, weights)):
            self.precision.unscale_(grads)
            optimizer.first_step(grads=grads, weight=weight)
            self._perturbed(b, j, weight, sync=j == last)
            optimizer.restore()
        return total, True

    # ----------------------------------------------------------------------------------------------------------

    def _finite(self, grads: list) -> bool:
        """Whether every gradient is finite (agreed over DDP replicas under a GradScaler, so that all skip alike)."""
        present = [g for g in grads if g is not None]
        finite = finite_by_norms(present)  # fp16 / bf16 summed in float32: a large finite gradient is finite
        if finite is None or (not bool(finite) and first_non_finite(present) is None):
            finite = torch.ones((), dtype=torch.bool, device=self.trainable[0].device)
        if self.precision.scaler is None:
            if not bool(finite):
                raise FloatingPointError(self.non_finite_message())
            return True
        if self.distributed:
            flag = (~finite).to(torch.float32).reshape(1)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            finite = flag[0] == 0
        return bool(finite)

    def non_finite_message(self) -> str:
        return (
            "a gradient is inf or NaN in the SAM step: SAM will not write non-finite values into the weights. "
            "Lower the learning rate, or train under fp16 mixed precision, whose GradScaler skips such steps"
        )


def weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Σ_j weights[j] tensors[j], left to right."""
    total = tensors[0] * weights[0]
    for t, w in zip(tensors[1:], weights[1:]):
        total = total + t * w
    return total


def average_over_replicas(tensors: list) -> None:
    """Each tensor (None skipped) replaced in place by its mean over the DDP replicas."""
    present = [t for t in tensors if t is not None]
    for t in present:
        torch.distributed.all_reduce(t)
    if present:
        torch._foreach_div_(present, torch.distributed.get_world_size())


class _Generators:
    """The random-number generators a forward pass on ``device`` draws from: the CPU one, and the device's own."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        module = None if device.type == "cpu" else getattr(torch, device.type, None)
        self.module = module if module is not None and hasattr(module, "get_rng_state") else None

    def state(self) -> tuple:
        device_state = None if self.module is None else self.module.get_rng_state(self.device)
        return torch.get_rng_state(), device_state

    def set(self, state: tuple) -> None:
        cpu, device_state = state
        torch.set_rng_state(cpu)
        if self.module is not None:
            self.module.set_rng_state(device_state, self.device)
