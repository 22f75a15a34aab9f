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
            lr = schedule(step); loss = train_step(...)            # sam_step for sam/asam/msam
        evaluate (eval mode): train sample, val, test; lambda_max every --track-hessian epochs
        append to metrics.jsonl (with the epoch's SAM step rows, samkit.experiments.step_log); write checkpoint.pt
    summary.json (with ok / diverged / collapsed), curves.png, hessian.png

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

import errno
import math
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from samkit.experiments import distributed, plots, rundir
from samkit.experiments import fsdp as sharding
from samkit.experiments.checkpoint import load_checkpoint, restore_rng_state, save_checkpoint
from samkit.experiments.config import TrainConfig
from samkit.experiments.errors import OutputError, checking
from samkit.experiments.files import interrupts_held, read_json, write_json, write_jsonl
from samkit.experiments.inputs import RunData, label_noise_record, load_run_data
from samkit.experiments.metrics import evaluate
from samkit.experiments.optimizers import build_optimizer
from samkit.experiments.schedule import set_learning_rate
from samkit.experiments.status import classify_run
from samkit.experiments.step_log import DEFAULT_EVERY, StepLog, check_every, tensorboard_writer_class
from samkit.experiments.steps import make_loss_fn, make_scaler, train_step

TRAIN_EVAL_EXAMPLES = 2000
# errors of a write that the user can fix (space, permissions, a read-only or failing disk): reported, not traced
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}
ORDER_STREAM, AUGMENT_STREAM, MIXUP_STREAM = 0, 1, 2


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


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A well-mixed 63-bit seed for (run seed, epoch, stream): data order, augmentation, mixup."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


def mixup(x: Tensor, y: Tensor, alpha: float, num_classes: int, rng: np.random.Generator, generator: torch.Generator):
    """Mixup (Zhang et al. 2018): x = lam x + (1 - lam) x[perm], soft targets mixed the same way."""
    lam = float(rng.beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=generator)
    one_hot = F.one_hot(y, num_classes).float()
    return lam * x + (1 - lam) * x[perm], lam * one_hot + (1 - lam) * one_hot[perm]


def check_names(config: TrainConfig) -> None:
    """Unknown dataset, model or augmentation names, listing the valid ones, before any work."""
    from samkit.data import AUGMENTATIONS, check_dataset_name
    from samkit.models import MODELS, build_model

    check_dataset_name(config.data)  # a known name or npz:PATH
    if config.model not in MODELS:
        try:  # the registry also parses sized names beyond its list, e.g. wrn-10-1 or resnet8
            build_model(config.model, in_channels=1, num_classes=2, image_size=8)
        except ValueError as error:
            # a sized name of a known family (wrn-15-2) says what is wrong with its size
            why = "" if str(error).startswith("unknown model") else f" ({error})"
            raise ValueError(
                f"unknown model {config.model!r}{why}; valid: {', '.join(MODELS)} (and wrn-D-W[-nobn], resnetD)"
            ) from None
    if config.augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augment {config.augment!r}; valid: {', '.join(AUGMENTATIONS)}")


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
    training = _Training(config, Path(out), context, quiet=quiet, plot=plot, fsdp=fsdp)
    training.step_log = StepLog(
        training.out, every=step_stats_every, cosine=step_stats_cosine, tensorboard=tensorboard, is_main=context.is_main
    )
    try:
        if fsdp:
            with checking():
                sharding.check_fsdp(config, context.world_size)
        return training.run(resume=resume, overwrite=overwrite)
    finally:
        training.step_log.close()
        training.release()
        distributed.teardown(context)


