"""``train``: one run from a ``TrainConfig`` to a folder of results, resumable to the bit.

    check config and DIR (rundir)          -> refuse before any work
    data, labels = load_run_data(config)   (label noise / bootstrap; the flips -> DIR/label_noise.json)
    torch.manual_seed(seed); model = build_model(...) (+ --init-from weights); optimizer = build_optimizer
    resume: load model, optimizer, scaler, RNG states, metrics from DIR/checkpoint.pt
    for epoch in remaining epochs:
        order = randperm(n_train, generator(seed, epoch))           # the same on every rank and on resume
        for each full batch B of order (drop_last):
            x = augment(x_B, generator(seed, epoch)); mixup; this rank's slice
            lr = schedule(step); loss = train_step(...)            # sam_step for sam/asam/msam
        evaluate (eval mode): train sample, val, test; lambda_max every --track-hessian epochs
        append to metrics.jsonl; write checkpoint.pt atomically
    summary.json (with ok / diverged / collapsed), curves.png, hessian.png

Evaluation is in float32 even under --amp (the weights are float32; autocast is a training-speed device), so
the last line of metrics.jsonl, summary.json and ``samkit evaluate`` report the same test loss and accuracy.
Train accuracy is measured at the end of each epoch, in eval mode, on the first TRAIN_EVAL_EXAMPLES
training examples against the labels trained on (noisy ones under --label-noise); train loss is the mean
of the training objective over the epoch's steps (with smoothing/mixup), as sam_step returns it.

Ctrl-C stops at once and leaves checkpoint.pt at the last completed epoch (it is only ever replaced
atomically); ``--resume`` continues from there and ends with the weights of an uninterrupted run.
"""

from __future__ import annotations

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
from samkit.experiments.checkpoint import load_checkpoint, restore_rng_state, save_checkpoint
from samkit.experiments.config import TrainConfig
from samkit.experiments.files import read_json, write_json, write_jsonl
from samkit.experiments.inputs import RunData, label_noise_record, load_run_data
from samkit.experiments.metrics import evaluate
from samkit.experiments.optimizers import build_optimizer
from samkit.experiments.schedule import set_learning_rate
from samkit.experiments.status import DIVERGED, classify_run
from samkit.experiments.steps import make_loss_fn, make_scaler, train_step

