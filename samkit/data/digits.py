"""The scikit-learn digits: 1797 grey 8x8 images of handwritten digits, bundled with scikit-learn
(UCI "Optical Recognition of Handwritten Digits", Alpaydin & Kaynak 1998), so it needs no download.
samkit's embedded default dataset.

    images, labels = sklearn.datasets.load_digits()   # pixel counts 0..16
    x = images / 16                                     # [0, 1] pixel scale, shape (N, 1, 8, 8)
    train, test = stratified split, 360 test images, FIXED random_state=0 (the same test set for
                  every seed: the seed of load_dataset only moves --subset and the validation split)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

DIGITS_CLASSES = [str(d) for d in range(10)]
DIGITS_TEST_SIZE = 360
DIGITS_MAX_PIXEL = 16.0


def load_digits_arrays() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test): float32 images on [0, 1] of shape (N, 1, 8, 8), int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float64) / DIGITS_MAX_PIXEL
    labels = np.asarray(bunch.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=DIGITS_TEST_SIZE, stratify=labels, random_state=0
    )
    as_images = lambda a: torch.from_numpy(a[:, None].astype(np.float32))  # noqa: E731
    return as_images(x_tr), torch.from_numpy(y_tr), as_images(x_te), torch.from_numpy(y_te)
