"""``train``: one run from a ``TrainConfig`` to a folder of results, resumable to the bit.

    check config and DIR (rundir)          -> refuse before any work (UsageError)
    data, labels = load_run_data(config)   (label noise / bootstrap; the flips -> DIR/label_noise.json)
    torch.manual_seed(seed); model = build_model(...) (+ --init-from weights); optimizer = build_optimizer
    (every check has passed) lock DIR; remove stale temporary files; --overwrite deletes the old run
    resume: load model, optimizer, scaler, RNG states, metrics from DIR/checkpoint.pt
    for epoch in remaining epochs:
        order = randperm(n_train, generator(seed, epoch))           # the same on every rank and on resume
        for each full batch B of order (drop_last):
            x = augment(x_B, generator(seed, epoch)); mixup; this rank's slice
            lr = schedule(step); loss = train_step(...)            # sam_step for the SAM family; Diverged ends
        evaluate (eval mode): train sample, val, test; lambda_max every --track-hessian epochs
        append to metrics.jsonl (with the epoch's SAM step rows, samkit.experiments.step_log); write checkpoint.pt
    summary.json (with ok / diverged / collapsed), curves.png, hessian.png

This file holds ``train`` and the loop; the parts it calls live in samkit/experiments/training/, one concern a file
(the run folder, model and optimizer set-up, checkpoints, an epoch's batches and evaluation, the summary).

Evaluation is in float32 even under --amp (the weights are float32; autocast is a training-speed device), so
the last line of metrics.jsonl, summary.json and ``samkit evaluate`` report the same test loss and accuracy.
Train accuracy is measured at the end of each epoch, in eval mode, on the first TRAIN_EVAL_EXAMPLES
training examples against the labels trained on (noisy ones under --label-noise); train loss is the mean
of the training objective over the epoch's steps (with smoothing/mixup), as sam_step returns it.

Under torchrun the model is replicated (DDP), or with ``fsdp=True`` (``--fsdp``) sharded by FSDP2; then every rank
gathers the full weights for evaluation and checkpoints, which hold full tensors either way (docs/fsdp.md).

Ctrl-C stops at once and leaves checkpoint.pt at the last completed epoch (it is only ever replaced
atomically, and Ctrl-C during its write waits for the write to end); ``--resume`` continues from there and ends
with the weights of an uninterrupted run, under the world size and thread count the run was started with.
A write that fails (disk full, read-only folder) raises ``OutputError`` naming the file and the epoch that
checkpoint.pt holds.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from samkit.experiments import distributed, rundir
from samkit.experiments import fsdp as sharding
from samkit.experiments.config import TrainConfig
from samkit.experiments.errors import WRITE_ERRNOS, OutputError, checking
from samkit.experiments.files import read_json, write_json, write_jsonl
from samkit.experiments.inputs import RunData, label_noise_record
from samkit.experiments.schedule import set_learning_rate
from samkit.experiments.step_log import DEFAULT_EVERY, StepLog, check_every, tensorboard_writer_class
from samkit.experiments.train_step import Diverged, make_loss_fn, train_step
from samkit.experiments.training import checkpointing, folder, summary
from samkit.experiments.training.epoch import EpochBatches, epoch_line, evaluate_epoch, set_mode
from samkit.experiments.training.model_init import Prepared, check_names, prepare
from samkit.experiments.training.state import TrainingState


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; ``checkpoint_epoch`` is the epoch that checkpoint.pt holds."""

    def __init__(self, out: Path, checkpoint_epoch: Optional[int]):
        if checkpoint_epoch is None:
            message = f"interrupted before {out / rundir.CHECKPOINT} was written: run the same command with --overwrite"
        else:
            message = (
                f"interrupted; {out / rundir.CHECKPOINT} holds epoch {checkpoint_epoch}: "
                "run the same command with --resume to continue"
            )
        super().__init__(message)
        self.checkpoint_epoch = checkpoint_epoch


