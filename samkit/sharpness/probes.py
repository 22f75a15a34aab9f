"""Seeded random probe vectors for the stochastic estimators (Hutchinson, SLQ, Lanczos starts, landscapes).

Every draw comes from a private ``torch.Generator`` seeded with the caller's ``seed``, created on the
parameters' device, so that results are reproducible and the user's global RNG stream is never touched:

    generator = torch.Generator(device).manual_seed(seed)
    v = rademacher(n, generator)   # entries ±1 with probability 1/2 each: E[v vᵀ] = I
    z = gaussian(n, generator)     # entries N(0, 1)

The same seed gives the same probes in ``hessian_trace`` and ``hessian_spectrum``, so the spectrum's first
moment equals the Hutchinson trace estimate divided by the parameter count (a tested identity).
"""

from __future__ import annotations

import torch
from torch import Tensor


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` (CPU or CUDA) seeded with ``seed``; CPU for devices without one."""
    try:
        generator = torch.Generator(device=device)
    except RuntimeError:
        generator = torch.Generator()
    return generator.manual_seed(seed)


def _on(generator: torch.Generator, device: torch.device) -> torch.device:
    return generator.device if generator.device.type != device.type else device


def rademacher(n: int, generator: torch.Generator, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``n`` independent ±1 entries (probability 1/2 each)."""
    bits = torch.randint(0, 2, (n,), generator=generator, device=_on(generator, device))
    return (bits.to(device=device, dtype=dtype) * 2) - 1


def gaussian(
    shape: int | tuple[int, ...], generator: torch.Generator, *, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Independent N(0, 1) entries."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return torch.randn(shape, generator=generator, device=_on(generator, device), dtype=dtype).to(device)


def unit_gaussian(n: int, generator: torch.Generator, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A direction uniform on the unit sphere of R^n (a normalized Gaussian)."""
    z = gaussian(n, generator, dtype=dtype, device=device)
    return z / torch.linalg.vector_norm(z)
