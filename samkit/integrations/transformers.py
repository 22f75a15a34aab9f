"""Hugging Face transformers: ``SAMTrainer``, a ``transformers.Trainer`` whose optimizer step is a SAM-family step.

Install with ``pip install 'samkit[transformers]'`` (transformers 5.24.0, accelerate 1.15.0). Use it in place of
``Trainer``; the optimizer is built from ``TrainingArguments`` (``optim``, ``learning_rate``, ``weight_decay``, ...)
and wrapped in ``sam_class(**sam_kwargs)``, or passed in built (``optimizers=(SAM(...), scheduler)``)::

    trainer = SAMTrainer(model=model, args=TrainingArguments(...), train_dataset=train,
                         sam_class=SAM, sam_kwargs={"rho": 0.05})
    trainer.train()

``Trainer`` cannot take a SAM as it is: its loop runs one forward-backward per batch and then calls
``optimizer.step()`` without a closure. ``SAMTrainer.training_step`` collects the batches of one optimizer step
(the ``gradient_accumulation_steps`` window, fewer for the last window of an epoch) and on the window's last batch
runs the passes of ``samkit.integrations.window`` (batch j weighs its share w_j of the window's label items)::

    clean passes       g = Σ_j w_j ∇L(b_j; w)            BN statistics update; dropout draws mask m_j
    "shared"           ε̂ from g;  G = Σ_j w_j ∇L(b_j; w + ε̂)             = SAM on the window's batches put together
    "per_micro_batch"  ε̂_j from ∇L(b_j; w);  G = Σ_j w_j ∇L(b_j; w + ε̂_j)   = mSAM, the batches as micro-batches
    perturbed passes   BN statistics frozen; with same_dropout_mask, the same mask m_j as the clean pass

then the Trainer's own loop goes on: ``optimizer.step()`` (here: w restored, the variant's descent, clipping of the
descent gradient to ``max_grad_norm``, the base step, under fp16 through accelerate's GradScaler), the scheduler,
``global_step += 1``, logging (the window's mean clean loss), evaluation and checkpoints. The optimizer's rule
decides as in ``sam_step``: a one-pass step of LookSAM, RST, AE-SAM, ``interval`` ... runs the clean passes only.
Between steps the weights sit at w for every optimizer of the family (Momentum-SAM is moved there after each step).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Optional, cast

import torch
from torch import Tensor
from transformers import Trainer, TrainerCallback

from samkit.integrations.window import PERTURBATIONS, WindowStep
from samkit.optim.protocol import Phase
from samkit.optim.sam import SAM, check_base_optimizer

IGNORE_INDEX = -100  # label items the Trainer (and the models' losses) leave out


class SAMTrainer(Trainer):
    """A ``transformers.Trainer`` trained by an optimizer of the SAM family (see the module docstring).

    Args (the Trainer's own, plus):
        sam_class: the SAM-family class that wraps the optimizer the Trainer builds from ``TrainingArguments``
            (default ``samkit.SAM``). Ignored when ``optimizers=(optimizer, scheduler)`` passes a built SAM.
        sam_kwargs: its options (``rho``, ``adaptive``, GSAM's ``alpha``, ...); default: the class's defaults.
        perturbation: with ``gradient_accumulation_steps`` > 1, ``"shared"`` (default: one ε̂ from the window's
            gradient, SAM on the window's batches put together) or ``"per_micro_batch"`` (each batch its own ε̂: mSAM
            with the batches as micro-batches).
        same_dropout_mask: run each batch's perturbed pass with the random-number state its clean pass started from,
            so dropout draws the same mask in both passes (default True, as the SAM authors' code does). Costs one
            copy of the generators' state per batch (a few kB), no extra pass and no memory that grows with the model.

    ``max_grad_norm`` (``TrainingArguments``) clips the descent gradient, the one the base optimizer receives; the
    logged ``grad_norm`` is the norm before the variant's descent and before clipping. ``compute_loss`` is called
    once per pass with ``num_items_in_batch=None`` and returns the batch's mean loss: SAMTrainer weighs the batches.
    """

    def __init__(
        self,
        *args: Any,
        sam_class: type = SAM,
        sam_kwargs: Optional[dict] = None,
        perturbation: str = "shared",
        same_dropout_mask: bool = True,
        **kwargs: Any,
    ) -> None:
        if not (isinstance(sam_class, type) and issubclass(sam_class, SAM)):
            raise TypeError(
                f"sam_class must be a class of the SAM family (samkit.SAM, samkit.GSAM, ...), got {sam_class!r}"
            )
        if sam_class.selects_examples:
            raise TypeError(_selects_examples_message(sam_class.__name__))
        if sam_kwargs is not None and not isinstance(sam_kwargs, Mapping):
            raise TypeError(f"sam_kwargs must be a dict of {sam_class.__name__}'s options, got {sam_kwargs!r}")
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {perturbation!r}")
        if not isinstance(same_dropout_mask, bool):
            raise TypeError(f"same_dropout_mask must be True or False, got {same_dropout_mask!r}")
        super().__init__(*args, **kwargs)
        self.sam_class = sam_class
        self.sam_kwargs = dict(sam_kwargs or {})
        self.sam_perturbation = perturbation
        self.same_dropout_mask = same_dropout_mask
        self._sam_pending: list = []  # the batches of the window in progress
        self._check_setup()
        self.add_callback(_EndSkippedStep(self))

    def _check_setup(self) -> None:
        args = self.args
        if args.world_size > 1 or args.n_gpu > 1 or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                f"SAMTrainer trains on one device (world_size={args.world_size}, n_gpu={args.n_gpu}, "
                f"deepspeed={self.is_deepspeed_enabled}, fsdp={self.is_fsdp_enabled}): run one process on one "
                "device, e.g. CUDA_VISIBLE_DEVICES=0, or use samkit.integrations.lightning for DDP"
            )
        if self.loss_is_scaled_for_ga:
            raise ValueError(
                "loss_is_scaled_for_ga=True: SAMTrainer weighs the batches of a window itself and needs compute_loss "
                "to return each batch's mean loss; leave loss_is_scaled_for_ga unset"
            )

    # ----------------------------------------------------------------------------------------------------------
    # what a user may read

    @property
    def sam_optimizer(self) -> SAM:
        """The SAM-family optimizer (``trainer.optimizer`` is accelerate's wrapper around the Trainer's view of it)."""
        optimizer = self.optimizer
        while optimizer is not None and not isinstance(optimizer, SAM):
            optimizer = getattr(optimizer, "sam", None) or getattr(optimizer, "optimizer", None)
        if optimizer is None:
            raise RuntimeError("the optimizer is built when training starts (trainer.train() or create_optimizer())")
        return optimizer

    # ----------------------------------------------------------------------------------------------------------
    # Trainer methods

    def create_optimizer(self, model: Optional[torch.nn.Module] = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer (built from TrainingArguments) wrapped in ``sam_class``, or the SAM passed in."""
        if isinstance(_unwrapped(self.optimizer), _SAMStep):
            return cast(torch.optim.Optimizer, self.optimizer)  # a second train(): already built
        optimizer = super().create_optimizer(model)
        if not isinstance(optimizer, SAM):
            check_base_optimizer(optimizer)
            groups = [{"params": group["params"]} for group in optimizer.param_groups]
            optimizer = self.sam_class(groups, optimizer, **self.sam_kwargs)
        elif type(optimizer).selects_examples:
            raise TypeError(_selects_examples_message(type(optimizer).__name__))
        self.optimizer = _SAMStep(optimizer, self.args.max_grad_norm)
        return self.optimizer

    def training_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Optional[Any] = None,
    ) -> Tensor:
        """Collect the batch; on the window's last batch run the SAM passes and return the window's mean clean loss
        (zero on the other batches, so the Trainer's sum over the window is that mean)."""
        self._sam_pending.append(inputs)
        if len(self._sam_pending) < getattr(self, "current_gradient_accumulation_steps", 1):
            return torch.zeros((), device=self.args.device)
        batches, self._sam_pending = self._sam_pending, []
        model.train()
        batches = [self._prepare_inputs(b) for b in batches]
        return _TrainerStep(self, model).run(batches, self.batch_weights(batches))

    def batch_weights(self, batches: list) -> list[float]:
        """Each batch's share of the window: its label items (labels != -100, shifted as the Trainer counts them for
        a causal LM loss) over the window's, or 1/n when the batches carry no labels to count."""
        counts = [self._label_items(b) for b in batches]
        if any(c is None for c in counts) or sum(counts) == 0:  # type: ignore[arg-type]
            return [1.0 / len(batches)] * len(batches)
        total = sum(counts)  # type: ignore[arg-type]
        return [c / total for c in counts]  # type: ignore[operator]

    def _label_items(self, batch: Any) -> Optional[int]:
        if not isinstance(batch, Mapping):
            return None
        labels = batch.get("shift_labels")
        if labels is None:
            labels = batch.get("labels")
            if isinstance(labels, Tensor) and getattr(self, "_loss_shifts_labels", False):
                labels = labels[..., 1:]
        if not isinstance(labels, Tensor):
            return None
        return int(labels.ne(IGNORE_INDEX).sum())

    def _clip_grad_norm(self, model: torch.nn.Module) -> None:
        """No clipping here: the descent gradient is clipped in the optimizer's step, after the variant formed it.
        (The Trainer then logs the unclipped norm of the gradient in .grad.)"""
        return None


def _selects_examples_message(name: str) -> str:
    return (
        f"{name} runs its passes on examples it selects by their losses, which compute_loss cannot express: use "
        "samkit.sam_step with a per-example loss in your own loop"
    )


def _unwrapped(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer) if not isinstance(optimizer, _SAMStep) else optimizer


class _TrainerStep(WindowStep):
    """The passes of one SAMTrainer step (the module docstring); the base step is _SAMStep.step."""

    def __init__(self, trainer: SAMTrainer, model: torch.nn.Module) -> None:
        self.trainer = trainer
        self.perturbation = trainer.sam_perturbation
        self.same_dropout_mask = trainer.same_dropout_mask
        self.distributed = False
        self.setup(trainer.sam_optimizer, model, trainer.accelerator.scaler)

    def run(self, batches: list, weights: list[float]) -> Tensor:
        optimizer = self.optimizer
        if optimizer.phase is not Phase.READY:
            optimizer.cancel_step()  # a step the Trainer never finished (an exception between the passes and step())
        optimizer.train()  # Momentum-SAM: from w to its evaluation point (a no-op for the others)
        optimizer.zero_grad(set_to_none=True)
        try:
            loss, finite = self.gradients(batches, weights)
        except BaseException:
            optimizer.cancel_step()  # never leave the weights at w + ε̂
            raise
        # the window's losses, for the step's diagnostics (last_step_stats) when _SAMStep.step finishes it
        cast(_SAMStep, _unwrapped(self.trainer.optimizer)).losses = (self.loss, self.perturbed_loss)
        if not finite:  # fp16 overflow in a clean pass: the GradScaler must see it and skip the step
            optimizer.cancel_step()
            for t in self.trainable:
                t.grad = None
            self.trainable[0].grad = torch.full_like(self.trainable[0], float("inf"))
        return loss

    def _loss(self, batch: Any) -> Tensor:
        trainer = self.trainer
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(self.model, batch)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                f"compute_loss must return the mean loss over the batch as a scalar tensor, got {shape} (a model "
                "returns it as outputs.loss or outputs[0])"
            )
        return loss

    def _backward(self, loss: Tensor, *, sync: bool) -> None:
        self.trainer.accelerator.backward(loss)  # scaled under fp16

    def non_finite_message(self) -> str:
        return (
            "a gradient is inf or NaN in the SAM step: SAM will not write non-finite values into the weights. "
            "Lower the learning rate, or train with fp16=True, whose GradScaler skips such steps"
        )


class _SAMStep(torch.optim.Optimizer):
    """The optimizer the Trainer (and accelerate) hold: the SAM-family optimizer's groups, state and checkpoints, and a
    ``step()`` that finishes the step SAMTrainer.training_step prepared (w restored, the variant's descent, the
    descent gradient clipped to ``max_grad_norm``, the base step). Under fp16 accelerate's GradScaler unscales the
    gradients before calling it and skips it on an overflow."""

    def __init__(self, sam: SAM, max_grad_norm: Optional[float]) -> None:
        self.sam = sam
        self.max_grad_norm = max_grad_norm if max_grad_norm is not None and max_grad_norm > 0 else None
        self.losses: tuple[Optional[Tensor], Optional[Tensor]] = (None, None)  # set by the passes, read by step()
        # what torch.optim.Optimizer.__init__ would set (this wrapper has no groups of its own to give it)
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()

    @property
    def param_groups(self) -> list:
        return self.sam.param_groups

    @param_groups.setter
    def param_groups(self, groups: list) -> None:
        self.sam.param_groups = groups

    @property
    def state(self) -> Any:
        return self.sam.state

    @state.setter
    def state(self, state: Any) -> None:
        self.sam.state = state

    @property
    def defaults(self) -> dict:
        return self.sam.defaults

    @defaults.setter
    def defaults(self, defaults: dict) -> None:
        self.sam.defaults = defaults

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("SAMTrainer's optimizer runs its passes in training_step: step() takes no closure")
        sam = self.sam
        if not sam._step.decided:
            raise RuntimeError(
                "step() without the passes of SAMTrainer.training_step: the SAM step runs inside SAMTrainer's loop"
            )
        (loss, perturbed_loss), self.losses = self.losses, (None, None)
        sam.second_step(max_grad_norm=self.max_grad_norm, loss=loss, perturbed_loss=perturbed_loss)
        sam.eval()  # Momentum-SAM: back to w for evaluation and checkpoints

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sam.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.sam.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.sam.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict) -> None:
        self.sam.add_param_group(param_group)

    def train(self) -> None:
        self.sam.train()

    def eval(self) -> None:
        self.sam.eval()

    def __getstate__(self) -> dict:
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"SAMTrainer's step of {self.sam!r}"


class _EndSkippedStep(TrainerCallback):
    """After the Trainer's optimizer step: a step the GradScaler skipped (an fp16 overflow in the perturbed pass)
    never reached _SAMStep.step, so it is abandoned here (weights at w, SAM's counters and state untouched)."""

    def __init__(self, trainer: SAMTrainer) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        sam = self.trainer.sam_optimizer
        if sam.phase is not Phase.READY:
            sam.cancel_step()
            sam.eval()
