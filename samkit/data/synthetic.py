"""A tiny, seeded, learnable image-classification problem for fast tests: 1x8x8 images, 4 classes.

Each class is a bright pattern on a dark background, seen through noise:

    prototypes  horizontal bar (rows 3-4) | vertical bar (cols 3-4) | diagonal | centre 4x4 square
    x = clip(contrast * prototype + 0.1 + N(0, 0.25^2), 0, 1),  contrast ~ U(0.6, 1.0)
    256 training and 128 test images, balanced, generated once from a FIXED seed (1234): the seed of
    load_dataset only moves --subset and the validation split, never the data.

Easy on purpose (the nearest-class-mean classifier, a linear model, gets the test set right): it is
there to check quickly that training works, not to rank optimizers.
"""

from __future__ import annotations

import torch
from torch import Tensor

SYNTHETIC_CLASSES = ["horizontal", "vertical", "diagonal", "square"]
SYNTHETIC_SIZE = 8
SYNTHETIC_TRAIN = 256
SYNTHETIC_TEST = 128
_DATA_SEED = 1234
_NOISE_STD = 0.25


def _prototypes() -> Tensor:
    s = SYNTHETIC_SIZE
    protos = torch.zeros(len(SYNTHETIC_CLASSES), s, s, dtype=torch.float64)
    protos[0, 3:5, :] = 1.0
    protos[1, :, 3:5] = 1.0
    protos[2] = torch.eye(s, dtype=torch.float64) + torch.diag(torch.ones(s - 1, dtype=torch.float64), 1)
    protos[3, 2:6, 2:6] = 1.0
    return protos


def _sample(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    classes = len(SYNTHETIC_CLASSES)
    labels = torch.arange(n) % classes
    labels = labels[torch.randperm(n, generator=generator)]
    contrast = 0.6 + 0.4 * torch.rand(n, 1, 1, generator=generator, dtype=torch.float64)
    noise = _NOISE_STD * torch.randn(n, SYNTHETIC_SIZE, SYNTHETIC_SIZE, generator=generator, dtype=torch.float64)
    images = (contrast * _prototypes()[labels] + 0.1 + noise).clamp(0.0, 1.0)
    return images[:, None].float(), labels.long()


def load_synthetic_arrays() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test): float32 images on [0, 1] of shape (N, 1, 8, 8), int64 labels."""
    generator = torch.Generator().manual_seed(_DATA_SEED)
    x_train, y_train = _sample(SYNTHETIC_TRAIN, generator)
    x_test, y_test = _sample(SYNTHETIC_TEST, generator)
    return x_train, y_train, x_test, y_test
