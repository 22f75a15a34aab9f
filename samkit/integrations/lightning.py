"""PyTorch Lightning: ``SAMLightningModule``, a LightningModule whose training step is a step of the SAM family.

Install with ``pip install 'samkit[lightning]'`` (pytorch-lightning 2.6.6). Subclass ``SAMLightningModule``
instead of ``pl.LightningModule``, write ``training_loss(batch)`` (the mean loss over one batch at the current
weights) in place of ``training_step``, and return any optimizer of the family from ``configure_optimizers``::

    class Classifier(SAMLightningModule):
        def __init__(self):
            super().__init__()                       # options: accumulate_grad_batches=4, max_grad_norm=1.0, ...
            self.net = torch.nn.Sequential(...)

        def training_loss(self, batch):              # called once per forward-backward pass
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            opt = SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": CosineAnnealingLR(opt, 1000), "interval": "step"}}

One optimizer step covers a window of n batches (n = ``accumulate_grad_batches``; fewer for the last window of an
epoch), each weighted 1/n::

    clean passes       g = (1/n) Σ_j ∇L(b_j; w)          BN statistics update; DDP: no all-reduce (own ε̂ per replica)
    "shared"           ε̂ from g;  G = (1/n) Σ_j ∇L(b_j; w + ε̂)          = SAM on the union of the n batches
    "per_micro_batch"  ε̂_j from ∇L(b_j; w);  G = (1/n) Σ_j ∇L(b_j; w + ε̂_j)   = mSAM, the batches as micro-batches
    perturbed passes   BN statistics frozen; DDP: G all-reduced once, on the last pass
    w <- base step with G (unscaled and clipped first), global_step += 1, "step" schedulers step

The optimizer's rule decides as in ``sam_step`` (a one-pass step of LookSAM, RST, AE-SAM, ``interval`` ... runs
only the clean passes). Lightning runs this module in manual optimization, which refuses the Trainer's
``accumulate_grad_batches`` and ``gradient_clip_val``: pass them to this module's constructor instead. What
Lightning's own optimizer step does is done here too: ``trainer.global_step`` counts the optimizer steps (so
``max_steps``, ``ModelCheckpoint(every_n_train_steps=...)`` and the per-epoch checkpoints work), the
``on_before_optimizer_step`` hooks run before the base step, and the schedulers of ``configure_optimizers`` step
by their ``interval`` and ``frequency``. Under ``precision="16-mixed"`` the Trainer's GradScaler scales both
passes, ε̂ is taken from the unscaled gradient, and a step whose gradients overflow is skipped whole (it still
counts in ``global_step``, as in Lightning's own AMP loop; ``optimizer.steps`` counts the steps taken).

Between steps the weights sit at w for every optimizer of the family (Momentum-SAM is moved there with its
``eval()`` after each step and back with ``train()`` before the next), so validation, callbacks and checkpoints
see w. A checkpoint taken inside a window stores the window's pending batches, so a resume completes it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Optional, cast

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.apply_func import move_data_to_device
from pytorch_lightning.core.optimizer import LightningOptimizer
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy
from torch import Tensor

from samkit.integrations.window import PERTURBATIONS, WindowStep, average_over_replicas
from samkit.optim.sam import SAM
from samkit.optim.step_stats import MEASURES
from samkit.step.common import skip_step

PENDING_BATCHES_KEY = "samkit_pending_batches"  # the checkpoint entry that holds a window's pending batches


class SAMLightningModule(pl.LightningModule):
    """A LightningModule trained by an optimizer of the SAM family (see the module docstring for the step).

    Args:
        accumulate_grad_batches: n, the batches per optimizer step (Lightning's own option is refused under manual
            optimization). Each batch weighs 1/n.
        perturbation: with n > 1, ``"shared"`` (default: one ε̂ from the window's gradient, SAM on the union of
            the batches) or ``"per_micro_batch"`` (each batch its own ε̂: mSAM with the batches as micro-batches).
        max_grad_norm: clip the descent gradient to this global 2-norm before the base step (ε̂ is taken from the
            unclipped gradient); Lightning's ``gradient_clip_val`` is refused under manual optimization.
        step_schedulers: step the schedulers returned by ``configure_optimizers``: ``interval="step"`` ones after
            every ``frequency``-th optimizer step, ``interval="epoch"`` ones after the last step of every
            ``frequency``-th epoch. ``False``: step them yourself (needed for ``ReduceLROnPlateau``).
        log_loss: log the window's mean clean loss as ``train_loss`` (progress bar too) after each step.
        log_step_stats: log the optimizer's ``last_step_stats`` after each step with ``self.log``, as ``sam/lr``,
            ``sam/grad_norm``, ``sam/eps_norm``, ``sam/loss``, ``sam/perturbed_loss``, ``sam/loss_rise``,
            ``sam/cosine`` (those the step measured) and ``sam/sam_step`` (1 for a two-pass step, 0 for one pass).
            Reading them waits for the device once a step; ``self.log`` keeps Lightning's ``log_every_n_steps``.

    Subclasses implement ``training_loss(batch)`` and ``configure_optimizers``. A subclass that overrides
    ``on_save_checkpoint`` or ``on_load_checkpoint`` calls ``super()`` in it (they carry a window's pending
    batches). Log from ``training_loss`` in the clean pass only: ``if not self.sam_optimizer.perturbed: ...``.
    """

    def __init__(
        self,
        *args: Any,
        accumulate_grad_batches: int = 1,
        perturbation: str = "shared",
        max_grad_norm: Optional[float] = None,
        step_schedulers: bool = True,
        log_loss: bool = True,
        log_step_stats: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        n = accumulate_grad_batches
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"accumulate_grad_batches must be an integer >= 1 (batches per optimizer step), got {n!r}")
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {perturbation!r}")
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a number > 0 (or None for no clipping), got {max_grad_norm!r}")
        self.automatic_optimization = False
        self.sam_accumulate_grad_batches = n
        self.sam_perturbation = perturbation
        self.sam_max_grad_norm = max_grad_norm
        self.sam_step_schedulers = bool(step_schedulers)
        self.sam_log_loss = bool(log_loss)
        self.sam_log_step_stats = bool(log_step_stats)
        self._sam_logged_step: Optional[int] = None  # the optimizer step whose stats were logged last
        self._sam_pending: list = []  # the batches of the window in progress

    # ----------------------------------------------------------------------------------------------------------
    # what a subclass provides

    def training_loss(self, batch: Any) -> Tensor:
        """The mean loss over ``batch`` at the current weights (a scalar tensor). Called once per pass: on a SAM
        step first at w, then at w + ε̂ (``self.sam_optimizer.perturbed`` is True there)."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement training_loss(self, batch) -> the mean loss over the batch "
            "(SAMLightningModule's training_step calls it once per forward-backward pass)"
        )

    # ----------------------------------------------------------------------------------------------------------
    # what a subclass may read

    @property
    def sam_optimizer(self) -> SAM:
        """The SAM-family optimizer returned by ``configure_optimizers`` (not Lightning's wrapper of it)."""
        return _sam_optimizer(self)

    @property
    def estimated_optimizer_steps(self) -> float:
        """The optimizer steps of the whole fit, for schedulers such as OneCycleLR: what
        ``trainer.estimated_stepping_batches`` gives in automatic optimization, counted in windows of
        ``accumulate_grad_batches`` batches (the Trainer counts batches under manual optimization)."""
        trainer = self.trainer
        if trainer.max_epochs == -1:
            return float("inf") if trainer.max_steps == -1 else trainer.max_steps
        trainer.estimated_stepping_batches  # noqa: B018 (loads the train dataloader, so num_training_batches is set)
        batches = trainer.num_training_batches
        if batches == float("inf"):
            return trainer.max_steps
        steps = math.ceil(batches / self.sam_accumulate_grad_batches) * max(trainer.max_epochs or 1, 1)
        return min(steps, trainer.max_steps) if trainer.max_steps != -1 else steps

    # ----------------------------------------------------------------------------------------------------------
    # Lightning hooks

    def training_step(self, batch: Any, batch_idx: int) -> Optional[Tensor]:
        """Collect the batch; on the window's last batch run the optimizer step and return its mean clean loss."""
        self._sam_pending.append(batch)
        progress = self.trainer.fit_loop.epoch_loop.batch_progress
        last_of_epoch = progress.is_last_batch or progress.current.ready == self.trainer.num_training_batches
        if len(self._sam_pending) < self.sam_accumulate_grad_batches and not last_of_epoch:
            return None
        batches = [move_data_to_device(b, self.device) for b in self._sam_pending]
        self._sam_pending = []
        step = _Step(self)
        loss = step.run(batches)
        if self.sam_step_schedulers:
            step.step_schedulers("step")
            if last_of_epoch:
                step.step_schedulers("epoch")
        if self.sam_log_loss:
            self.log("train_loss", loss, prog_bar=True)
        if self.sam_log_step_stats:
            self._log_step_stats()
        return loss

    def _log_step_stats(self) -> None:
        stats = self.sam_optimizer.last_step_stats
        # a skipped step (an overflow under fp16) leaves the last step's stats, which were logged with it
        if stats is None or stats.step == self._sam_logged_step:
            return
        self._sam_logged_step = stats.step
        values = {f"sam/{k}": v for k, v in stats.as_dict().items() if k in MEASURES and v is not None}
        values["sam/sam_step"] = float(stats.sam)
        self.log_dict(values, on_step=True, on_epoch=False)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[PENDING_BATCHES_KEY] = list(self._sam_pending)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._sam_pending = list(checkpoint.get(PENDING_BATCHES_KEY, []))


