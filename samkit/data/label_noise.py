"""Symmetric label noise: flip a fraction of the TRAINING labels, each to a uniformly drawn DIFFERENT class.

The setting of the SAM paper's label-noise experiments (Foret et al. 2021, Sec. 3.3, after Jiang et al.
2020): train on corrupted labels, report accuracy on the clean test set (test labels are never touched).

    k       = round(rate * n)                               (half up: exactly k labels change)
    flipped = the first k of randperm(n, seed), sorted
    offset  ~ U{1, ..., num_classes - 1}                    for each flipped label
    noisy[flipped] = (labels[flipped] + offset) mod num_classes
                                                           # uniform over the num_classes - 1 OTHER classes

Example:
    >>> noisy, flipped = add_label_noise(torch.tensor([0, 1, 2, 3]), 0.5, 4, seed=0)
    >>> len(flipped), bool((noisy[flipped] != torch.tensor([0, 1, 2, 3])[flipped]).all())
    (2, True)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def add_label_noise(labels: Tensor, rate: float, num_classes: int, *, seed: int) -> tuple[Tensor, Tensor]:
    """Return ``(noisy_labels, flipped_indices)``; ``labels`` itself is never modified.

    ``flipped_indices`` (int64, sorted) are positions in ``labels``: save them with the run so the
    corruption can be audited and reproduced.
    """
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be a 1-D integer tensor, got {type(labels).__name__} "
                         f"{getattr(labels, 'dtype', '')} of shape {tuple(getattr(labels, 'shape', ()))}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1), got {rate!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (a label can only flip to another class), "
                         f"got {num_classes!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], found [{int(labels.min())}, "
                         f"{int(labels.max())}]")
    n = labels.numel()
    count = int(math.floor(rate * n + 0.5))
    generator = torch.Generator().manual_seed(seed)
    flipped = torch.randperm(n, generator=generator)[:count].sort().values
    offsets = torch.randint(1, num_classes, (count,), generator=generator)
    noisy = labels.clone()
    flipped_on_device = flipped.to(labels.device)
    noisy[flipped_on_device] = (labels[flipped_on_device] + offsets.to(labels.device, labels.dtype)) % num_classes
    return noisy, flipped_on_device
