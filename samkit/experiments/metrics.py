"""Evaluate a classifier on in-memory tensors: mean cross-entropy, accuracy, and what it predicts.

    for each chunk of the data (no grad, eval mode, then the mode is restored):
        logits = model(x);  loss += sum CE(logits, y);  correct += sum(argmax logits == y)
    loss = loss / n;  accuracy = correct / n;  prediction_counts[c] = #{argmax = c}

The loss is the plain cross-entropy (no label smoothing or mixup): the number that compares runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EVAL_BATCH_SIZE = 1000


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    prediction_counts: list[int]
    predictions: Tensor  # int64, one per example, on the CPU


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    num_classes: int,
    device: torch.device | str = "cpu",
    autocast: torch.dtype | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
) -> Evaluation:
    """Loss and accuracy of ``model`` on (x, y), in eval mode (BN uses its running statistics)."""
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"x and y must hold the same, non-zero number of examples, got {x.shape[0]} and {y.shape[0]}")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total_loss = 0.0
    predictions = []
    try:
        for start in range(0, x.shape[0], batch_size):
            inputs = x[start : start + batch_size].to(device)
            targets = y[start : start + batch_size].to(device)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                logits = model(inputs)
            total_loss += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
            predictions.append(logits.argmax(dim=1).cpu())
    finally:
        model.train(was_training)
    predicted = torch.cat(predictions)
    return Evaluation(
        loss=total_loss / x.shape[0],
        accuracy=float((predicted == y.cpu()).double().mean()),
        prediction_counts=torch.bincount(predicted, minlength=num_classes).tolist(),
        predictions=predicted,
    )
