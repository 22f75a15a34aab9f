"""The training methods the CLI offers: each a registry entry (its name, ρ default, own options, builder).

A method of the SAM family is built from the run's base optimizer class and options (SGD or Adam, from the
config) and its own options, given on the command line as ``--option NAME=VALUE`` and recorded in the run's
config, so a run directory says exactly what ran. Adding a method is adding an entry here.

    name        class                    rule (samkit.optim.<file> has the details)            passes/step
    sam         SAM                      ascent to w + ε̂, descend with ∇L(w + ε̂); interval=k: every k-th  2 (1 + 1/k)
    asam        SAM(adaptive=True)       the ASAM authors' ball: T = |w| + 0.01 on weights, 1 elsewhere   2
    msam        SAM + micro-batches      each micro-batch its own ε̂ (sam_step micro_batches=K)          2
    gsam        GSAM                     descend along g_s − α g_⊥ (surrogate gap)                         2
    sam-on      SAMOn                    perturb only the normalization layers' affine parameters         2
    fsam        FriendlySAM              ascent along g − σ·EMA(g)                                          2
    looksam     LookSAM                  SAM every k steps, reuse g_v in between                           1 + 1/k
    rst         RandomSAM                SAM with probability p                                            1 + p
    aesam       AESAM                    SAM when ||g||² is high against its running mean and spread       1 + share
    late-sam    LateSAM                  the base optimizer first, SAM for the last fraction               1 + fraction
    momentum-sam MomentumSAM             the gradient at w − ρ·m/||m|| (m: the base's momentum)            1
    esam        ESAM                     perturb a random β of the tensors; 2nd pass on the γ rising most   4/3 + γ
    ksam        KSAM                     both passes on the k highest-loss examples                         1/3 + 2k/n

and two methods that are losses, not optimizers (samkit.losses; the base optimizer steps, one pass):

    mesa        MESALoss                 loss + λ τ² KL(EMA model's outputs || the model's)               1 + 1 fwd
    saf         SAFLoss                  loss + λ τ² KL(each example's logits `delay` epochs ago || now)  1
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn


@dataclass(frozen=True)
class Option:
    """One option of a method: its parse type, default and meaning (shown by ``samkit train --help``)."""

    type: Callable[[str], Any]
    default: Any
    help: str
    choices: tuple = ()


@dataclass(frozen=True)
class BuildContext:
    """What a builder may read: the model, the base optimizer, the run's length and seed."""

    model: nn.Module
    params: list
    base_class: type
    base_options: dict
    rho: float
    lr: float
    schedule: str
    total_steps: int
    seed: int


@dataclass(frozen=True)
class Method:
    label: str
    rho: Optional[float]  # the default radius (None: a loss method, no perturbation)
    paper: str
    build: Optional[Callable[[BuildContext, dict], torch.optim.Optimizer]]  # None: the base optimizer alone
    options: dict[str, Option] = field(default_factory=dict)
    micro_batches: bool = False  # sam_step splits the batch (mSAM)
    loss: Optional[str] = None  # "mesa" / "saf": a trajectory loss around the base optimizer (experiments/trajectory)

    @property
    def is_optimizer(self) -> bool:
        """A SAM-family optimizer (stepped with sam_step), as opposed to a loss around the base optimizer."""
        return self.loss is None


def _bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _optional_float(text: str) -> Optional[float]:
    return None if str(text).strip().lower() in ("none", "") else float(text)


def _sam(ctx: BuildContext, o: dict):
    from samkit.optim import SAM

    return SAM(ctx.params, ctx.base_class, rho=ctx.rho, interval=o["interval"], **ctx.base_options)


def asam_param_groups(model: nn.Module, eta: float) -> list[dict]:
    """Parameters named "...weight" get the adaptive ball (T = |w| + eta); biases and the rest get T = 1."""
    weights, others = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (weights if name.endswith("weight") else others).append(parameter)
    groups = [{"params": weights, "adaptive": True, "eta": eta}]
    if others:
        groups.append({"params": others, "adaptive": False, "eta": 0.0})
    return groups


def _asam(ctx: BuildContext, o: dict):
    from samkit.optim import SAM

    return SAM(asam_param_groups(ctx.model, o["eta"]), ctx.base_class, rho=ctx.rho, **ctx.base_options)


def _msam(ctx: BuildContext, o: dict):
    from samkit.optim import SAM

    return SAM(ctx.params, ctx.base_class, rho=ctx.rho, **ctx.base_options)


