"""Tiny CIFAR files in the official "python version" layout, written here with pickle (protocol 2, as the
official Python 2 files), never downloaded: a few random 32x32 images per file."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np

C10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


def _dump(path: Path, record: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(record, f, protocol=2)


def write_cifar10(root: Path, *, per_batch: int = 3, n_test: int = 4, seed: int = 0, meta: bool = True) -> dict:
    """root/cifar-10-batches-py/ with data_batch_1..5 (``per_batch`` images each) and test_batch; returns
    {"x_train": (N, 3072) uint8, "y_train", "x_test", "y_test"} as written."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    written: dict = {"x_train": [], "y_train": []}
    for i, name in enumerate(C10_TRAIN):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in (np.arange(per_batch) + i) % 10]
        _dump(folder / name, {"batch_label": f"training batch {i + 1} of 5", "labels": labels, "data": data,
                              "filenames": [f"img_{i}_{j}.png" for j in range(per_batch)]})
        written["x_train"].append(data)
        written["y_train"].extend(labels)
    test = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    test_labels = [int(v) for v in np.arange(n_test) % 10]
    _dump(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": test_labels, "data": test,
                                  "filenames": [f"test_{j}.png" for j in range(n_test)]})
    if meta:
        _dump(folder / "batches.meta", {"label_names": [f"name{k}" for k in range(10)], "num_vis": 3072,
                                        "num_cases_per_batch": per_batch})
    return {"x_train": np.concatenate(written["x_train"]), "y_train": np.array(written["y_train"]),
            "x_test": test, "y_test": np.array(test_labels), "folder": folder}


def write_cifar100(root: Path, *, n_train: int = 8, n_test: int = 4, seed: int = 0) -> dict:
    """root/cifar-100-python/ with train, test and meta; fine label i goes with coarse label i // 5."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = [int(v) for v in (np.arange(n) * 13) % 100]
        coarse = [f // 5 for f in fine]
        _dump(folder / name, {"filenames": [f"{name}_{j}.png" for j in range(n)], "batch_label": name,
                              "fine_labels": fine, "coarse_labels": coarse, "data": data})
        written[f"x_{name}"], written[f"y_{name}"], written[f"coarse_{name}"] = data, np.array(fine), np.array(coarse)
    _dump(folder / "meta", {"fine_label_names": [f"fine{k}" for k in range(100)],
                            "coarse_label_names": [f"coarse{k}" for k in range(20)]})
    written["folder"] = folder
    return written


def _py2_string(text: bytes) -> bytes:
    """A Python 2 ``str`` as cPickle wrote it: SHORT_BINSTRING, or BINSTRING when longer than 255 bytes."""
    if len(text) < 256:
        return b"U" + bytes([len(text)]) + text
    return b"T" + struct.pack("<i", len(text)) + text


def _py2_int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    return b"J" + struct.pack("<i", value)


def py2_cifar_pickle(data: np.ndarray, labels: list, label_key: bytes = b"labels") -> bytes:
    """The bytes Python 2's cPickle (protocol 2, numpy 1.x) writes for a CIFAR batch dict, assembled opcode by
    opcode: the official files are such pickles, which Python 3 cannot write itself (it has no py2 ``str``)."""
    assert data.dtype == np.uint8 and data.ndim == 2
    rows, cols = data.shape
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\nq\x01"  # GLOBAL, BINPUT
        + b"cnumpy\nndarray\nq\x02" + _py2_int(0) + b"\x85" + _py2_string(b"b") + b"\x87R"  # (ndarray, (0,), 'b')
        + b"(" + _py2_int(1) + _py2_int(rows) + _py2_int(cols) + b"\x86"  # state: version 1, shape
        + b"cnumpy\ndtype\n" + _py2_string(b"u1") + _py2_int(0) + _py2_int(1) + b"\x87R"  # dtype('u1', 0, 1)
        + b"(" + _py2_int(3) + _py2_string(b"|") + b"NNN" + _py2_int(-1) + _py2_int(-1) + _py2_int(0) + b"tb"
        + b"\x89" + _py2_string(data.tobytes()) + b"tb"  # NEWFALSE (C order), raw data; BUILD
    )
    label_list = b"](" + b"".join(_py2_int(int(v)) for v in labels) + b"e"
    return (b"\x80\x02}(" + _py2_string(b"data") + array + _py2_string(label_key) + label_list
            + _py2_string(b"batch_label") + _py2_string(b"training batch 1 of 5") + b"u.")
