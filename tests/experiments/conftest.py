"""Shared tiny runs on the `synthetic` dataset (256 train / 128 test 8x8 images, 4 classes)."""

from __future__ import annotations

import pytest

from samkit.experiments.config import TrainConfig
from samkit.experiments.trainer import train

TINY = TrainConfig(data="synthetic", model="mlp", epochs=2, batch_size=32, lr=0.05)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A finished 2-epoch SGD run: (folder, summary)."""
    out = tmp_path_factory.mktemp("runs") / "sgd"
    return out, train(TINY, out, device="cpu", quiet=True)