class _Training:
    def __init__(
        self, config: TrainConfig, out: Path, context: distributed.Context, *, quiet: bool, plot: bool, fsdp: bool
    ):
        self.config, self.out, self.context, self.quiet, self.plot = config, out, context, quiet, plot
        self.fsdp = fsdp  # the model sharded by FSDP2 (evaluation and checkpoints see full tensors)
        self.evaluated: Optional[nn.Module] = None  # under FSDP2: a plain copy that evaluation runs on
        self.device = context.device
        self.metrics: list[dict[str, Any]] = []
        self.epoch = 0
        self.step = 0
        self.wall_seconds = 0.0
        self.train_seconds = 0.0  # the training steps alone (no evaluation): the cost a method is compared by
        self.term = None  # MESA's or SAF's trajectory term (experiments/trajectory.py), for those methods
        self.lr = config.lr  # the learning rate of the last step taken
        self.saved_epoch: Optional[int] = None  # the epoch checkpoint.pt holds (None: none written by this run)
        self.lock: Optional[rundir.RunLock] = None
        # what changes the numbers besides the config (rundir.check_runtime): recorded, and checked on resume
        self.runtime = rundir.runtime_record(
            world_size=context.world_size, threads=torch.get_num_threads(), fsdp=fsdp
        )
        self.step_log = StepLog(out, every=0, cosine=False, tensorboard=False, is_main=context.is_main)

    # ---------------------------------------------------------------------------------------------------- setup

    def _say(self, message: str) -> None:
        if self.context.is_main and not self.quiet:
            tqdm.write(message)

    def _inspect(self, *, resume: bool, overwrite: bool) -> rundir.Plan:
        return rundir.inspect_run_dir(
            self.out,
            self.config.to_dict(),
            self.runtime,
            resume=resume,
            overwrite=overwrite,
            cpu=self.device.type == "cpu",
        )

    def _on_main(self, action) -> str:
        """``action()`` (returning a string) on rank 0; its RunDirError stops every rank with rank 0's message.
        Returns rank 0's string on every rank."""
        error, result = "", ""
        if self.context.is_main:
            try:
                result = action()
            except rundir.RunDirError as refused:
                error = str(refused)
        error = self.context.broadcast_error(error)  # broadcasts any string from rank 0
        if error:
            raise rundir.RunDirError(error)
        return self.context.broadcast_error(result)

    def _claim(self, plan: rundir.Plan, *, resume: bool, overwrite: bool) -> None:
        """Every check has passed: lock DIR, check it is as inspected, remove stale temporary files, and with
        --overwrite the old run."""

        def claim() -> str:
            self.lock = rundir.RunLock.acquire(self.out)
            again = self._inspect(resume=resume, overwrite=overwrite)
            if again.action != plan.action:
                raise rundir.RunDirError(
                    f"{self.out} changed while this command started (another command wrote it): run it again"
                )
            removed = rundir.apply_plan(self.out, plan)
            return ", ".join(removed)

        removed = self._on_main(claim)
        if removed:
            self._say(f"removed from {self.out}: {removed}")
        self.context.barrier()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _check_batches(self, n_train: int) -> None:
        config, world = self.config, self.context.world_size
        if config.batch_size > n_train:
            raise ValueError(
                f"batch_size={config.batch_size} is larger than the {n_train} training examples: lower --batch-size"
            )
        if config.batch_size % (world * config.micro_batches):
            raise ValueError(
                f"batch_size={config.batch_size} must split evenly over {world} process(es) x "
                f"{config.micro_batches} micro-batch(es): pick a multiple of {world * config.micro_batches}"
            )

    def _build_model(self, data: RunData) -> nn.Module:
        from samkit.models import build_model

        torch.manual_seed(self.config.seed)
        model = build_model(self.config.model, **data.model_shape)
        if self.config.init_from is not None:
            from samkit.experiments.runs import open_run
            from samkit.experiments.transfer import load_matching_weights

            source = open_run(self.config.init_from)
            if source.config.model != self.config.model:
                raise ValueError(
                    f"--init-from {self.config.init_from} holds a {source.config.model!r} model, not "
                    f"{self.config.model!r}: use --model {source.config.model}"
                )
            _, fresh = load_matching_weights(model, source.checkpoint["model"])
            self._say(f"init from {source.path}: kept fresh {fresh if fresh else 'nothing'}")
        if self.config.subspace is not None:  # a line of networks: this model is its first endpoint
            from samkit.experiments.subspace import build_line

            model = build_line(model, lambda: build_model(self.config.model, **data.model_shape), self.config.seed)
        return model.to(self.device)

    # ---------------------------------------------------------------------------------------------------- state

    def _checkpoint(self, model: nn.Module, optimizer, scaler, data: RunData) -> None:
        """Rank 0 writes the checkpoint; under FSDP2 every rank calls this (the full tensors are gathered)."""
        if not self.context.is_main and not self.fsdp:
            self.saved_epoch = self.epoch
            return
        model_state, optimizer_state = model.state_dict(), optimizer.state_dict()
        if self.fsdp:
            model_state, optimizer_state = sharding.full(model_state), sharding.full(optimizer_state)
        if not self.context.is_main:
            self.saved_epoch = self.epoch
            return
        with interrupts_held():  # a Ctrl-C during the write lands after it, with saved_epoch telling the truth
            save_checkpoint(
                self.out / rundir.CHECKPOINT,
                {
                    "config": self.config.to_dict(),
                    "model_shape": data.model_shape,
                    "epoch": self.epoch,
                    "step": self.step,
                    "wall_seconds": self.wall_seconds,
                    "train_seconds": self.train_seconds,
                    "model": model_state,
                    "optimizer": optimizer_state,
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "trajectory": self.term.state_dict() if self.term is not None else None,
                    "metrics": self.metrics,
                    "step_rows": self.step_log.rows,
                    "train_labels": data.train_labels,
                    **self.runtime,
                },
            )
            self.saved_epoch = self.epoch

    def _restore(self, path: Path, model: nn.Module, optimizer, scaler, data: RunData) -> None:
        payload = load_checkpoint(path, map_location=self.device)
        rundir.check_runtime(self.out, payload, self.runtime, cpu=self.device.type == "cpu")
        if self.fsdp:  # the checkpoint holds full tensors: each rank keeps its shards
            params = [t for group in optimizer.param_groups for t in group["params"]]
            model.load_state_dict(sharding.sharded_model_state(model, payload["model"]))
            optimizer.load_state_dict(sharding.sharded_optimizer_state(payload["optimizer"], params))
        else:
            model.load_state_dict(payload["model"])
            optimizer.load_state_dict(payload["optimizer"])
        if scaler is not None and payload["scaler"] is not None:
            scaler.load_state_dict(payload["scaler"])
        if self.term is not None:
            self.term.load_state_dict(payload["trajectory"])
        self.epoch, self.step = int(payload["epoch"]), int(payload["step"])
        self.saved_epoch = self.epoch
        self.wall_seconds = float(payload["wall_seconds"])
        self.train_seconds = float(payload.get("train_seconds", 0.0))
        self.metrics = list(payload["metrics"])
        self.step_log.restore(payload.get("step_rows", []))  # a checkpoint from before step rows: none
        data.train_labels = payload["train_labels"].cpu()
        restore_rng_state(payload["rng"])
        self._say(f"resuming {self.out} after epoch {self.epoch}/{self.config.epochs}")

    # ---------------------------------------------------------------------------------------------------- run

    def run(self, *, resume: bool, overwrite: bool) -> dict[str, Any]:
        started = time.perf_counter()
        config = self.config
        action = self._on_main(lambda: self._inspect(resume=resume, overwrite=overwrite).action)
        if action == rundir.FINISHED:
            # read back, with or without its checkpoint (committed results keep config, metrics and summary only);
            # its config is this one, and its results are never rewritten
            self._say(f"{self.out} is already finished")
            return read_json(self.out / rundir.SUMMARY)
        with checking():  # every check before anything in DIR changes (--overwrite deletes only after them)
            data = load_run_data(config, device=self.device)
            self._check_batches(data.train_labels.shape[0])
            model = self._build_model(data)
            if config.trajectory_loss is not None:
                from samkit.experiments.trajectory import build_term

                self.term = build_term(
                    config.trajectory_loss,
                    dict(config.options or {}),
                    model=model,
                    base_loss=make_loss_fn(config.label_smoothing),
                    num_examples=data.train_labels.shape[0],
                    num_classes=data.dataset.num_classes,
                    distributed=self.context.distributed,
                )
            total_steps = (data.train_labels.shape[0] // config.batch_size) * config.epochs
            if self.fsdp:  # before the optimizer: it must hold the sharded (DTensor) parameters
                self.evaluated = sharding.plain_copy(model)
                sharding.shard(model)
            optimizer = build_optimizer(model, config, total_steps=total_steps)
            scaler = make_scaler(config, self.device)
        plan = rundir.Plan(action, self.out / rundir.CHECKPOINT if action == rundir.RESUME else None)
        self._claim(plan, resume=resume, overwrite=overwrite)
        try:
            return self._train(plan, model, optimizer, scaler, data, started)
        except KeyboardInterrupt as interrupt:
            raise TrainingInterrupted(self.out, self.saved_epoch) from interrupt
        except OSError as error:
            if error.errno not in WRITE_ERRNOS:
                raise
            raise OutputError(self._write_failed(error)) from error

    def _write_failed(self, error: OSError) -> str:
        where = error.filename or self.out
        if self.saved_epoch is None:
            state = "no checkpoint was written: fix that, then run the same command with --overwrite"
        else:
            state = (
                f"{self.out / rundir.CHECKPOINT} holds epoch {self.saved_epoch} and is whole: fix that, then run the "
                "same command with --resume"
            )
        return f"cannot write {where}: {error.strerror}; {state}"

    def _train(self, plan: rundir.Plan, model: nn.Module, optimizer, scaler, data: RunData, started: float):
        config = self.config
        if self.device.type == "cuda":
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        if plan.action == rundir.RESUME:
            self._restore(self.out / rundir.CHECKPOINT, model, optimizer, scaler, data)
            self.step_log.attach(optimizer, resumed_at=self.step)
        else:
            self.step_log.attach(optimizer)
            if self.context.is_main:
                write_json(self.out / rundir.CONFIG, {**config.to_dict(), **self.runtime})
                record = label_noise_record(data, data_seed=config.data_seed)
                if record is not None:
                    write_json(self.out / rundir.LABEL_NOISE, record)
            self._checkpoint(model, optimizer, scaler, data)  # Ctrl-C in epoch 1 still leaves a valid checkpoint
            if self.context.is_main:
                write_jsonl(self.out / rundir.METRICS, [])
        wrapped = model
        if self.context.distributed and not self.fsdp:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

        diverged = False
        self.wall_seconds += time.perf_counter() - started
        while self.epoch < config.epochs and not diverged:
            epoch_started = time.perf_counter()
            trained_before = self.train_seconds
            _set_mode(optimizer, training=True)  # Momentum-SAM: back to its ascent point (others: nothing)
            train_loss = self._train_epoch(wrapped, optimizer, scaler, data)
            _set_mode(optimizer, training=False)  # evaluation and the checkpoint see the weights w
            diverged = not math.isfinite(train_loss)
            row = self._evaluate_epoch(self._unsharded(model), data, train_loss)
            self.epoch += 1
            self.wall_seconds += time.perf_counter() - epoch_started
            row["seconds"] = time.perf_counter() - epoch_started
            row["train_seconds"] = self.train_seconds - trained_before
            self.metrics.append(row)
            self.step_log.end_epoch(row, step=self.step)
            if self.context.is_main:
                write_jsonl(self.out / rundir.METRICS, self.step_log.lines(self.metrics))
            if not diverged:  # the same on every rank (the epoch's loss is averaged over them)
                self._checkpoint(model, optimizer, scaler, data)
            self._say(_epoch_line(row, config.epochs))
        return self._finish(self._unsharded(model), data, optimizer)

    def _unsharded(self, model: nn.Module) -> nn.Module:
        """The model evaluation runs on: itself, or under FSDP2 the plain copy with the gathered weights (every
        rank calls this)."""
        if self.evaluated is None:
            return model
        self.evaluated.load_state_dict(sharding.full(model.state_dict()))
        return self.evaluated

    def _train_epoch(self, model: nn.Module, optimizer, scaler, data: RunData) -> float:
        config, context = self.config, self.context
        dataset = data.dataset
        n_train = data.train_labels.shape[0]
        steps_per_epoch = n_train // config.batch_size
        total_steps = steps_per_epoch * config.epochs
        order = torch.randperm(
            n_train, generator=torch.Generator().manual_seed(epoch_seed(config.seed, self.epoch, ORDER_STREAM))
        )
        augment_generator = torch.Generator().manual_seed(epoch_seed(config.seed, self.epoch, AUGMENT_STREAM))
        mixup_rng = np.random.default_rng(epoch_seed(config.seed, self.epoch, MIXUP_STREAM))
        loss_fn = make_loss_fn(config.label_smoothing, per_example=getattr(optimizer, "selects_examples", False))
        model.train()
        total = torch.zeros((), dtype=torch.float64, device=self.device)  # summed on the device: no sync a step
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {self.epoch + 1}/{config.epochs}",
            disable=self.quiet or not context.is_main or None,
            leave=False,
            dynamic_ncols=True,
        )
        line = None
        if config.subspace is not None:
            from samkit.experiments.subspace import LineTraining

            line = LineTraining(model, seed=config.seed, epoch=self.epoch, beta=config.subspace_beta)
        started = time.perf_counter()
        for batch in bar:
            indices = order[batch * config.batch_size : (batch + 1) * config.batch_size]
            x, y = dataset.x_train[indices], data.train_labels[indices]
            if config.augment != "none":
                from samkit.data import augment

                x = augment(x, config.augment, generator=augment_generator, mean=dataset.mean, std=dataset.std)
            targets: Tensor = y
            if config.mixup > 0:
                x, targets = mixup(x, y, config.mixup, dataset.num_classes, mixup_rng, augment_generator)
            x, targets = context.shard(x).to(self.device), context.shard(targets).to(self.device)
            step_loss = loss_fn
            if self.term is not None:
                step_loss = self.term.loss_fn(x, context.shard(indices).to(self.device), self.epoch)
            if line is not None:
                step_loss = line.step_loss(step_loss)  # draws this batch's point of the line
            self.lr = set_learning_rate(optimizer, self.step, total_steps, config.schedule)
            try:
                loss = train_step(config, optimizer, model, step_loss, x, targets, scaler=scaler)
            except FloatingPointError as error:
                self._say(f"diverged at step {self.step}: {error}")
                return math.nan
            if self.term is not None:
                self.term.after_step()
            self.step += 1
            self.step_log.after_step(optimizer, step=self.step, epoch=self.epoch + 1)
            total += loss.detach().double()
            if batch % 10 == 0:
                bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
        bar.close()
        mean_loss = float(total) / max(1, steps_per_epoch)  # float() waits for the device: the steps are done
        self.train_seconds += time.perf_counter() - started
        return context.mean(mean_loss)

    def _evaluate_epoch(self, model: nn.Module, data: RunData, train_loss: float) -> dict[str, Any]:
        dataset = data.dataset
        row: dict[str, Any] = {
            "epoch": self.epoch + 1,
            "train_loss": train_loss,
            "lr": self.lr,
        }
        if not self.context.is_main:
            return row
        common = {"num_classes": dataset.num_classes, "device": self.device}
        sample = slice(0, TRAIN_EVAL_EXAMPLES)
        row["train_acc"] = evaluate(model, dataset.x_train[sample], data.train_labels[sample], **common).accuracy
        if dataset.x_val is not None:
            val = evaluate(model, dataset.x_val, data.val_labels, **common)
            row["val_loss"], row["val_acc"] = val.loss, val.accuracy
        test = evaluate(model, dataset.x_test, dataset.y_test, **common)
        row["test_loss"], row["test_acc"] = test.loss, test.accuracy
        every = self.config.track_hessian
        if every and ((self.epoch + 1) % every == 0 or self.epoch + 1 == self.config.epochs):
            from samkit.experiments.flatness import hessian_summary

            row.update(
                hessian_summary(model, make_loss_fn(0.0), dataset.x_train, data.train_labels, seed=self.config.seed)
            )
        return row

    def _cost(self, optimizer) -> dict[str, Any]:
        """What the training steps cost: passes counted by the optimizer (a base optimizer: one per step) and the
        measured seconds per step (training steps alone)."""
        steps = self.step
        passes = float(getattr(optimizer, "passes", steps))
        # the first epoch pays one-off costs (allocator growth, lazy initialisation): leave it out when there are more
        timed = [row.get("train_seconds") for row in self.metrics[1:]] if len(self.metrics) > 1 else []
        per_epoch = steps // max(1, len(self.metrics))
        if timed and all(t is not None for t in timed) and per_epoch:
            seconds_per_step = sum(timed) / (per_epoch * len(timed))
        else:
            seconds_per_step = self.train_seconds / steps if steps else None
        return {
            "steps": steps,
            "passes": passes,
            "passes_per_step": passes / steps if steps else None,
            "sam_steps": getattr(optimizer, "sam_steps", 0),
            "extra_forwards_per_step": (self.term.extra_forwards / steps if steps else None) if self.term else 0.0,
            "train_seconds": self.train_seconds,
            "seconds_per_step": seconds_per_step,
            "timed_epochs": len(timed) if timed else len(self.metrics),
        }

    def _finish(self, model: nn.Module, data: RunData, optimizer) -> dict[str, Any]:
        config, dataset = self.config, data.dataset
        test = evaluate(model, dataset.x_test, dataset.y_test, num_classes=dataset.num_classes, device=self.device)
        last = self.metrics[-1] if self.metrics else {}
        status, reason = classify_run(
            train_losses=[row["train_loss"] for row in self.metrics],
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
            "epochs": config.epochs,
            "epochs_completed": self.epoch,
            "optimizer": config.optimizer,
            "seed": config.seed,
            "label_noise": data.label_noise,
            "bootstrap_from": config.bootstrap_from,
            "data": config.data,
            "model": config.model,
            "lr": config.lr,
            "rho": config.rho,
            "micro_batches": config.micro_batches,
            "options": config.options,
            "cost": self._cost(optimizer),
            "status": status,
            "status_reason": reason,
            "prediction_counts": test.prediction_counts,
            "wall_seconds": self.wall_seconds,
            **self.runtime,
            "device": str(self.device),
            "torch": torch.__version__,
        }
        if config.subspace is not None and self.context.is_main:
            from samkit.experiments.subspace import evaluate_line

            summary["subspace"] = evaluate_line(
                model, dataset.x_train, dataset.x_test, dataset.y_test, batch_size=config.batch_size, device=self.device
            )
        if self.context.is_main and self.plot:
            title = f"{config.optimizer} on {config.data} ({config.model}), seed {config.seed}"
            if self.metrics:
                curves = self.out / rundir.CURVES_PLOT
                plots.learning_curves(self.metrics, curves, title=title, steps=self.step_log.rows)
            if any("lambda_max" in row for row in self.metrics):
                plots.hessian_evolution(self.metrics, self.out / rundir.HESSIAN_PLOT, title=title)
        if self.context.is_main:
            write_json(self.out / rundir.SUMMARY, summary)
            self._say(
                f"{status}{' (' + reason + ')' if reason else ''}: test accuracy {test.accuracy:.2%}, "
                f"test loss {test.loss:.4f} after {self.epoch} epochs in {self.wall_seconds:.1f} s -> {self.out}"
            )
        return summary


def _set_mode(optimizer, *, training: bool) -> None:
    """The SAM family's eval()/train() pair around evaluation and checkpoints (a base optimizer has neither)."""
    method = getattr(optimizer, "train" if training else "eval", None)
    if callable(method):
        method()


def _epoch_line(row: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"train loss {row['train_loss']:.4f}"]
    for key, label in (("train_acc", "train acc"), ("val_acc", "val acc"), ("test_acc", "test acc")):
        if row.get(key) is not None:
            parts.append(f"{label} {row[key]:.2%}")
    if row.get("lambda_max") is not None:
        parts.append(f"λmax {row['lambda_max']:.3g}")
    parts.append(f"lr {row['lr']:.4g}")
    parts.append(f"{row['seconds']:.1f} s")
    return " | ".join(parts)