def train(
    config: TrainConfig,
    out: str | Path,
    *,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    plot: bool = True,
    fsdp: bool = False,
    step_stats_every: int = DEFAULT_EVERY,
    step_stats_cosine: bool = False,
    tensorboard: bool = False,
) -> dict[str, Any]:
    """Train as ``config`` says, writing DIR = ``out`` (see the module doc); return the summary dict.

    ``plot=False`` skips the PNGs (``compare`` draws its own, and matplotlib costs ~1 s a figure).
    ``fsdp=True`` (under torchrun) shards the model with FSDP2 instead of replicating it with DDP: the SAM family's
    ε̂ is then the global batch's (samkit.experiments.fsdp, docs/fsdp.md).
    ``step_stats_every=N`` writes a SAM-family optimizer's ``last_step_stats`` every N steps to metrics.jsonl
    (0: never), with the gradient cosine if ``step_stats_cosine``; ``tensorboard`` also writes them, and the epoch
    rows, to DIR/tensorboard (``samkit.experiments.step_log``). None of them changes the numbers of the run.

    Raises UsageError (a ValueError: bad option, data, or DIR refused) before anything in DIR is changed,
    ``TrainingInterrupted`` on Ctrl-C, ``OutputError`` when a file cannot be written.
    Under ``torchrun`` every rank calls this; rank 0 writes the files and every rank returns the summary.
    """
    with checking():
        config = config.resolved()
        check_names(config)
        check_every(step_stats_every)
        if tensorboard:
            tensorboard_writer_class()  # missing: refused before any work
        context = distributed.setup(device)
    state = TrainingState.start(config, Path(out), context, quiet=quiet, plot=plot, fsdp=fsdp)
    state.step_log = StepLog(
        state.out, every=step_stats_every, cosine=step_stats_cosine, tensorboard=tensorboard, is_main=context.is_main
    )
    try:
        if fsdp:
            with checking():
                sharding.check_fsdp(config, context.world_size)
        return _run(state, resume=resume, overwrite=overwrite)
    finally:
        state.step_log.close()
        folder.release(state)
        distributed.teardown(context)


def _run(state: TrainingState, *, resume: bool, overwrite: bool) -> dict[str, Any]:
    started = time.perf_counter()
    action = folder.on_main(state, lambda: folder.inspect(state, resume=resume, overwrite=overwrite).action)
    if action == rundir.FINISHED:
        # read back, with or without its checkpoint (committed results keep config, metrics and summary only);
        # its config is this one, and its results are never rewritten
        state.say(f"{state.out} is already finished")
        return read_json(state.out / rundir.SUMMARY)
    with checking():  # every check before anything in DIR changes (--overwrite deletes only after them)
        prepared = prepare(state)
    plan = rundir.Plan(action, state.out / rundir.CHECKPOINT if action == rundir.RESUME else None)
    folder.claim(state, plan, resume=resume, overwrite=overwrite)
    try:
        return _train(state, plan, prepared, started)
    except KeyboardInterrupt as interrupt:
        raise TrainingInterrupted(state.out, state.saved_epoch) from interrupt
    except OSError as error:
        if error.errno not in WRITE_ERRNOS:
            raise
        raise OutputError(checkpointing.write_failed(state, error)) from error


