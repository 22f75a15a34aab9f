"""The configuration of one training run, and every check that can be made before training starts.

A ``TrainConfig`` is what defines an experiment: two runs with equal configs give the same weights
(same seed, same result). Runtime choices that do not change the numbers on a given machine (the output
folder, the device, progress bars) are not part of it. ``seed`` drives the initialisation, the data order,
augmentation and mixup; ``data_seed`` (fixed at 0 by default, so seeds compare optimizers on the same data)
drives the train/validation split and the label-noise flips.

    config = TrainConfig(data="digits", model="cnn", optimizer="sam", epochs=5).resolved()
    config.rho  # 0.05: the SAM paper's default (Foret et al., ICLR 2021, arXiv 2010.01412)

``resolved()`` fills the defaults that depend on the optimizer (rho 0.05 for SAM/mSAM, 0.5 for ASAM as in
Kwon et al. 2021; lr 0.1 for SGD-based, 1e-3 for Adam-based; 4 micro-batches for mSAM) and raises
``ValueError`` naming the bad value and the fix for every impossible combination.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from samkit.experiments.methods import METHODS, resolve_options

BASE_OPTIMIZERS = ("sgd", "adam")
SAM_OPTIMIZERS = tuple(name for name, method in METHODS.items() if method.is_optimizer)
LOSS_METHODS = tuple(name for name, method in METHODS.items() if not method.is_optimizer)  # mesa, saf
OPTIMIZERS = BASE_OPTIMIZERS + SAM_OPTIMIZERS + LOSS_METHODS
SCHEDULES = ("cosine", "step", "constant")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # --amp NAME -> autocast dtype

DEFAULT_RHO = {name: method.rho for name, method in METHODS.items() if method.rho is not None}
DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3}
DEFAULT_MICRO_BATCHES = 4
ASAM_ETA = METHODS["asam"].options["eta"].default


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one training run (see the module docstring)."""

    data: str = "digits"
    model: str = "cnn"
    optimizer: str = "sgd"
    epochs: int = 10
    seed: int = 0
    data_seed: int = 0
    lr: Optional[float] = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    schedule: str = "cosine"
    rho: Optional[float] = None
    micro_batches: Optional[int] = None
    options: Optional[dict] = None  # the method's own options (samkit.experiments.methods), defaults filled in
    base_optimizer: str = "sgd"
    label_smoothing: float = 0.0
    mixup: float = 0.0
    label_noise: float = 0.0
    augment: str = "none"
    subset: Optional[int] = None
    val_fraction: float = 0.0
    data_dir: Optional[str] = None
    recipe: Optional[str] = None  # the named recipe the run started from (samkit.experiments.recipes), if any
    max_grad_norm: Optional[float] = None
    amp: Optional[str] = None
    track_hessian: int = 0
    init_from: Optional[str] = None
    bootstrap_from: Optional[str] = None
    subspace: Optional[str] = None  # "line": train a line of networks (samkit.experiments.subspace)
    subspace_beta: Optional[float] = None  # the weight of its cos² term (default 1 with a subspace)

    @property
    def is_sam(self) -> bool:
        return self.optimizer in SAM_OPTIMIZERS

    @property
    def trajectory_loss(self) -> Optional[str]:
        """"mesa" or "saf" for the one-pass loss methods (samkit.losses), None otherwise."""
        method = METHODS.get(self.optimizer)
        return None if method is None else method.loss

    @property
    def base(self) -> str:
        """The optimizer that takes the step: ``sgd`` or ``adam``."""
        return self.base_optimizer if self.optimizer in METHODS else self.optimizer

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(known)}")
        return cls(**values)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def resolved(self) -> TrainConfig:
        """Check every option, fill the optimizer-dependent defaults, and return the completed config."""
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("base_optimizer", self.base_optimizer, BASE_OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        if self.amp is not None:
            _check_choice("amp", self.amp, AMP_DTYPES)
        _check_int("epochs", self.epochs, minimum=1)
        _check_int("seed", self.seed, minimum=0)
        _check_int("data_seed", self.data_seed, minimum=0)
        _check_int("batch_size", self.batch_size, minimum=1)
        _check_int("track_hessian", self.track_hessian, minimum=0)
        if self.subset is not None:
            _check_int("subset", self.subset, minimum=1)
        _check_range("momentum", self.momentum, 0.0, 1.0, high_open=True)
        _check_range("weight_decay", self.weight_decay, 0.0, math.inf)
        _check_range("label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        _check_range("mixup", self.mixup, 0.0, math.inf)
        _check_range("label_noise", self.label_noise, 0.0, 1.0, high_open=True)
        _check_range("val_fraction", self.val_fraction, 0.0, 1.0, high_open=True)
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 (or left unset), got {self.max_grad_norm}")
        if self.bootstrap_from is not None and self.label_noise > 0:
            raise ValueError(
                f"label_noise={self.label_noise} cannot be combined with bootstrap_from: the labels come from "
                "the predictions of that run (its own label noise is recorded); drop --label-noise"
            )

        from samkit.experiments.subspace import check_subspace

        beta = check_subspace(self.subspace, self.subspace_beta, init_from=self.init_from)
        lr = DEFAULT_LR[self.base] if self.lr is None else self.lr
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr}")

        if not self.is_sam:
            loss_method = self.trajectory_loss is not None
            if self.rho is not None:
                raise ValueError(
                    f"rho={self.rho} only applies to {'/'.join(SAM_OPTIMIZERS)}, not optimizer={self.optimizer!r}; "
                    "drop --rho or pick a SAM optimizer"
                )
            if self.micro_batches not in (None, 1):
                raise ValueError(
                    f"micro_batches={self.micro_batches} only applies to msam, not optimizer={self.optimizer!r}; "
                    "use --optimizer msam"
                )
            if self.options and not loss_method:
                raise ValueError(
                    f"options {sorted(self.options)} only apply to a SAM-family method, not optimizer="
                    f"{self.optimizer!r}; drop --option or pick a method"
                )
            if self.base_optimizer != "sgd" and not loss_method:
                raise ValueError(
                    f"base_optimizer={self.base_optimizer!r} only applies to SAM optimizers; "
                    f"use --optimizer {self.base_optimizer} for plain {self.base_optimizer}"
                )
            options = resolve_options(self.optimizer, self.options) if loss_method else None
            return self.replace(lr=lr, micro_batches=1, options=options, subspace_beta=beta)

        rho = DEFAULT_RHO[self.optimizer] if self.rho is None else self.rho
        if not (math.isfinite(rho) and rho > 0):
            raise ValueError(f"rho must be a finite number > 0, got {rho}")
        options = resolve_options(self.optimizer, self.options)
        micro_batches = self.micro_batches
        if METHODS[self.optimizer].micro_batches:
            micro_batches = DEFAULT_MICRO_BATCHES if micro_batches is None else micro_batches
            _check_int("micro_batches", micro_batches, minimum=2)
            if self.batch_size % micro_batches:
                raise ValueError(
                    f"batch_size={self.batch_size} is not divisible by micro_batches={micro_batches}; "
                    "pick a batch size that is a multiple of the micro-batch count"
                )
        elif micro_batches not in (None, 1):
            raise ValueError(
                f"micro_batches={micro_batches} with optimizer={self.optimizer!r}: micro-batch averaging is "
                "mSAM; use --optimizer msam --micro-batches K"
            )
        else:
            micro_batches = 1
        return self.replace(lr=lr, rho=rho, micro_batches=micro_batches, options=options, subspace_beta=beta)


def _check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(choices)}")


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_range(name: str, value: float, low: float, high: float, *, high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and low <= value
    if not ok or not (value < high if high_open else value <= high):
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value!r}")
