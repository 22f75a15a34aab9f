"""Common image corruptions at 5 severities, for robustness evaluation (`samkit evaluate --corruptions`).

After Hendrycks & Dietterich 2019, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations" (arXiv 1903.12261), with the CIFAR-10-C severity constants of their make_cifar_c.py,
written with torch ops on NCHW batches. On the [0, 1] pixel scale, c = constant[severity - 1]:

    gaussian_noise  c = .04 .06 .08 .09 .10      clip(x + N(0, c^2), 0, 1)
    blur            c = .4  .6  .7  .8  1.0      Gaussian blur, sigma c PIXELS, kernel radius int(4c + .5),
                                                 edges replicated (scipy/skimage mode "nearest")
    contrast        c = .75 .5  .4  .3  .15      m = per-image, per-channel mean; clip((x - m) c + m, 0, 1)
    brightness      c = .05 .1  .15 .2  .3       HSV value + c, clipped to 1 (grey: clip(x + c, 0, 1))
    pixelate        c = .95 .9  .85 .75 .65      BOX-downsample to min(int(size c), size - severity) px,
                                                 BOX-upsample back (PIL's BOX rule: the mean of the pixels
                                                 whose centres fall in the output pixel; upsampling is
                                                 then nearest)

Other image sizes than CIFAR's 32 px keep these constants. Blur sigma is in pixels (relatively stronger
on 8x8 digits). Pixelate scales with the image; the "size - severity" cap changes nothing from 16 px up
(28 px: 26 25 23 21 18) and gives 8 px digits five distinct levels (7 6 5 4 3 px instead of CIFAR's
7 7 6 6 5). Caveat: on 8 px, 6 px pixelation happens to disturb digits a little MORE than 5 px (mean
|change| 0.32 vs 0.30 in normalized units), so severities 2 and 3 are not ordered there.

Normalization: a Dataset's images are normalized, so pass its ``mean``/``std``: x is un-normalized to
[0, 1], corrupted and clipped there, then normalized again. Without mean/std, x must already be on
[0, 1] (checked: values outside it raise, since that almost always means mean/std were forgotten).
Only gaussian_noise is random; it draws from ``generator``, so a seeded generator gives a fixed
corrupted test set.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from samkit.data.normalization import check_images, check_mean_std, denormalize, normalize

CORRUPTIONS = ("gaussian_noise", "blur", "contrast", "brightness", "pixelate")
SEVERITY_CONSTANTS = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
}
_RANGE_SLACK = 1e-4  # float32 round trips of [0, 1] data land a hair outside it


def gaussian_noise(x: Tensor, std: float, generator: torch.Generator) -> Tensor:
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    return (x + std * noise.to(x.device)).clamp(0.0, 1.0)


def gaussian_kernel(sigma: float, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """Normalized 1-D Gaussian of radius int(4 sigma + 0.5), as scipy.ndimage.gaussian_filter builds it."""
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype)


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur per channel, edges replicated."""
    n, c, h, w = x.shape
    kernel = gaussian_kernel(sigma, dtype=x.dtype).to(x.device)
    r = kernel.numel() // 2
    flat = x.reshape(n * c, 1, h, w)
    flat = F.conv2d(F.pad(flat, (0, 0, r, r), mode="replicate"), kernel.reshape(1, 1, -1, 1))
    flat = F.conv2d(F.pad(flat, (r, r, 0, 0), mode="replicate"), kernel.reshape(1, 1, 1, -1))
    return flat.reshape(n, c, h, w).clamp(0.0, 1.0)


def contrast(x: Tensor, factor: float) -> Tensor:
    means = x.mean(dim=(2, 3), keepdim=True)
    return ((x - means) * factor + means).clamp(0.0, 1.0)


def brightness(x: Tensor, shift: float) -> Tensor:
    """Add ``shift`` to the HSV value (the max over channels) keeping hue and saturation."""
    if x.shape[1] == 1:
        return (x + shift).clamp(0.0, 1.0)
    value = x.amax(dim=1, keepdim=True)
    new_value = (value + shift).clamp(max=1.0)
    scaled = x * (new_value / value.clamp(min=torch.finfo(x.dtype).tiny))
    return torch.where(value > 0, scaled, new_value.expand_as(x)).clamp(0.0, 1.0)  # black has saturation 0


def box_resample_matrix(size_in: int, size_out: int, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """(size_out, size_in) matrix of PIL's BOX resampling along one axis.

    Output pixel i averages the input pixels j whose centre j + 0.5 lies in (i s, (i + 1) s], s =
    size_in / size_out (a box filter sampled at pixel centres, PIL's rule); when upsampling (s < 1)
    this is nearest-neighbour on pixel centres.
    """
    scale = size_in / size_out
    support = max(scale, 1.0) / 2
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    for i in range(size_out):
        centre = (i + 0.5) * scale
        for j in range(max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), size_in)):
            if -0.5 < (j - centre + 0.5) / max(scale, 1.0) <= 0.5:
                matrix[i, j] = 1.0
    return (matrix / matrix.sum(dim=1, keepdim=True)).to(dtype)


def pixelated_size(size: int, severity: int) -> int:
    """int(size * c) as in CIFAR-10-C, but at most size - severity so that small images get 5 distinct levels."""
    return max(1, min(int(size * SEVERITY_CONSTANTS["pixelate"][severity - 1]), size - severity))


def pixelate(x: Tensor, severity: int) -> Tensor:
    h, w = x.shape[2], x.shape[3]
    small_h, small_w = pixelated_size(h, severity), pixelated_size(w, severity)
    down_h = box_resample_matrix(h, small_h, dtype=x.dtype).to(x.device)
    down_w = box_resample_matrix(w, small_w, dtype=x.dtype).to(x.device)
    up_h = box_resample_matrix(small_h, h, dtype=x.dtype).to(x.device)
    up_w = box_resample_matrix(small_w, w, dtype=x.dtype).to(x.device)
    small = down_h @ x @ down_w.T
    return (up_h @ small @ up_w.T).clamp(0.0, 1.0)


def corrupt(
    x: Tensor,
    kind: str,
    severity: int,
    *,
    generator: torch.Generator,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> Tensor:
    """Corrupt an NCHW batch at ``severity`` 1..5 (see the module doc); never modifies ``x``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.rand(2, 1, 8, 8, generator=g)
        >>> corrupt(x, "contrast", 5, generator=g).std() < x.std()
        tensor(True)
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; choose one of {CORRUPTIONS}")
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator (seeded: torch.Generator().manual_seed(0)), "
                        f"got {type(generator).__name__}")
    check_images(x)
    check_mean_std(mean, std)
    pixels = x if mean is None else denormalize(x, mean, std)
    if mean is None and x.numel():
        low, high = float(x.min()), float(x.max())
        if low < -_RANGE_SLACK or high > 1 + _RANGE_SLACK:
            raise ValueError(f"x has values in [{low:.3g}, {high:.3g}], outside the [0, 1] pixel scale: pass "
                             "the Dataset's mean= and std= to corrupt normalized images")
    pixels = pixels.clamp(0.0, 1.0)
    constant = SEVERITY_CONSTANTS[kind][severity - 1]
    if kind == "gaussian_noise":
        out = gaussian_noise(pixels, constant, generator)
    elif kind == "blur":
        out = gaussian_blur(pixels, constant)
    elif kind == "contrast":
        out = contrast(pixels, constant)
    elif kind == "brightness":
        out = brightness(pixels, constant)
    else:
        out = pixelate(pixels, severity)
    return out if mean is None else normalize(out, mean, std)

