"""The Dataset container and the one place where splits are cut and images normalized.

From raw images on the [0, 1] pixel scale to what the models see:

    perm   = randperm(n_train, seed)                       # one seeded permutation of the training set
    kept   = perm[:subset]            (or perm)            # --subset N: the first N of it
    val    = kept[:round(val_fraction * |kept|)]           # held out to tune rho, as the SAM paper did
    train  = kept[len(val):]                               # (10 % of train in the paper)
    mean, std = per-channel statistics of x[train]          # TRAINING split only, no leak from val/test
    x      = (x - mean) / std   for train, val and test

The test set is kept whole (it is never subsampled, except for the tiny `synthetic` set where --subset
cuts it too, so a quick run stays quick). Indices are kept in their original order, and the Dataset
records them (`train_indices`, `val_indices`) so a run can say exactly which examples it used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from samkit.data.normalization import channel_stats, check_images, normalize


@dataclass
class Dataset:
    """Tensors ready for training: float32 NCHW images normalized with the training split's
    per-channel mean/std, int64 labels in [0, num_classes).

    ``mean``/``std`` are per-channel tuples (the identity (0, 1) when not given); pass them to
    `augment` and `corrupt`, which need the [0, 1] pixel scale. ``x_val``/``y_val`` are None when
    no validation split was asked for.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Optional[Tensor]
    y_val: Optional[Tensor]
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    in_channels: int
    image_size: int
    classes: list[str]
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None
    train_indices: Optional[Tensor] = None
    val_indices: Optional[Tensor] = None

    def __post_init__(self) -> None:
        if self.mean is None:
            self.mean = (0.0,) * self.in_channels
        if self.std is None:
            self.std = (1.0,) * self.in_channels
        if len(self.classes) != self.num_classes:
            raise ValueError(f"classes has {len(self.classes)} names but num_classes is {self.num_classes}")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(f"mean and std need one value per channel ({self.in_channels}), "
                             f"got mean={self.mean}, std={self.std}")
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if split == "val" and x is None and y is None:
                continue
            if x is None or y is None:
                raise ValueError(f"x_{split} and y_{split} must both be tensors or both None")
            check_images(x, f"x_{split}")
            expected = (self.in_channels, self.image_size, self.image_size)
            if tuple(x.shape[1:]) != expected:
                raise ValueError(f"x_{split} has images of shape {tuple(x.shape[1:])}, expected {expected} "
                                 "(in_channels, image_size, image_size)")
            if y.dtype != torch.int64 or y.dim() != 1 or y.shape[0] != x.shape[0]:
                raise ValueError(f"y_{split} must be int64 of shape ({x.shape[0]},), got {y.dtype} "
                                 f"of shape {tuple(y.shape)}")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(f"y_{split} has labels in [{int(y.min())}, {int(y.max())}], outside "
                                 f"[0, {self.num_classes - 1}]")


def check_split_options(subset: Optional[int], val_fraction: float, seed: int) -> None:
    """Raise ValueError/TypeError on a bad subset, val_fraction or seed, naming the value."""
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int) or subset < 1):
        raise ValueError(f"subset must be a positive int (a number of training examples) or None, got {subset!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not (
        0.0 <= val_fraction < 1.0
    ):
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}; the SAM paper held out 0.1")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def split_and_normalize(
    name: str,
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    *,
    classes: list[str],
    subset: Optional[int] = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    subset_test: bool = False,
) -> Dataset:
    """Cut subset / validation splits from [0, 1]-scaled images and normalize them (see the module doc)."""
    check_split_options(subset, val_fraction, seed)
    n = x_train.shape[0]
    if subset is not None and subset > n:
        raise ValueError(f"subset must be <= {n} (the size of the {name} training set), got {subset}")
    generator = torch.Generator().manual_seed(seed)
    kept = torch.randperm(n, generator=generator)[: subset if subset is not None else n]
    n_val = _round_half_up(val_fraction * kept.numel()) if val_fraction > 0 else 0
    if val_fraction > 0 and not 1 <= n_val < kept.numel():
        raise ValueError(f"val_fraction={val_fraction} of {kept.numel()} training examples leaves "
                         f"{n_val} for validation and {kept.numel() - n_val} for training; both need >= 1")
    val_idx = kept[:n_val].sort().values
    train_idx = kept[n_val:].sort().values
    if subset_test and subset is not None and subset < x_test.shape[0]:
        test_idx = torch.randperm(x_test.shape[0], generator=generator)[:subset].sort().values
        x_test, y_test = x_test[test_idx], y_test[test_idx]

    mean, std = channel_stats(x_train[train_idx])
    has_val = n_val > 0

    def prepare(x: Tensor) -> Tensor:
        return normalize(x.float(), mean, std).contiguous()

    return Dataset(
        name=name,
        x_train=prepare(x_train[train_idx]),
        y_train=y_train[train_idx].long(),
        x_val=prepare(x_train[val_idx]) if has_val else None,
        y_val=y_train[val_idx].long() if has_val else None,
        x_test=prepare(x_test),
        y_test=y_test.long(),
        num_classes=len(classes),
        in_channels=x_train.shape[1],
        image_size=x_train.shape[2],
        classes=list(classes),
        mean=mean,
        std=std,
        train_indices=train_idx,
        val_indices=val_idx if has_val else None,
    )
