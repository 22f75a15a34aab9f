"""Classify a finished run as ok, diverged or collapsed, so reports never average a failed run in silently.

    diverged   a train or test loss is NaN or infinite
    collapsed  the model predicts (nearly) one class for the whole test set, or is no better than chance:
               top predicted class >= COLLAPSE_MAJORITY (90 %) of test predictions,
               or test accuracy <= CHANCE_FACTOR (1.2) / num_classes
    ok         otherwise

Why: with 60 % label noise on a small BN CNN, SAM with rho = 0.05 collapses to a constant prediction
while rho = 0.01 learns; averaging such a run with the others would hide that the setting failed.
"""

from __future__ import annotations

import math
from typing import Sequence

OK, DIVERGED, COLLAPSED = "ok", "diverged", "collapsed"
COLLAPSE_MAJORITY = 0.9
CHANCE_FACTOR = 1.2


def classify_run(
    *, train_losses: Sequence[float], test_loss: float, test_accuracy: float, prediction_counts: Sequence[int]
) -> tuple[str, str]:
    """Return (status, reason); ``prediction_counts[c]`` is how many test examples were predicted as class c."""
    num_classes = len(prediction_counts)
    if num_classes < 2:
        raise ValueError(f"prediction_counts must have one entry per class (>= 2), got {list(prediction_counts)}")
    bad = [loss for loss in [*train_losses, test_loss] if not math.isfinite(loss)]
    if bad:
        return DIVERGED, f"non-finite loss ({bad[0]})"
    total = sum(prediction_counts)
    majority = max(prediction_counts) / total if total else 1.0
    if majority >= COLLAPSE_MAJORITY:
        top = max(range(num_classes), key=lambda c: prediction_counts[c])
        return COLLAPSED, f"predicts class {top} for {majority:.0%} of the test set"
    chance = 1.0 / num_classes
    if test_accuracy <= CHANCE_FACTOR * chance:
        return COLLAPSED, f"test accuracy {test_accuracy:.1%} is at chance level ({chance:.1%})"
    return OK, ""
