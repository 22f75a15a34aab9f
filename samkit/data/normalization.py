"""Per-channel normalization of NCHW image batches: x_normalized = (x - mean[c]) / std[c].

The statistics are computed on the TRAINING split only (`channel_stats`) and stored in the Dataset, so
that augmentations and corruptions can move between the normalized scale the models see and the
[0, 1] pixel scale where "black", "add 0.1 brightness" or "clip" mean something.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

_CHUNK = 4096  # images per float64 chunk in channel_stats


def check_images(x: Tensor, name: str = "x") -> None:
    """Raise ValueError unless ``x`` is a floating-point NCHW batch."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be a batch of images of shape (N, C, H, W), got shape {tuple(x.shape)}; "
                         "add a batch dimension with x.unsqueeze(0)")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}; convert with x.float()")


def channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of an NCHW batch, as Python floats."""
    check_images(x)
    # float64 accumulation, chunk by chunk: no float64 copy of a 60000-image training set at once
    chunks = [chunk.transpose(0, 1).reshape(x.shape[1], -1) for chunk in x.split(_CHUNK)]
    count = x.numel() // x.shape[1]
    mean = sum(chunk.sum(dim=1, dtype=torch.float64) for chunk in chunks) / count
    squares = sum(((chunk.double() - mean[:, None]) ** 2).sum(dim=1) for chunk in chunks)
    std = (squares / count).sqrt()
    if bool((std == 0).any()):
        raise ValueError(f"a channel of the training images is constant (std {std.tolist()}): cannot normalize")
    return tuple(mean.tolist()), tuple(std.tolist())


def _as_channels(values: Sequence[float], x: Tensor, name: str) -> Tensor:
    t = torch.as_tensor(values, dtype=x.dtype, device=x.device).reshape(-1)
    if t.numel() not in (1, x.shape[1]):
        raise ValueError(f"{name} must have 1 or {x.shape[1]} (the channel count) values, got {t.numel()}")
    return t.reshape(1, -1, 1, 1)


def check_mean_std(mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
    """Raise ValueError unless mean and std are both given (with std > 0) or both None."""
    if (mean is None) != (std is None):
        raise ValueError(f"give both mean and std or neither, got mean={mean} and std={std}")
    if std is not None and any(float(s) <= 0 for s in torch.as_tensor(std).reshape(-1).tolist()):
        raise ValueError(f"std must be > 0 in every channel, got {std}")


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(x - mean) / std per channel; ``x`` on the [0, 1] pixel scale."""
    return (x - _as_channels(mean, x, "mean")) / _as_channels(std, x, "std")


def denormalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """x * std + mean per channel: back to the [0, 1] pixel scale."""
    return x * _as_channels(std, x, "std") + _as_channels(mean, x, "mean")
