"""Open a saved run (a folder written by ``train``, or its checkpoint.pt): its config and its trained model.

    run   = open_run("runs/sam")           # reads config.json and checkpoint.pt
    model = run.model(device="cpu")        # the architecture rebuilt from the config, weights loaded

Used by evaluate, sharpness and landscape, ``--init-from`` and ``--bootstrap-from``.

Which weights a measurement sees (``trained_weights``): a finished run's last epoch; an unfinished run's last
checkpointed epoch, with a warning saying so; a diverged run's none: its checkpoint holds the weights from
before the divergence, not a trained model, so it is refused.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from samkit.experiments.checkpoint import load_checkpoint
from samkit.experiments.config import TrainConfig
from samkit.experiments.errors import UsageError
from samkit.experiments.files import read_json, read_jsonl
from samkit.experiments.rundir import CHECKPOINT, METRICS, SUMMARY


@dataclass(frozen=True)
class SavedRun:
    path: Path
    config: TrainConfig
    checkpoint: dict[str, Any]

    @property
    def epochs_completed(self) -> int:
        return int(self.checkpoint["epoch"])

    @property
    def model_shape(self) -> dict[str, int]:
        """``in_channels``, ``num_classes`` and ``image_size`` the model was built for."""
        return dict(self.checkpoint["model_shape"])

    def model(self, *, device: torch.device | str = "cpu") -> nn.Module:
        from samkit.models import build_model

        model = build_model(self.config.model, **self.model_shape)
        if self.config.subspace is not None:  # a line of networks: evaluated at its midpoint
            from samkit.models.subspace import LineModel

            model = LineModel(model, build_model(self.config.model, **self.model_shape))
        model.load_state_dict(self.checkpoint["model"])
        return model.to(device).eval()


def open_run(path: str | Path) -> SavedRun:
    """Open a run folder or a checkpoint file; raise FileNotFoundError/ValueError naming what is missing."""
    path = Path(path)
    checkpoint_path = path / CHECKPOINT if path.is_dir() else path
    if not checkpoint_path.exists():
        raise FileNotFoundError(
            f"no run at {path}: expected a folder written by `samkit train --out DIR` (with {CHECKPOINT}) "
            "or the path of its checkpoint.pt"
        )
    checkpoint = load_checkpoint(checkpoint_path)
    return SavedRun(
        path=checkpoint_path.parent, config=TrainConfig.from_dict(checkpoint["config"]), checkpoint=checkpoint
    )


def _divergence(run: SavedRun) -> Optional[str]:
    """Why the run diverged (summary.json's status, else a non-finite loss in metrics.jsonl), or None."""
    summary_path, metrics_path = run.path / SUMMARY, run.path / METRICS
    if summary_path.exists():
        summary = read_json(summary_path)
        if summary.get("status") == "diverged":
            return f"{summary.get('status_reason') or 'non-finite loss'} after {summary.get('epochs_completed')} epochs"
        return None
    if metrics_path.exists():
        for row in read_jsonl(metrics_path):
            loss = row.get("train_loss")
            if isinstance(loss, float) and not math.isfinite(loss):
                return f"train loss {loss} in epoch {row.get('epoch')}"
    return None


def trained_weights(run: SavedRun, command: str) -> str:
    """Say which weights ``command`` measures ("epoch 10 of 10 (finished)"); warn when the run is unfinished.

    Raises UsageError for a diverged run: its checkpoint holds the last finite weights, not a trained model."""
    done, planned = run.epochs_completed, run.config.epochs
    diverged = _divergence(run)
    if diverged is not None:
        raise UsageError(
            f"{run.path} diverged ({diverged}): its {CHECKPOINT} holds the weights of epoch {done}, from before the "
            f"divergence, not a trained model, so `samkit {command}` would describe a run that failed; retrain it "
            "(e.g. with a smaller --lr)"
        )
    if done >= planned:
        return f"epoch {done} of {planned} (finished)"
    warnings.warn(
        f"{run.path} is unfinished: {command} uses the weights of epoch {done} of {planned} (its last checkpoint); "
        "finish it with `samkit train ... --resume` for the trained model",
        UserWarning,
        stacklevel=3,
    )
    return f"epoch {done} of {planned} (UNFINISHED run)"