def _train(state: TrainingState, plan: rundir.Plan, prepared: Prepared, started: float) -> dict[str, Any]:
    """The loop over the epochs (from the checkpoint's, when resuming), then the summary."""
    config, context = state.config, state.context
    model, optimizer, scaler, data = prepared.model, prepared.optimizer, prepared.scaler, prepared.data
    if state.device.type == "cuda":
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    if plan.action == rundir.RESUME:
        checkpointing.restore_checkpoint(state, state.out / rundir.CHECKPOINT, model, optimizer, scaler, data)
        state.step_log.attach(optimizer, resumed_at=state.step)
    else:
        state.step_log.attach(optimizer)
        if context.is_main:
            write_json(state.out / rundir.CONFIG, {**config.to_dict(), **state.runtime})
            record = label_noise_record(data, data_seed=config.data_seed)
            if record is not None:
                write_json(state.out / rundir.LABEL_NOISE, record)
        checkpointing.write_checkpoint(state, model, optimizer, scaler, data)  # Ctrl-C in epoch 1: still valid
        if context.is_main:
            write_jsonl(state.out / rundir.METRICS, [])
    wrapped = model
    if context.distributed and not state.fsdp:
        device_ids = [state.device.index] if state.device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    diverged = False
    state.wall_seconds += time.perf_counter() - started
    while state.epoch < config.epochs and not diverged:
        epoch_started = time.perf_counter()
        trained_before = state.train_seconds
        set_mode(optimizer, training=True)  # Momentum-SAM: back to its ascent point (others: nothing)
        train_loss = _train_epoch(state, wrapped, optimizer, scaler, data)
        set_mode(optimizer, training=False)  # evaluation and the checkpoint see the weights w
        diverged = not math.isfinite(train_loss)
        row = evaluate_epoch(state, _unsharded(state, model), data, train_loss)
        state.epoch += 1
        state.wall_seconds += time.perf_counter() - epoch_started
        row["seconds"] = time.perf_counter() - epoch_started
        row["train_seconds"] = state.train_seconds - trained_before
        state.metrics.append(row)
        state.step_log.end_epoch(row, step=state.step)
        if context.is_main:
            write_jsonl(state.out / rundir.METRICS, state.step_log.lines(state.metrics))
        if not diverged:  # the same on every rank (the epoch's loss is averaged over them)
            checkpointing.write_checkpoint(state, model, optimizer, scaler, data)
        state.say(epoch_line(row, config.epochs))
    return summary.finish(state, _unsharded(state, model), data, optimizer)


def _unsharded(state: TrainingState, model: nn.Module) -> nn.Module:
    """The model evaluation runs on: itself, or under FSDP2 the plain copy with the gathered weights (every rank
    calls this)."""
    if state.evaluated is None:
        return model
    state.evaluated.load_state_dict(sharding.full(model.state_dict()))
    return state.evaluated


def _train_epoch(state: TrainingState, model: nn.Module, optimizer, scaler, data: RunData) -> float:
    """One epoch of training steps; the mean training loss over them (NaN: the run diverged, by train_step's rule)."""
    config = state.config
    batches = EpochBatches(state, data)
    total_steps = batches.steps * config.epochs
    loss_fn = make_loss_fn(config.label_smoothing, per_example=getattr(optimizer, "selects_examples", False))
    model.train()
    total = torch.zeros((), dtype=torch.float64, device=state.device)  # summed on the device: no sync a step
    bar = tqdm(
        range(batches.steps),
        desc=f"epoch {state.epoch + 1}/{config.epochs}",
        disable=state.quiet or not state.context.is_main or None,
        leave=False,
        dynamic_ncols=True,
    )
    line = None
    if config.subspace is not None:
        from samkit.experiments.subspace import LineTraining

        line = LineTraining(model, seed=config.seed, epoch=state.epoch, beta=config.subspace_beta)
    started = time.perf_counter()
    for batch in bar:
        x, targets, indices = batches.batch(batch)
        step_loss = loss_fn if state.term is None else state.term.loss_fn(x, indices, state.epoch)
        if line is not None:
            step_loss = line.step_loss(step_loss)  # draws this batch's point of the line
        state.lr = set_learning_rate(optimizer, state.step, total_steps, config.schedule)
        try:
            loss = train_step(config, optimizer, model, step_loss, x, targets, scaler=scaler)
        except Diverged as error:  # the one rule for every method (experiments/train_step.py)
            state.say(f"diverged at step {state.step}: {error}")
            return math.nan
        if state.term is not None:
            state.term.after_step()
        state.step += 1
        state.step_log.after_step(optimizer, step=state.step, epoch=state.epoch + 1)
        total += loss.detach().double()
        if batch % 10 == 0:
            bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
    bar.close()
    mean_loss = float(total) / max(1, batches.steps)  # float() waits for the device: the steps are done
    state.train_seconds += time.perf_counter() - started
    return state.context.mean(mean_loss)
