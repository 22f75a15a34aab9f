"""``TrainingState``: what one ``train`` call knows and has done so far, shared by the parts of the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from samkit.experiments import distributed, rundir
from samkit.experiments.config import TrainConfig
from samkit.experiments.step_log import StepLog


@dataclass
class TrainingState:
    config: TrainConfig
    out: Path
    context: distributed.Context
    quiet: bool
    plot: bool
    fsdp: bool  # the model sharded by FSDP2 (evaluation and checkpoints see full tensors)
    step_log: StepLog
    # what changes the numbers besides the config (rundir.check_runtime): recorded, and checked on resume
    runtime: dict[str, Any]
    evaluated: Optional[nn.Module] = None  # under FSDP2: a plain copy that evaluation runs on
    metrics: list[dict[str, Any]] = field(default_factory=list)
    epoch: int = 0
    step: int = 0
    wall_seconds: float = 0.0
    train_seconds: float = 0.0  # the training steps alone (no evaluation): the cost a method is compared by
    term: Any = None  # MESA's or SAF's trajectory term (experiments/trajectory.py), for those methods
    lr: Optional[float] = None  # the learning rate of the last step taken
    saved_epoch: Optional[int] = None  # the epoch checkpoint.pt holds (None: none written by this run)
    lock: Optional[rundir.RunLock] = None

    @classmethod
    def start(
        cls, config: TrainConfig, out: Path, context: distributed.Context, *, quiet: bool, plot: bool, fsdp: bool
    ) -> TrainingState:
        return cls(
            config=config,
            out=out,
            context=context,
            quiet=quiet,
            plot=plot,
            fsdp=fsdp,
            step_log=StepLog(out, every=0, cosine=False, tensorboard=False, is_main=context.is_main),
            runtime=rundir.runtime_record(world_size=context.world_size, threads=torch.get_num_threads(), fsdp=fsdp),
            lr=config.lr,
        )

    @property
    def device(self) -> torch.device:
        return self.context.device

    def say(self, message: str) -> None:
        """A line for the user, from rank 0 alone, unless --quiet."""
        if self.context.is_main and not self.quiet:
            tqdm.write(message)
