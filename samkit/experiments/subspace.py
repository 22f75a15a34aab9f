"""``samkit train --subspace line``: train a line of networks and report accuracy along it.

    model  = LineModel(w1 = the run's usual network, w2 = a second network of the same architecture, initialised
             independently from its own seed stream)                                  (samkit.models.subspace)
    each batch: α ~ U[0, 1] from a per-epoch generator (seed, epoch, LINE_STREAM), so a resumed run draws the same
                α as an uninterrupted one; loss = L(w(α)) + β cos²(w1, w2)   (β: --subspace-beta, default 1)
    evaluation during training: the midpoint w(0.5) (metrics.jsonl, test_accuracy of summary.json)
    at the end, summary["subspace"]: test accuracy at α = 0, 0.25, 0.5, 0.75, 1, the midpoint's, the endpoints'
             ensemble (mean of the two softmax outputs), cos²(w1, w2) and ||w2 − w1||

With a SAM-family optimizer both endpoints are its parameters, θ = (w1, w2), and the objective it sharpens is the
batch's F(θ) = L((1 − α) w1 + α w2) + β cos²(w1, w2) at the drawn α. SAM's ε̂ = ρ ∇F / ||∇F|| lives in θ's space:
with ∇_{w1} L = (1 − α) g and ∇_{w2} L = α g (g the gradient at w(α)), the point w(α) moves by
(1 − α) ε̂1 + α ε̂2 = ρ sqrt((1 − α)² + α²) g / ||g|| (β = 0), i.e. SAM at w(α) with a radius between ρ / sqrt(2)
(the midpoint) and ρ (the endpoints). The cos² term is part of F, so it is in the ascent too.

BatchNorm: the running statistics are shared by the whole line and collected at the drawn α's during training; the
along-the-line report re-estimates them at each α (train-mode passes, no gradient, over the first
RECALIBRATION_EXAMPLES training examples) before measuring, since the training mixture fits no single point.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samkit.models.subspace import LineModel, line_length

SUBSPACES = ("line",)
DEFAULT_BETA = 1.0  # the paper's β for lines
LINE_STREAM = 3  # the trainer's seed streams 0-2 are data order, augmentation, mixup
REPORT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
RECALIBRATION_EXAMPLES = 2000


def line_seed(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, 1_000_003, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


def build_line(model: nn.Module, build: Callable[[], nn.Module], seed: int) -> LineModel:
    """``model`` as the first endpoint; the second from ``build()`` under its own seed (the global RNG is left as
    it was, so the first endpoint and everything after are what an ordinary run of this seed would see)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(line_seed(seed, 0))
        second = build()
    return LineModel(model, second.to(next(model.parameters()).device))


class LineTraining:
    """The trainer's per-epoch view of a line: draws each batch's α and adds β cos² to the loss."""

    def __init__(self, model: nn.Module, *, seed: int, epoch: int, beta: float):
        self.line = getattr(model, "module", model)  # under DDP the trainer hands over the wrapper
        if not isinstance(self.line, LineModel):
            raise TypeError(f"--subspace line needs a LineModel, got {type(self.line).__name__}")
        self.beta = beta
        self.generator = torch.Generator().manual_seed(line_seed(seed, 1 + epoch))

    def draw(self) -> float:
        """The next α ~ U[0, 1) of this epoch's stream."""
        return float(torch.rand((), generator=self.generator, dtype=torch.float64))

    def step_loss(self, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
        """Draw this batch's α (sets the model's point) and return the loss with the cos² term."""
        self.line.set_alpha(self.draw())
        if self.beta == 0:
            return loss_fn
        line, beta = self.line, self.beta

        def regularised(outputs: Tensor, targets: Tensor) -> Tensor:
            return loss_fn(outputs, targets) + beta * line.cos_squared()

        return regularised


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def at_alpha(line: LineModel, alpha: float, x_train: Tensor, batch_size: int, device) -> LineModel:
    """A copy of the line evaluated at ``alpha`` (eval mode), with BatchNorm statistics re-estimated there."""
    point = copy.deepcopy(line)
    point.eval_alpha = point.alpha = float(alpha)
    if _has_batch_norm(point):
        norms = [m for m in point.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the recalibration batches
        point.train()
        x = x_train[:RECALIBRATION_EXAMPLES]
        for start in range(0, x.shape[0], batch_size):
            point(x[start : start + batch_size].to(device))
    return point.eval()


@torch.no_grad()
def _probabilities(model: nn.Module, x: Tensor, device, batch_size: int = 1000) -> Tensor:
    model.eval()
    return torch.cat(
        [
            F.softmax(model(x[i : i + batch_size].to(device)).float(), dim=1).cpu()
            for i in range(0, x.shape[0], batch_size)
        ]
    )


@torch.no_grad()
def evaluate_line(
    model: nn.Module, x_train: Tensor, x_test: Tensor, y_test: Tensor, *, batch_size: int, device
) -> dict[str, Any]:
    """summary["subspace"]: test accuracy along the line, at the midpoint, and of the endpoints' ensemble."""
    line = getattr(model, "module", model)
    probabilities = {
        alpha: _probabilities(at_alpha(line, alpha, x_train, batch_size, device), x_test, device)
        for alpha in REPORT_ALPHAS
    }

    def accuracy(p: Tensor) -> float:
        return float((p.argmax(dim=1) == y_test.cpu()).double().mean())

    along = {f"{alpha:g}": accuracy(p) for alpha, p in probabilities.items()}
    return {
        "kind": "line",
        "alphas": list(REPORT_ALPHAS),
        "test_accuracy_along": along,
        "midpoint_test_accuracy": along["0.5"],
        "endpoints_mean_test_accuracy": (along["0"] + along["1"]) / 2,
        "ensemble_test_accuracy": accuracy((probabilities[0.0] + probabilities[1.0]) / 2),
        "cos_squared": float(line.cos_squared()),
        "length": line_length(line),
        "batch_norm_recalibrated": _has_batch_norm(line),
    }


def check_subspace(subspace: Optional[str], beta: Optional[float], *, init_from: Optional[str]) -> Optional[float]:
    """Validate --subspace / --subspace-beta; return the resolved β (None without a subspace)."""
    if subspace is None:
        if beta is not None:
            raise ValueError(f"subspace_beta={beta} only applies to a subspace: add --subspace line or drop it")
        return None
    if subspace not in SUBSPACES:
        raise ValueError(f"unknown subspace {subspace!r}; valid: {', '.join(SUBSPACES)}")
    beta = DEFAULT_BETA if beta is None else beta
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < float("inf"):
        raise ValueError(f"subspace_beta must be a finite number >= 0 (the paper's 1), got {beta!r}")
    if init_from is not None:
        raise ValueError(
            f"--subspace {subspace} trains both endpoints from their own initialisations; it cannot start from "
            f"--init-from {init_from}: drop one of the two"
        )
    return float(beta)
