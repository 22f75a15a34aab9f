"""Open a saved run (a folder written by ``train``, or its checkpoint.pt): its config and its trained model.

    run   = open_run("runs/sam")           # reads config.json and checkpoint.pt
    model = run.model(device="cpu")        # the architecture rebuilt from the config, weights loaded

Used by evaluate, sharpness and landscape, ``--init-from`` and ``--bootstrap-from``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from samkit.experiments.checkpoint import load_checkpoint
from samkit.experiments.config import TrainConfig
from samkit.experiments.rundir import CHECKPOINT


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