def _sam_optimizer(module: pl.LightningModule) -> SAM:
    optimizers = module.trainer.optimizers
    if len(optimizers) != 1:
        raise ValueError(
            f"{type(module).__name__}.configure_optimizers returned {len(optimizers)} optimizers: "
            "SAMLightningModule trains with exactly one, an optimizer of the SAM family"
        )
    optimizer = optimizers[0]
    if not isinstance(optimizer, SAM):
        raise TypeError(
            f"{type(module).__name__}.configure_optimizers returned a {type(optimizer).__name__}: return an optimizer "
            "of the SAM family, e.g. samkit.SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)"
        )
    if type(optimizer).selects_examples:
        raise TypeError(
            f"{type(optimizer).__name__} runs its passes on examples it selects by their losses, which "
            "training_loss(batch) cannot express: use samkit.sam_step with a per-example loss in your own loop"
        )
    return optimizer


class _Step(WindowStep):
    """One optimizer step of a SAMLightningModule over a window of batches (see the module docstring)."""

    def __init__(self, module: SAMLightningModule) -> None:
        trainer = module.trainer
        if module.automatic_optimization:
            raise RuntimeError(
                f"{type(module).__name__} has automatic_optimization=True: SAMLightningModule runs its own step under "
                "manual optimization; do not set automatic_optimization"
            )
        strategy = trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise TypeError(
                f"SAMLightningModule supports one device or the DDP strategies (strategy='ddp', 'ddp_spawn', ...), "
                f"got {type(strategy).__name__}"
            )
        self.module = module
        self.trainer = trainer
        self.strategy = strategy
        self.lightning_optimizer = cast(LightningOptimizer, module.optimizers())
        self.distributed = isinstance(strategy, DDPStrategy) and trainer.world_size > 1
        self.perturbation = module.sam_perturbation
        self.setup(_sam_optimizer(module), module, getattr(trainer.precision_plugin, "scaler", None))
        if module.sam_step_schedulers:
            plateau = [c for c in trainer.lr_scheduler_configs if isinstance(c.scheduler, _PLATEAU)]
            if plateau:
                raise TypeError(
                    "ReduceLROnPlateau steps with a metric SAMLightningModule does not have: build the module with "
                    "step_schedulers=False and call scheduler.step(metric) yourself (e.g. in on_validation_epoch_end)"
                )

    # ----------------------------------------------------------------------------------------------------------

    def run(self, batches: list) -> Tensor:
        optimizer = self.optimizer
        optimizer.train()  # Momentum-SAM: from w to its evaluation point (a no-op for the others)
        optimizer.zero_grad(set_to_none=True)
        try:
            loss, finite = self.gradients(batches, [1.0 / len(batches)] * len(batches))
        except BaseException:
            optimizer.cancel_step()  # never leave the weights at w + ε̂
            raise
        self.lightning_optimizer._on_before_step()  # what LightningOptimizer.step does: global_step counts this step
        try:
            self._finish(finite)
        finally:
            self.lightning_optimizer._on_after_step()
        optimizer.zero_grad(set_to_none=True)
        optimizer.eval()  # Momentum-SAM: back to w for validation and checkpoints
        return loss

    def step_schedulers(self, interval: str) -> None:
        index = self.trainer.global_step if interval == "step" else self.trainer.current_epoch + 1
        for config in self.trainer.lr_scheduler_configs:
            if config.interval == interval and config.frequency and index % config.frequency == 0:
                self.module.lr_scheduler_step(config.scheduler, None)

    # ----------------------------------------------------------------------------------------------------------
    # what WindowStep asks of a framework

    def _backward(self, loss: Tensor, *, sync: bool) -> None:
        context: contextlib.AbstractContextManager
        if self.distributed and not sync:
            context = cast(DDPStrategy, self.strategy).block_backward_sync()
        else:
            context = contextlib.nullcontext()
        with context:
            self.module.manual_backward(loss)

    def _loss(self, batch: Any) -> Tensor:
        loss = self.module.training_loss(batch)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                f"{type(self.module).__name__}.training_loss must return the mean loss over the batch as a scalar "
                f"tensor, got {shape}"
            )
        return loss

    def non_finite_message(self) -> str:
        return (
            "a gradient is inf or NaN in the SAM step: SAM will not write non-finite values into the weights. "
            "Lower the learning rate, or train under precision='16-mixed', whose GradScaler skips such steps"
        )

    # ----------------------------------------------------------------------------------------------------------
    # the base step

    def _finish(self, finite: bool) -> None:
        optimizer, scaler = self.optimizer, self.precision.scaler
        if not finite:
            skip_step(optimizer, self.precision, self.trainable, unscaled=False)
            return
        if scaler is not None:
            scaler.unscale_(optimizer.base_optimizer)
            if not self._finite([t.grad for t in self.trainable]):  # an overflow in the perturbed pass
                skip_step(optimizer, self.precision, self.trainable, unscaled=True)
                return
        if self.distributed and optimizer.clean_gradient is not None:
            average_over_replicas(optimizer.clean_gradient)  # GSAM, LookSAM, F-SAM: every replica's state agrees
        for callback in self.trainer.callbacks:  # type: ignore[attr-defined]
            callback.on_before_optimizer_step(self.trainer, self.module, optimizer)
        self.module.on_before_optimizer_step(optimizer)
        optimizer.second_step(
            scaler=scaler,
            max_grad_norm=self.module.sam_max_grad_norm,
            loss=self.loss,
            perturbed_loss=self.perturbed_loss,
        )
        if scaler is not None:
            scaler.update()


_PLATEAU = torch.optim.lr_scheduler.ReduceLROnPlateau
