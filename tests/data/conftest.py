"""Helpers for the data tests: IDX files written with struct, independently of samkit's reader."""

import gzip
import struct

import numpy as np
import pytest
import torch


def _idx_bytes(code: int, dims, payload: bytes) -> bytes:
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + payload


def _write_fake_fashion(folder, *, n_train=12, n_test=6, seed=0, compressed=True):
    """Four Fashion-MNIST-shaped IDX files with random pixels; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            raw = _idx_bytes(0x08, array.shape, array.tobytes())
            name = f"{prefix}-{kind}-ubyte"
            if compressed:
                (folder / (name + ".gz")).write_bytes(gzip.compress(raw))
            else:
                (folder / name).write_bytes(raw)
            arrays[name] = array
    return arrays


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the tensors here are tiny, and on a shared 2-core machine OpenMP's spinning
    threads made tiny ops up to 100x slower. Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def idx_bytes():
    return _idx_bytes


@pytest.fixture
def write_fake_fashion():
    return _write_fake_fashion
