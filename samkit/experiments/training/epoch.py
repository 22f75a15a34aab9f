"""One epoch's data and its evaluation row.

    order = randperm(n_train, generator(seed, epoch))           # the same on every rank and on resume
    for each full batch B of order (drop_last):
        x = augment(x_B, generator(seed, epoch)); mixup; this rank's slice                 (EpochBatches)
    evaluate (eval mode): train sample, val, test; lambda_max every --track-hessian epochs   (evaluate_epoch)

Train accuracy is measured at the end of each epoch, in eval mode, on the first TRAIN_EVAL_EXAMPLES training
examples against the labels trained on (noisy ones under --label-noise). Evaluation is in float32 even under --amp.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samkit.experiments.inputs import RunData
from samkit.experiments.metrics import evaluate
from samkit.experiments.train_step import make_loss_fn
from samkit.experiments.training.state import TrainingState

TRAIN_EVAL_EXAMPLES = 2000
ORDER_STREAM, AUGMENT_STREAM, MIXUP_STREAM = 0, 1, 2


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A well-mixed 63-bit seed for (run seed, epoch, stream): data order, augmentation, mixup."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


def mixup(x: Tensor, y: Tensor, alpha: float, num_classes: int, rng: np.random.Generator, generator: torch.Generator):
    """Mixup (Zhang et al. 2018): x = lam x + (1 - lam) x[perm], soft targets mixed the same way."""
    lam = float(rng.beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=generator)
    one_hot = F.one_hot(y, num_classes).float()
    return lam * x + (1 - lam) * x[perm], lam * one_hot + (1 - lam) * one_hot[perm]


class EpochBatches:
    """The batches of epoch ``state.epoch``, drawn in order: ``batch(b)`` is (inputs, targets, example indices), this
    rank's slice, on the device. The same on every rank and on resume (every draw is seeded by seed and epoch)."""

    def __init__(self, state: TrainingState, data: RunData):
        config = state.config
        self.state, self.data = state, data
        n_train = data.train_labels.shape[0]
        self.steps = n_train // config.batch_size
        self.order = torch.randperm(
            n_train, generator=torch.Generator().manual_seed(epoch_seed(config.seed, state.epoch, ORDER_STREAM))
        )
        self.augment_generator = torch.Generator().manual_seed(epoch_seed(config.seed, state.epoch, AUGMENT_STREAM))
        self.mixup_rng = np.random.default_rng(epoch_seed(config.seed, state.epoch, MIXUP_STREAM))

    def batch(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        config, context, dataset = self.state.config, self.state.context, self.data.dataset
        indices = self.order[index * config.batch_size : (index + 1) * config.batch_size]
        x, y = dataset.x_train[indices], self.data.train_labels[indices]
        if config.augment != "none":
            from samkit.data import augment

            x = augment(x, config.augment, generator=self.augment_generator, mean=dataset.mean, std=dataset.std)
        targets: Tensor = y
        if config.mixup > 0:
            x, targets = mixup(x, y, config.mixup, dataset.num_classes, self.mixup_rng, self.augment_generator)
        device = self.state.device
        return context.shard(x).to(device), context.shard(targets).to(device), context.shard(indices).to(device)


def evaluate_epoch(state: TrainingState, model: nn.Module, data: RunData, train_loss: float) -> dict[str, Any]:
    """The epoch's row of metrics.jsonl (rank 0 evaluates; the other ranks' rows hold the training numbers)."""
    dataset = data.dataset
    row: dict[str, Any] = {
        "epoch": state.epoch + 1,
        "train_loss": train_loss,
        "lr": state.lr,
    }
    if not state.context.is_main:
        return row
    common = {"num_classes": dataset.num_classes, "device": state.device}
    sample = slice(0, TRAIN_EVAL_EXAMPLES)
    row["train_acc"] = evaluate(model, dataset.x_train[sample], data.train_labels[sample], **common).accuracy
    if dataset.x_val is not None:
        val = evaluate(model, dataset.x_val, data.val_labels, **common)
        row["val_loss"], row["val_acc"] = val.loss, val.accuracy
    test = evaluate(model, dataset.x_test, dataset.y_test, **common)
    row["test_loss"], row["test_acc"] = test.loss, test.accuracy
    every = state.config.track_hessian
    if every and ((state.epoch + 1) % every == 0 or state.epoch + 1 == state.config.epochs):
        from samkit.experiments.flatness import hessian_summary

        row.update(
            hessian_summary(model, make_loss_fn(0.0), dataset.x_train, data.train_labels, seed=state.config.seed)
        )
    return row


def set_mode(optimizer, *, training: bool) -> None:
    """The SAM family's eval()/train() pair around evaluation and checkpoints (a base optimizer has neither)."""
    method = getattr(optimizer, "train" if training else "eval", None)
    if callable(method):
        method()


def epoch_line(row: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"train loss {row['train_loss']:.4f}"]
    for key, label in (("train_acc", "train acc"), ("val_acc", "val acc"), ("test_acc", "test acc")):
        if row.get(key) is not None:
            parts.append(f"{label} {row[key]:.2%}")
    if row.get("lambda_max") is not None:
        parts.append(f"λmax {row['lambda_max']:.3g}")
    parts.append(f"lr {row['lr']:.4g}")
    parts.append(f"{row['seconds']:.1f} s")
    return " | ".join(parts)