def _gsam(ctx: BuildContext, o: dict):
    from samkit.optim import GSAM

    schedule = {}
    if o["rho_min"] is not None:
        if ctx.schedule != "cosine":
            raise ValueError(
                f"rho_min={o['rho_min']} ties GSAM's rho to a decaying learning rate, but the schedule is "
                f"{ctx.schedule!r}: use --schedule cosine, or leave rho_min unset for a constant rho"
            )
        schedule = dict(rho_min=o["rho_min"], lr_max=ctx.lr, lr_min=0.0)  # cosine decays to 0
    return GSAM(ctx.params, ctx.base_class, rho=ctx.rho, alpha=o["alpha"], **schedule, **ctx.base_options)


def _sam_on(ctx: BuildContext, o: dict):
    from samkit.optim import SAMOn

    return SAMOn(ctx.params, ctx.base_class, model=ctx.model, rho=ctx.rho, perturb=o["perturb"], **ctx.base_options)


def _fsam(ctx: BuildContext, o: dict):
    from samkit.optim import FriendlySAM

    return FriendlySAM(ctx.params, ctx.base_class, rho=ctx.rho, sigma=o["sigma"], lmbda=o["lmbda"], **ctx.base_options)


def _looksam(ctx: BuildContext, o: dict):
    from samkit.optim import LookSAM

    return LookSAM(
        ctx.params,
        ctx.base_class,
        rho=ctx.rho,
        k=o["k"],
        alpha=o["alpha"],
        layerwise=o["layerwise"],
        **ctx.base_options,
    )


def _rst(ctx: BuildContext, o: dict):
    from samkit.optim import RandomSAM

    schedule = {} if o["schedule"] == "constant" else dict(prob_end=o["prob_end"], total_steps=ctx.total_steps)
    return RandomSAM(
        ctx.params,
        ctx.base_class,
        rho=ctx.rho,
        prob=o["prob"],
        schedule=o["schedule"],
        seed=ctx.seed,
        **schedule,
        **ctx.base_options,
    )


def _aesam(ctx: BuildContext, o: dict):
    from samkit.optim import AESAM

    return AESAM(
        ctx.params,
        ctx.base_class,
        rho=ctx.rho,
        total_steps=ctx.total_steps,
        delta=o["delta"],
        lambda1=o["lambda1"],
        lambda2=o["lambda2"],
        **ctx.base_options,
    )


def _late_sam(ctx: BuildContext, o: dict):
    from samkit.optim import LateSAM

    return LateSAM(
        ctx.params,
        ctx.base_class,
        rho=ctx.rho,
        total_steps=ctx.total_steps,
        sam_fraction=o["sam_fraction"],
        **ctx.base_options,
    )


def _momentum_sam(ctx: BuildContext, o: dict):
    from samkit.optim import MomentumSAM

    return MomentumSAM(ctx.params, ctx.base_class, rho=ctx.rho, **ctx.base_options)


def _esam(ctx: BuildContext, o: dict):
    from samkit.optim import ESAM

    return ESAM(
        ctx.params, ctx.base_class, rho=ctx.rho, beta=o["beta"], gamma=o["gamma"], seed=ctx.seed, **ctx.base_options
    )


def _count_or_fraction(text: str):
    """K-SAM's k: "8" is a count of examples, "0.5" (any number with a point) a fraction of the batch."""
    text = str(text).strip()
    return int(text) if text.isdigit() else float(text)


def _ksam(ctx: BuildContext, o: dict):
    from samkit.optim import KSAM

    return KSAM(ctx.params, ctx.base_class, k=o["k"], rho=ctx.rho, **ctx.base_options)


