"""checkpoint.pt of a run in progress: written after every epoch (atomically; a Ctrl-C during the write lands after
it), restored by ``--resume`` so that the run ends with the weights of an uninterrupted one.

Under FSDP2 every rank takes part in a write (the full tensors are gathered from the shards) and rank 0 writes the
file; restored, each rank keeps its own shards of the full tensors. ``write_failed`` says what a failed write left.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from samkit.experiments import fsdp as sharding
from samkit.experiments import rundir
from samkit.experiments.checkpoint import load_checkpoint, restore_rng_state, save_checkpoint
from samkit.experiments.files import interrupts_held
from samkit.experiments.inputs import RunData
from samkit.experiments.training.state import TrainingState


def write_checkpoint(state: TrainingState, model: nn.Module, optimizer, scaler, data: RunData) -> None:
    """Rank 0 writes the checkpoint; under FSDP2 every rank calls this (the full tensors are gathered)."""
    if not state.context.is_main and not state.fsdp:
        state.saved_epoch = state.epoch
        return
    model_state, optimizer_state = model.state_dict(), optimizer.state_dict()
    if state.fsdp:
        model_state, optimizer_state = sharding.full(model_state), sharding.full(optimizer_state)
    if not state.context.is_main:
        state.saved_epoch = state.epoch
        return
    with interrupts_held():  # a Ctrl-C during the write lands after it, with saved_epoch telling the truth
        save_checkpoint(
            state.out / rundir.CHECKPOINT,
            {
                "config": state.config.to_dict(),
                "model_shape": data.model_shape,
                "epoch": state.epoch,
                "step": state.step,
                "wall_seconds": state.wall_seconds,
                "train_seconds": state.train_seconds,
                "model": model_state,
                "optimizer": optimizer_state,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "trajectory": state.term.state_dict() if state.term is not None else None,
                "metrics": state.metrics,
                "step_rows": state.step_log.rows,
                "train_labels": data.train_labels,
                **state.runtime,
            },
        )
        state.saved_epoch = state.epoch


def restore_checkpoint(state: TrainingState, path: Path, model: nn.Module, optimizer, scaler, data: RunData) -> None:
    payload = load_checkpoint(path, map_location=state.device)
    rundir.check_runtime(state.out, payload, state.runtime, cpu=state.device.type == "cpu")
    if state.fsdp:  # the checkpoint holds full tensors: each rank keeps its shards
        params = [t for group in optimizer.param_groups for t in group["params"]]
        model.load_state_dict(sharding.sharded_model_state(model, payload["model"]))
        optimizer.load_state_dict(sharding.sharded_optimizer_state(payload["optimizer"], params))
    else:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
    if scaler is not None and payload["scaler"] is not None:
        scaler.load_state_dict(payload["scaler"])
    if state.term is not None:
        state.term.load_state_dict(payload["trajectory"])
    state.epoch, state.step = int(payload["epoch"]), int(payload["step"])
    state.saved_epoch = state.epoch
    state.wall_seconds = float(payload["wall_seconds"])
    state.train_seconds = float(payload.get("train_seconds", 0.0))
    state.metrics = list(payload["metrics"])
    state.step_log.restore(payload.get("step_rows", []))  # a checkpoint from before step rows: none
    data.train_labels = payload["train_labels"].cpu()
    restore_rng_state(payload["rng"])
    state.say(f"resuming {state.out} after epoch {state.epoch}/{state.config.epochs}")


def write_failed(state: TrainingState, error: OSError) -> str:
    """The message of a write that failed: which file, why, and what checkpoint.pt still holds."""
    where = error.filename or state.out
    if state.saved_epoch is None:
        what = "no checkpoint was written: fix that, then run the same command with --overwrite"
    else:
        what = (
            f"{state.out / rundir.CHECKPOINT} holds epoch {state.saved_epoch} and is whole: fix that, then run the "
            "same command with --resume"
        )
    return f"cannot write {where}: {error.strerror}; {what}"
