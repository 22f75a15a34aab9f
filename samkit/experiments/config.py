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
from typing import Any, Callable, Optional, Sequence

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


TRAIN, BOTH = ("train",), ("train", "compare")  # the commands whose parser offers a field's flag


def option(
    default: Any,
    help: Optional[str] = None,
    *,
    type: Optional[Callable[[str], Any]] = None,
    choices: Optional[Sequence[str]] = None,
    metavar: Optional[str] = None,
    commands: tuple[str, ...] = BOTH,
    show_default: bool = True,
    grid: bool = False,
    flag: Optional[str] = None,
    by_hand: bool = False,
    summary: bool = False,
) -> Any:
    """A TrainConfig field declared once, with what the ``samkit`` command and summary.json need to know of it.

    help          the --help text (``show_default``: " (default X)" is appended, X being the field's default)
    type          how the command line's text is parsed (None: kept as text); ``choices`` and ``metavar`` as argparse's
    commands      which commands offer the flag: ("train",) or ("train", "compare"), the shared training options
    grid          ``compare`` takes a comma-separated list of values (chosen on validation); ``train`` exactly one
    flag          the option's name (default ``--`` + the field's name with dashes)
    by_hand       the flag is built elsewhere (--recipe by samkit.experiments.recipes, --option by samkit.cli)
    summary       the value is copied into the run's summary.json
    """
    cli = dict(
        help=help,
        type=type,
        choices=tuple(choices) if choices is not None else None,
        metavar=metavar,
        commands=commands,
        show_default=show_default,
        grid=grid,
        flag=flag,
        by_hand=by_hand,
    )
    return dataclasses.field(default=default, metadata={"cli": cli, "summary": summary})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one training run (see the module docstring). Each field says how the command line
    sets it and whether summary.json repeats it (``option``): a new field is a new line here, nothing else."""

    data: str = option(
        "digits",
        "dataset: digits, fashion-mnist, synthetic, cifar10, cifar100, cifar100-coarse, or npz:PATH for your own "
        "arrays (docs/datasets.md)",
        summary=True,
    )
    model: str = option(
        "cnn", "model: mlp, cnn, cnn-bn, wrn-D-W[-nobn], resnetD, pyramidnet-D-A", summary=True
    )
    optimizer: str = option(
        "sgd", "default sgd, or the recipe's", choices=OPTIMIZERS, commands=TRAIN, show_default=False, summary=True
    )
    epochs: int = option(10, "", type=int, summary=True)
    seed: int = option(0, type=int, commands=TRAIN, show_default=False, summary=True)
    data_seed: int = option(0, "seed of the split and the label noise", type=int)
    lr: Optional[float] = option(
        None,
        "learning rate (default "
        + ", ".join(f"{value:g} for {name}-based" for name, value in DEFAULT_LR.items())
        + "; compare: a list, chosen on validation)",
        type=float,
        grid=True,
        show_default=False,
        summary=True,
    )
    momentum: float = option(0.9, "SGD momentum", type=float)
    weight_decay: float = option(5e-4, "in the base optimizer", type=float)
    batch_size: int = option(128, "the global batch (split over torchrun processes)", type=int)
    schedule: str = option("cosine", "", choices=SCHEDULES)
    rho: Optional[float] = option(
        None,
        "SAM radius (default "
        + ", ".join(f"{value:g} for {name}" for name, value in DEFAULT_RHO.items())
        + "; compare: a list, chosen on validation)",
        type=float,
        grid=True,
        show_default=False,
        summary=True,
    )
    micro_batches: Optional[int] = option(
        None,
        f"mSAM: the NUMBER of micro-batches K per batch (default {DEFAULT_MICRO_BATCHES}; msam only)",
        type=int,
        show_default=False,
        summary=True,
    )
    # the method's own options (samkit.experiments.methods), defaults filled in
    options: Optional[dict] = option(
        None, "an option of the chosen method", flag="--option", commands=TRAIN, by_hand=True, summary=True
    )
    base_optimizer: str = option("sgd", "the step SAM wraps", choices=BASE_OPTIMIZERS)
    label_smoothing: float = option(0.0, "", type=float)
    mixup: float = option(0.0, "Beta(ALPHA, ALPHA) mixup", type=float, metavar="ALPHA")
    label_noise: float = option(0.0, "flip this fraction of train labels", type=float, metavar="RATE")
    augment: str = option("none", "none, basic, cutout")
    subset: Optional[int] = option(
        None, "train on N examples of the training set (default all)", type=int, metavar="N", show_default=False
    )
    val_fraction: float = option(0.0, "hold out this fraction of training data", type=float)
    data_dir: Optional[str] = option(
        None, "where to look first for dataset files (fashion-mnist, cifar*)", show_default=False
    )
    # the named recipe the run started from (samkit.experiments.recipes), if any
    recipe: Optional[str] = option(None, "start from a named recipe", commands=TRAIN, by_hand=True)
    max_grad_norm: Optional[float] = option(None, "clip the step's gradient to this global norm", type=float)
    amp: Optional[str] = option(None, "mixed precision: bf16, or fp16 with loss scaling", choices=tuple(AMP_DTYPES))
    track_hessian: int = option(
        0, "record lambda_max every N epochs (default never)", type=int, metavar="N", show_default=False
    )
    init_from: Optional[str] = option(
        None, "start from a saved run's weights (new head if needed)", metavar="RUN", commands=TRAIN,
        show_default=False,
    )
    bootstrap_from: Optional[str] = option(
        None, "train on the labels RUN predicts (bootstrap)", metavar="RUN", commands=TRAIN, show_default=False,
        summary=True,
    )
    # "line": train a line of networks (samkit.experiments.subspace)
    subspace: Optional[str] = option(
        None,
        "train a line of networks: w(α) = (1 − α) w1 + α w2, α ~ U[0, 1] a batch",
        choices=("line",),
        show_default=False,
    )
    # the weight of its cos² term (default 1 with a subspace)
    subspace_beta: Optional[float] = option(
        None, "weight of the line's cos²(w1, w2) (1)", type=float, metavar="BETA", show_default=False
    )

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

    def summary_fields(self) -> dict[str, Any]:
        """The fields declared ``summary=True``: what summary.json repeats of the config."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("summary")}

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