METHODS: dict[str, Method] = {
    "sam": Method(
        "SAM",
        0.05,
        "Foret et al., ICLR 2021, arXiv 2010.01412",
        _sam,
        {"interval": Option(int, 1, "SAM on every k-th step, one pass on the others (1: every step)")},
    ),
    "asam": Method(
        "ASAM",
        0.5,
        "Kwon et al., ICML 2021, arXiv 2102.11600",
        _asam,
        {"eta": Option(float, 0.01, "the offset of T = |w| + eta on weights (biases and the rest: T = 1)")},
    ),
    "msam": Method("mSAM", 0.05, "Behdin et al., 2023, arXiv 2302.09693", _msam, micro_batches=True),
    "gsam": Method(
        "GSAM",
        0.05,
        "Zhuang et al., ICLR 2022, arXiv 2203.08065",
        _gsam,
        {
            "alpha": Option(float, 0.2, "weight of the surrogate-gap term: descend along g_s − alpha g_⊥"),
            "rho_min": Option(_optional_float, None, "tie rho to the cosine lr: rho at lr_max, rho_min at lr 0"),
        },
    ),
    "sam-on": Method(
        "SAM-ON",
        0.5,
        "Mueller et al., NeurIPS 2023, arXiv 2306.04226",
        _sam_on,
        {"perturb": Option(str, "norm", "norm: only normalization parameters; no_norm: all but", ("norm", "no_norm"))},
    ),
    "fsam": Method(
        "F-SAM",
        0.05,
        "Li et al., CVPR 2024, arXiv 2403.12350",
        _fsam,
        {
            "sigma": Option(float, 1.0, "share of the gradient's EMA removed from the ascent direction"),
            "lmbda": Option(float, 0.9, "decay of the gradient's EMA"),
        },
    ),
    "looksam": Method(
        "LookSAM",
        0.05,
        "Liu et al., CVPR 2022, arXiv 2203.02714",
        _looksam,
        {
            "k": Option(int, 5, "a full SAM step every k steps"),
            "alpha": Option(float, 0.7, "weight of the reused direction g_v on the other steps"),
            "layerwise": Option(_bool, False, "norms and inner products per tensor instead of global"),
        },
    ),
    "rst": Method(
        "RST",
        0.05,
        "Zhao et al., 2022, arXiv 2203.09962",
        _rst,
        {
            "prob": Option(float, 0.5, "probability that a step is a SAM step (at the start, if scheduled)"),
            "schedule": Option(str, "constant", "how the probability moves", ("constant", "linear", "cosine")),
            "prob_end": Option(_optional_float, None, "the probability at the end of training (schedules)"),
        },
    ),
    "aesam": Method(
        "AE-SAM",
        0.05,
        "Jiang et al., ICLR 2023, arXiv 2304.14647",
        _aesam,
        {
            "delta": Option(float, 0.9, "decay of the EMAs of ||g||²"),
            "lambda1": Option(float, -1.0, "c at the end of training (SAM when ||g||² >= mu + c sigma)"),
            "lambda2": Option(float, 1.0, "c at the start of training"),
        },
    ),
    "late-sam": Method(
        "late-phase SAM",
        0.05,
        "Zhou et al., ICLR 2025, arXiv 2410.10373",
        _late_sam,
        {"sam_fraction": Option(float, 0.0625, "the last fraction of the steps that are SAM steps")},
    ),
    "momentum-sam": Method("Momentum-SAM", 3.0, "Becker, Altrock, Risse, TMLR 2024, arXiv 2401.12033", _momentum_sam),
    "esam": Method(
        "ESAM",
        0.05,
        "Du et al., ICLR 2022, arXiv 2110.03141",
        _esam,
        {
            "beta": Option(float, 0.6, "probability that a parameter tensor is perturbed (SWP)"),
            "gamma": Option(float, 0.5, "fraction of the batch, the sharpest, in the second pass (SDS)"),
        },
    ),
    "ksam": Method(
        "K-SAM",
        0.05,
        "Ni et al., 2022, arXiv 2210.12864",
        _ksam,
        {"k": Option(_count_or_fraction, 0.5, "the examples both passes run on: a count (8) or a fraction (0.5)")},
    ),
    "mesa": Method(
        "MESA",
        None,
        "Du et al., NeurIPS 2022, arXiv 2205.14083",
        None,
        {
            "lam": Option(float, 0.8, "weight of the trajectory term"),
            "tau": Option(float, 5.0, "temperature of the KL term"),
            "start_epoch": Option(int, 6, "first epoch (counted from 0) with the term"),
            "decay": Option(float, 0.9998, "decay of the weights' EMA per step"),
        },
        loss="mesa",
    ),
    "saf": Method(
        "SAF",
        None,
        "Du et al., NeurIPS 2022, arXiv 2205.14083",
        None,
        {
            "lam": Option(float, 0.3, "weight of the trajectory term"),
            "tau": Option(float, 5.0, "temperature of the KL term"),
            "start_epoch": Option(int, 6, "first epoch (counted from 0) with the term"),
            "delay": Option(int, 3, "how many epochs old each example's reference logits are"),
        },
        loss="saf",
    ),
}


def resolve_options(method: str, given: Optional[dict]) -> dict:
    """The method's options with the defaults filled in, each parsed to its type; a clear error names a bad one."""
    spec = METHODS[method].options
    given = dict(given or {})
    unknown = sorted(set(given) - set(spec))
    if unknown:
        valid = ", ".join(spec) if spec else "none"
        raise ValueError(f"{method} has no option {unknown[0]!r}; its options: {valid}")
    resolved = {}
    for name, option in spec.items():
        value = given.get(name, option.default)
        if isinstance(value, str) and option.type is not str:
            try:
                value = option.type(value)
            except ValueError as error:
                raise ValueError(f"{method} option {name}={value!r}: {error}") from None
        if option.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if option.choices and value not in option.choices:
            raise ValueError(f"{method} option {name} must be one of {option.choices}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{method} option {name} must be finite, got {value!r}")
        resolved[name] = value
    return resolved


def options_help() -> str:
    """Every method's options, for ``--help``."""
    lines = []
    for name, method in METHODS.items():
        for key, option in method.options.items():
            lines.append(f"  {name:9s} {key}={option.default}: {option.help}")
    return "\n".join(lines)
