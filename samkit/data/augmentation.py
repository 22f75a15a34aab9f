"""Training-time augmentation of NCHW batches with torch ops only (runs on the batch's device).

The two augmentations of the SAM paper's Fashion-MNIST/CIFAR experiments (Foret et al. 2021, Table 1):

    basic   pad p pixels on every side, take a random HxW crop, flip left-right with probability 1/2
            (p = round(image_size / 8): 4 px at 28/32 px, 1 px at 8 px -- the CIFAR recipe scaled)
    cutout  basic, then zero a random s x s square (DeVries & Taylor 2017, arXiv 1708.04552):
            s = image_size // 2 (16 px at 32 px, 14 at 28, 4 at 8); the square's centre is uniform over
            the image, so near a border the square is clipped, as in their code
    none    x itself (no copy)

Normalization: x is NORMALIZED (what a Dataset holds). As in the torchvision pipelines the papers used
(RandomCrop before Normalize; Cutout after it):
    - padding is "black": pixel 0, i.e. (0 - mean) / std when mean/std are given, else 0;
    - cutout writes normalized 0, i.e. the training mean.
One random draw per image, all from ``generator`` in the order crop offsets, flips, cutout centres, so
the same generator state gives the same batch, and cutout equals basic outside its square.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from samkit.data.normalization import check_images, check_mean_std, normalize

AUGMENTATIONS = ("none", "basic", "cutout")


def default_padding(image_size: int) -> int:
    """round(image_size / 8), at least 1: 4 px at 32 and 28, 2 at 16, 1 at 8."""
    return max(1, int(image_size / 8 + 0.5))


def default_cutout_size(image_size: int) -> int:
    """image_size // 2, at least 1: 16 px at 32 (DeVries & Taylor's CIFAR-10 setting), 14 at 28, 4 at 8."""
    return max(1, image_size // 2)


def _uniform_ints(high: int, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.randint(0, high, (n,), generator=generator, device=generator.device).to(device)


def random_crop_flip(x: Tensor, padding: int, pad_value: Tensor, generator: torch.Generator) -> Tensor:
    """Pad by ``padding`` with ``pad_value`` (per channel), crop back to HxW at a random offset, random flip."""
    n, c, h, w = x.shape
    padded = pad_value.expand(n, c, h + 2 * padding, w + 2 * padding).clone()
    padded[:, :, padding : padding + h, padding : padding + w] = x
    top = _uniform_ints(2 * padding + 1, n, generator, x.device)
    left = _uniform_ints(2 * padding + 1, n, generator, x.device)
    flip = _uniform_ints(2, n, generator, x.device).bool()
    rows = (top[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = left[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def cutout(x: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """Set a size x size square (clipped at the borders) with a uniform random centre to 0, per image."""
    n, _, h, w = x.shape
    cy = _uniform_ints(h, n, generator, x.device)
    cx = _uniform_ints(w, n, generator, x.device)
    ys = torch.arange(h, device=x.device)[None, :]
    xs = torch.arange(w, device=x.device)[None, :]
    in_rows = (ys >= (cy - size // 2)[:, None]) & (ys < (cy - size // 2 + size)[:, None])
    in_cols = (xs >= (cx - size // 2)[:, None]) & (xs < (cx - size // 2 + size)[:, None])
    square = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
    return x.masked_fill(square, 0.0)


def augment(
    x: Tensor,
    kind: str,
    *,
    generator: torch.Generator,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    padding: Optional[int] = None,
    cutout_size: Optional[int] = None,
) -> Tensor:
    """Augment a normalized NCHW batch (see the module doc); never modifies ``x``.

    ``mean``/``std``: the Dataset's normalization, so padding is black (pixel 0); without them padding is 0.
    ``padding``/``cutout_size``: override the size-scaled defaults.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> augment(torch.zeros(2, 1, 8, 8), "cutout", generator=g).shape
        torch.Size([2, 1, 8, 8])
    """
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; choose one of {AUGMENTATIONS}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator (seeded: torch.Generator().manual_seed(0)), "
                        f"got {type(generator).__name__}")
    check_images(x)
    check_mean_std(mean, std)
    for name, value in (("padding", padding), ("cutout_size", cutout_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")
    if kind == "none":
        return x
    size = min(x.shape[2], x.shape[3])
    pad = default_padding(size) if padding is None else padding
    black = torch.zeros(1, x.shape[1], 1, 1, dtype=x.dtype, device=x.device)
    if mean is not None:
        black = normalize(black, mean, std)
    out = random_crop_flip(x, pad, black, generator)
    if kind == "cutout":
        out = cutout(out, default_cutout_size(size) if cutout_size is None else cutout_size, generator)
    return out
