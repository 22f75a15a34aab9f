"""The end of a run: the final test evaluation, its status (ok / diverged / collapsed, experiments/run_status.py),
what the training steps cost, DIR/summary.json, and the PNGs (curves.png, hessian.png)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from samkit.experiments import run_figures, rundir
from samkit.experiments.files import write_json
from samkit.experiments.inputs import RunData
from samkit.experiments.metrics import evaluate
from samkit.experiments.run_status import classify_run
from samkit.experiments.training.state import TrainingState


def cost(state: TrainingState, optimizer) -> dict[str, Any]:
    """What the training steps cost: passes counted by the optimizer (a base optimizer: one per step) and the
    measured seconds per step (training steps alone)."""
    steps = state.step
    passes = float(getattr(optimizer, "passes", steps))
    # the first epoch pays one-off costs (allocator growth, lazy initialisation): leave it out when there are more
    timed = [row.get("train_seconds") for row in state.metrics[1:]] if len(state.metrics) > 1 else []
    per_epoch = steps // max(1, len(state.metrics))
    if timed and all(t is not None for t in timed) and per_epoch:
        seconds_per_step = sum(timed) / (per_epoch * len(timed))
    else:
        seconds_per_step = state.train_seconds / steps if steps else None
    term = state.term
    return {
        "steps": steps,
        "passes": passes,
        "passes_per_step": passes / steps if steps else None,
        "sam_steps": getattr(optimizer, "sam_steps", 0),
        "extra_forwards_per_step": (term.extra_forwards / steps if steps else None) if term else 0.0,
        "train_seconds": state.train_seconds,
        "seconds_per_step": seconds_per_step,
        "timed_epochs": len(timed) if timed else len(state.metrics),
    }


def finish(state: TrainingState, model: nn.Module, data: RunData, optimizer) -> dict[str, Any]:
    """Evaluate the final weights, classify the run, write summary.json (and the PNGs); return the summary."""
    config, dataset = state.config, data.dataset
    test = evaluate(model, dataset.x_test, dataset.y_test, num_classes=dataset.num_classes, device=state.device)
    last = state.metrics[-1] if state.metrics else {}
    status, reason = classify_run(
        train_losses=[row["train_loss"] for row in state.metrics],
        test_loss=test.loss,
        test_accuracy=test.accuracy,
        prediction_counts=test.prediction_counts,
    )
    summary = {
        "test_accuracy": test.accuracy,
        "test_error": 1.0 - test.accuracy,
        "test_loss": test.loss,
        "train_loss": last.get("train_loss", math.nan),
        "train_accuracy": last.get("train_acc", math.nan),
        "val_accuracy": last.get("val_acc"),
        "val_loss": last.get("val_loss"),
        **config.summary_fields(),  # the fields TrainConfig declares summary=True
        "epochs_completed": state.epoch,
        "label_noise": data.label_noise,  # with --bootstrap-from: the noise of the labels trained on
        "cost": cost(state, optimizer),
        "status": status,
        "status_reason": reason,
        "prediction_counts": test.prediction_counts,
        "wall_seconds": state.wall_seconds,
        **state.runtime,
        "device": str(state.device),
        "torch": torch.__version__,
    }
    if config.subspace is not None and state.context.is_main:
        from samkit.experiments.subspace import evaluate_line

        summary["subspace"] = evaluate_line(
            model, dataset.x_train, dataset.x_test, dataset.y_test, batch_size=config.batch_size, device=state.device
        )
    if state.context.is_main and state.plot:
        _plot(state)
    if state.context.is_main:
        write_json(state.out / rundir.SUMMARY, summary)
        state.say(
            f"{status}{' (' + reason + ')' if reason else ''}: test accuracy {test.accuracy:.2%}, "
            f"test loss {test.loss:.4f} after {state.epoch} epochs in {state.wall_seconds:.1f} s -> {state.out}"
        )
    return summary


def _plot(state: TrainingState) -> None:
    config = state.config
    title = f"{config.optimizer} on {config.data} ({config.model}), seed {config.seed}"
    if state.metrics:
        curves = state.out / rundir.CURVES_PLOT
        run_figures.learning_curves(state.metrics, curves, title=title, steps=state.step_log.rows)
    if any("lambda_max" in row for row in state.metrics):
        run_figures.hessian_evolution(state.metrics, state.out / rundir.HESSIAN_PLOT, title=title)
