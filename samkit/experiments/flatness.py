"""Flatness of a run's model: λmax tracking during training, and the ``sharpness`` / ``landscape`` commands.

    --track-hessian N   every N epochs (and at the last): λ1..λ5 of the Hessian of the training loss
                        (plain cross-entropy, eval mode) on the first HESSIAN_EXAMPLES training examples,
                        by Lanczos (samkit.sharpness.hessian_eigenvalues, tol 1e-3, <= 100 HVPs)
                        -> lambda_max = λ1, lambda_ratio = λ1 / λ5, lambdas = [λ1..λ5], and the SLQ
                        spectral density (samkit.sharpness.hessian_spectrum, DENSITY_ITERATIONS nodes, one probe)
                        as density_nodes / density_weights, for the per-epoch density picture
    samkit sharpness RUN  flatness_report of the saved model   -> RUN/sharpness.json
    samkit landscape RUN  2-D loss surface around the weights  -> RUN/landscape.png

The SAM paper's figure (Foret et al. 2021, Fig. 3): WRN on CIFAR-10 at epoch 300, λmax SGD 24.2 vs SAM 1.0,
λmax/λ5 11.4 vs 2.6.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from samkit.experiments.distributed import resolve_device
from samkit.experiments.errors import checking

HESSIAN_EXAMPLES = 1000
HESSIAN_BATCH = 500
HESSIAN_K = 5
DENSITY_ITERATIONS = 60


def _batches(x: Tensor, y: Tensor, examples: int, batch: int, device: torch.device) -> list[tuple[Tensor, Tensor]]:
    x, y = x[:examples], y[:examples]
    return [(x[i : i + batch].to(device), y[i : i + batch].to(device)) for i in range(0, x.shape[0], batch)]


def hessian_summary(
    model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor, *, seed: int = 0
) -> dict[str, float]:
    """λ1..λ5 and the SLQ density on the first HESSIAN_EXAMPLES of (x, y).

    ``{"lambda_max": λ1, "lambda_ratio": λ1 / λ5, "lambdas": [λ1..λ5], "density_nodes": [...],
    "density_weights": [...]}``; the density's nodes and weights are those of ``hessian_spectrum`` (one probe of
    DENSITY_ITERATIONS Lanczos steps, seeded), so ``Spectrum(nodes, weights, ...)``'s broadening can be redrawn.
    """
    from samkit.sharpness import hessian_eigenvalues, hessian_spectrum

    device = next(model.parameters()).device
    data = _batches(x, y, HESSIAN_EXAMPLES, HESSIAN_BATCH, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a loose tol is enough for a curve; say so in the docs
        values = hessian_eigenvalues(model, loss_fn, data, k=HESSIAN_K, tol=1e-3, max_iter=100, seed=seed)
    spectrum = hessian_spectrum(model, loss_fn, data, iterations=DENSITY_ITERATIONS, runs=1, seed=seed)
    top, fifth = float(values[0]), float(values[-1])
    return {
        "lambda_max": top,
        "lambda_ratio": top / fifth if fifth > 0 else math.inf,
        "lambdas": [float(v) for v in values],
        "density_nodes": spectrum.nodes.tolist(),
        "density_weights": spectrum.weights.tolist(),
    }


def run_sharpness(
    run_path: str | Path,
    *,
    examples: int = HESSIAN_EXAMPLES,
    k: int = HESSIAN_K,
    micro_batch_size: int = 128,
    seed: int = 0,
    device: str = "cpu",
    write: bool = True,
) -> dict[str, Any]:
    """``flatness_report`` of a saved run's model on its first ``examples`` training examples.

    m-sharpness is measured on micro-batches of ``micro_batch_size`` (at most ``examples``) examples.
    ``report["weights"]`` says which weights (``runs.trained_weights``: a diverged run is refused); ``write=False``
    leaves RUN/sharpness.json to ``write_sharpness``.
    """
    from samkit.experiments.inputs import load_run_data
    from samkit.experiments.saved_runs import open_run, trained_weights
    from samkit.experiments.train_step import make_loss_fn
    from samkit.sharpness import flatness_report
    from samkit.sharpness.checks import check_int

    with checking():  # the options, a missing, foreign or diverged run, its data: bad input (exit 2)
        check_int("examples", examples, minimum=1)
        check_int("k", k, minimum=1)
        check_int("micro_batch_size", micro_batch_size, minimum=1)
        run = open_run(run_path)
        weights = trained_weights(run, "sharpness")
        resolved = resolve_device(device)  # "auto", or a clear error when CUDA is asked for and missing
        data = load_run_data(run.config, device=resolved)
        model = run.model(device=resolved)
    batches = _batches(data.dataset.x_train, data.train_labels, examples, HESSIAN_BATCH, resolved)
    size = min(micro_batch_size, examples, HESSIAN_BATCH)
    report = flatness_report(model, make_loss_fn(0.0), batches, k=k, seed=seed, micro_batch_size=size)
    report = {key: (value.tolist() if isinstance(value, Tensor) else value) for key, value in report.items()}
    examples = min(examples, data.dataset.x_train.shape[0])
    report.update({"run": str(run.path), "weights": weights, "examples": examples, "seed": seed})
    if write:
        write_sharpness(report)
    return report


def write_sharpness(report: dict[str, Any]) -> Path:
    """RUN/sharpness.json of ``run_sharpness``'s report."""
    from samkit.experiments.files import write_json

    path = Path(report["run"]) / "sharpness.json"
    write_json(path, report)
    return path


def run_landscape(
    run_path: str | Path,
    *,
    examples: int = HESSIAN_EXAMPLES,
    steps: int = 21,
    span: float = 1.0,
    seed: int = 0,
    device: str = "cpu",
) -> Path:
    """2-D loss landscape of a saved run's model (filter-normalised directions) -> RUN/landscape.png."""
    from samkit.experiments.inputs import load_run_data
    from samkit.experiments.saved_runs import open_run, trained_weights
    from samkit.experiments.train_step import make_loss_fn
    from samkit.sharpness import loss_landscape
    from samkit.sharpness.checks import check_int, check_positive_float

    with checking():  # the options, a missing, foreign or diverged run, its data: bad input (exit 2)
        check_int("examples", examples, minimum=1)
        check_int("steps", steps, minimum=3)
        check_positive_float("span", span)
        run = open_run(run_path)
        trained_weights(run, "landscape")
        resolved = resolve_device(device)  # "auto", or a clear error when CUDA is asked for and missing
        data = load_run_data(run.config, device=resolved)
        model = run.model(device=resolved)
    batches = _batches(data.dataset.x_train, data.train_labels, examples, HESSIAN_BATCH, resolved)
    landscape = loss_landscape(model, make_loss_fn(0.0), batches, dims=2, steps=steps, span=span, seed=seed)
    path = run.path / "landscape.png"
    landscape.plot(path)
    return path
