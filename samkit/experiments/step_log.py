"""A training run's SAM step diagnostics: every N-th step's ``last_step_stats`` in metrics.jsonl (and TensorBoard).

    samkit train --optimizer sam ... --step-stats-every 10 [--step-stats-cosine] [--tensorboard]

Every N-th training step (N = ``--step-stats-every``, default 10, 0 = off) of a SAM-family run adds one row to
metrics.jsonl, before the row of the epoch it belongs to::

    {"kind": "step", "epoch": 1, "step": 10, "optimizer_step": 10, "sam": true, "lr": 0.1, "grad_norm": 2.1,
     "eps_norm": 0.05, "loss": 1.9, "perturbed_loss": 1.95, "loss_rise": 0.05, "cosine": null}

``step`` counts the training steps (the x axis of the schedule), ``optimizer_step`` the steps the optimizer took
(the same, except that an fp16 step skipped for an overflow has no row). Epoch rows carry no ``kind``; a reader
that wants them alone keeps ``row.get("kind") != "step"`` (``epoch_rows``). The rows of an epoch are written with
it, so a run stopped mid-epoch and resumed has each row once. Reading a step's stats waits for the device once,
every N steps (the trainer already reads the loss for its progress bar every 10).

``--tensorboard`` also writes the step rows (tags ``sam/<field>``) and the epoch rows (``epoch/<field>``, at the
epoch's last step) as event files in DIR/tensorboard; a resumed run hides the events the interrupted epoch had
written (TensorBoard's ``purge_step``). It needs the ``tensorboard`` package: ``pip install 'samkit[tensorboard]'``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from samkit.optim.step_stats import MEASURES

STEP_KIND = "step"
DEFAULT_EVERY = 10
TENSORBOARD_DIR = "tensorboard"


def epoch_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-epoch rows of a metrics.jsonl (its step rows left out)."""
    return [row for row in rows if row.get("kind") != STEP_KIND]


def step_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The step-diagnostics rows of a metrics.jsonl."""
    return [row for row in rows if row.get("kind") == STEP_KIND]


def check_every(every: Any) -> int:
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"step_stats_every must be an integer >= 0 (0 = no step rows), got {every!r}")
    return every


def tensorboard_writer_class():
    """torch's SummaryWriter, or an ImportError that says how to install what it needs."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it and says less clearly when it is missing)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError(
            f"--tensorboard needs the tensorboard package ({error}): pip install 'samkit[tensorboard]', or train "
            "without --tensorboard (the step rows are in metrics.jsonl either way)"
        ) from None
    return SummaryWriter


class StepLog:
    """Collects the step rows of one run and writes them (metrics.jsonl through the trainer, TensorBoard here)."""

    def __init__(self, out: Path, *, every: int, cosine: bool, tensorboard: bool, is_main: bool) -> None:
        self.out, self.every, self.cosine = out, check_every(every), bool(cosine)
        self.tensorboard, self.is_main = bool(tensorboard), is_main
        if self.tensorboard:
            tensorboard_writer_class()  # refuse before training, not at the first row
        self.rows: list[dict[str, Any]] = []  # the rows of completed epochs (in the checkpoint)
        self.pending: list[dict[str, Any]] = []  # the rows of the epoch in progress
        self._taken: Optional[int] = None  # the optimizer's step count after the last training step
        self._writer: Any = None
        self._purge_step: Optional[int] = None

    def attach(self, optimizer, *, resumed_at: Optional[int] = None) -> None:
        """Switch the optimizer's recording to this run's choice; ``resumed_at``: the step the checkpoint holds."""
        if not hasattr(optimizer, "record_step_stats"):  # a base optimizer (sgd, adam): nothing to record
            self.every = 0
            return
        optimizer.record_step_stats(self.every > 0, cosine=self.cosine and self.every > 0)
        self._taken = optimizer.steps
        if resumed_at is not None:
            self._purge_step = resumed_at + 1

    def after_step(self, optimizer, *, step: int, epoch: int) -> None:
        """After training step ``step`` (1-based) of epoch ``epoch`` (1-based)."""
        if not self.every:
            return
        taken = optimizer.steps
        stepped, self._taken = taken != self._taken, taken  # False: an fp16 overflow skipped the step
        if step % self.every or not self.is_main or not stepped:
            return
        stats = optimizer.last_step_stats
        if stats is None:
            return
        row = {"kind": STEP_KIND, "epoch": epoch, **stats.as_dict(), "step": step, "optimizer_step": stats.step}
        self.pending.append(row)
        writer = self._tensorboard()
        if writer is not None:
            for key in MEASURES:
                if row.get(key) is not None:
                    writer.add_scalar(f"sam/{key}", row[key], step)
            writer.add_scalar("sam/sam_step", float(row["sam"]), step)

    def end_epoch(self, row: dict[str, Any], *, step: int) -> None:
        """The epoch is complete: its step rows become part of the run (and its row goes to TensorBoard)."""
        self.rows.extend(self.pending)
        self.pending = []
        writer = self._tensorboard()
        if writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    writer.add_scalar(f"epoch/{key}", value, step)
            writer.flush()

    def lines(self, epochs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl: each epoch's step rows, then its row."""
        by_epoch: dict[int, list[dict[str, Any]]] = {}
        for row in self.rows:
            by_epoch.setdefault(int(row["epoch"]), []).append(row)
        merged: list[dict[str, Any]] = []
        for row in epochs:
            merged.extend(by_epoch.pop(int(row["epoch"]), []))
            merged.append(row)
        return merged

    def restore(self, rows: list[dict[str, Any]]) -> None:
        self.rows = list(rows)
        self.pending = []

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _tensorboard(self):
        if not (self.tensorboard and self.is_main):
            return None
        if self._writer is None:
            writer_class = tensorboard_writer_class()
            self._writer = writer_class(log_dir=str(self.out / TENSORBOARD_DIR), purge_step=self._purge_step)
        return self._writer