TRAIN_EVAL_EXAMPLES = 2000
ORDER_STREAM, AUGMENT_STREAM, MIXUP_STREAM = 0, 1, 2


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; ``checkpoint_epoch`` is the epoch that checkpoint.pt holds."""

    def __init__(self, out: Path, checkpoint_epoch: int):
        super().__init__(
            f"interrupted; {out / rundir.CHECKPOINT} holds epoch {checkpoint_epoch}: "
            "run the same command with --resume to continue"
        )
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
    from samkit.data import AUGMENTATIONS, DATASETS
    from samkit.models import MODELS, build_model

    if config.data not in DATASETS:
        raise ValueError(f"unknown data {config.data!r}; valid: {', '.join(DATASETS)}")
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
) -> dict[str, Any]:
    """Train as ``config`` says, writing DIR = ``out`` (see the module doc); return the summary dict.

    ``plot=False`` skips the PNGs (``compare`` draws its own, and matplotlib costs ~1 s a figure).

    Raises ValueError (bad option, or DIR refused) before any training, ``TrainingInterrupted`` on Ctrl-C.
    Under ``torchrun`` every rank calls this; rank 0 writes the files and every rank returns the summary.
    """
    config = config.resolved()
    check_names(config)
    context = distributed.setup(device)
    try:
        return _Training(config, Path(out), context, quiet=quiet, plot=plot).run(resume=resume, overwrite=overwrite)
    finally:
        distributed.teardown(context)


class _Training:
    def __init__(self, config: TrainConfig, out: Path, context: distributed.Context, *, quiet: bool, plot: bool):
        self.config, self.out, self.context, self.quiet, self.plot = config, out, context, quiet, plot
        self.device = context.device
        self.metrics: list[dict[str, Any]] = []
        self.epoch = 0
        self.step = 0
        self.wall_seconds = 0.0
        self.train_seconds = 0.0  # the training steps alone (no evaluation): the cost a method is compared by
        self.term = None  # MESA's or SAF's trajectory term (experiments/trajectory.py), for those methods
        self.lr = config.lr  # the learning rate of the last step taken

    # ---------------------------------------------------------------------------------------------------- setup

    def _say(self, message: str) -> None:
        if self.context.is_main and not self.quiet:
            tqdm.write(message)

    def _prepare_dir(self, *, resume: bool, overwrite: bool) -> Optional[Path]:
        error, checkpoint = "", None
        if self.context.is_main:
            try:
                checkpoint = rundir.prepare_run_dir(self.out, self.config.to_dict(), resume=resume, overwrite=overwrite)
            except ValueError as refused:
                error = str(refused)
        error = self.context.broadcast_error(error)
        if error:
            raise rundir.RunDirError(error)
        self.context.barrier()
        path = self.out / rundir.CHECKPOINT
        return path if (resume and path.exists()) else checkpoint

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
        if not self.context.is_main:
            return
        save_checkpoint(
            self.out / rundir.CHECKPOINT,
            {
                "config": self.config.to_dict(),
                "model_shape": data.model_shape,
                "epoch": self.epoch,
                "step": self.step,
                "wall_seconds": self.wall_seconds,
                "train_seconds": self.train_seconds,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "trajectory": self.term.state_dict() if self.term is not None else None,
                "metrics": self.metrics,
                "train_labels": data.train_labels,
                "world_size": self.context.world_size,
            },
        )

    def _restore(self, path: Path, model: nn.Module, optimizer, scaler, data: RunData) -> None:
        payload = load_checkpoint(path, map_location=self.device)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        if scaler is not None and payload["scaler"] is not None:
            scaler.load_state_dict(payload["scaler"])
        if self.term is not None:
            self.term.load_state_dict(payload["trajectory"])
        self.epoch, self.step = int(payload["epoch"]), int(payload["step"])
        self.wall_seconds = float(payload["wall_seconds"])
        self.train_seconds = float(payload.get("train_seconds", 0.0))
        self.metrics = list(payload["metrics"])
        data.train_labels = payload["train_labels"].cpu()
        restore_rng_state(payload["rng"])
        self._say(f"resuming {self.out} after epoch {self.epoch}/{self.config.epochs}")

    # ---------------------------------------------------------------------------------------------------- run

    def run(self, *, resume: bool, overwrite: bool) -> dict[str, Any]:
        started = time.perf_counter()
        config = self.config
        resume_from = self._prepare_dir(resume=resume, overwrite=overwrite)
        # a finished run is read back, with or without its checkpoint (committed results keep config, metrics and
        # summary only); prepare_run_dir has checked that its config is this one
        if resume and (self.out / rundir.CONFIG).exists() and (self.out / rundir.SUMMARY).exists():
            finished = read_json(self.out / rundir.SUMMARY)
            if finished.get("epochs_completed") == config.epochs or finished.get("status") == DIVERGED:
                self._say(f"{self.out} is already finished")
                return finished
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
        optimizer = build_optimizer(model, config, total_steps=total_steps)
        scaler = make_scaler(config, self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        if resume_from is not None:
            self._restore(resume_from, model, optimizer, scaler, data)
        elif self.context.is_main:
            write_json(self.out / rundir.CONFIG, config.to_dict())
            record = label_noise_record(data, data_seed=config.data_seed)
            if record is not None:
                write_json(self.out / rundir.LABEL_NOISE, record)
            self._checkpoint(model, optimizer, scaler, data)  # Ctrl-C in epoch 1 still leaves a valid checkpoint
            write_jsonl(self.out / rundir.METRICS, [])
        wrapped = model
        if self.context.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

        diverged = False
        self.wall_seconds += time.perf_counter() - started
        try:
            while self.epoch < config.epochs and not diverged:
                epoch_started = time.perf_counter()
                trained_before = self.train_seconds
                _set_mode(optimizer, training=True)  # Momentum-SAM: back to its ascent point (others: nothing)
                train_loss = self._train_epoch(wrapped, optimizer, scaler, data)
                _set_mode(optimizer, training=False)  # evaluation and the checkpoint see the weights w
                diverged = not math.isfinite(train_loss)
                row = self._evaluate_epoch(model, data, train_loss)
                self.epoch += 1
                self.wall_seconds += time.perf_counter() - epoch_started
                row["seconds"] = time.perf_counter() - epoch_started
                row["train_seconds"] = self.train_seconds - trained_before
                self.metrics.append(row)
                if self.context.is_main:
                    write_jsonl(self.out / rundir.METRICS, self.metrics)
                    if not diverged:
                        self._checkpoint(model, optimizer, scaler, data)
                self._say(_epoch_line(row, config.epochs))
        except KeyboardInterrupt as interrupt:
            raise TrainingInterrupted(self.out, self.epoch) from interrupt
        return self._finish(model, data, optimizer)

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
            "world_size": self.context.world_size,
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
                plots.learning_curves(self.metrics, self.out / rundir.CURVES_PLOT, title=title)
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
