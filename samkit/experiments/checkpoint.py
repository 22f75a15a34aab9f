"""Checkpoints that make a resumed run end with exactly the weights of an uninterrupted one.

What a run's future depends on, and where it lives in the checkpoint:

    weights, BN statistics       model            (the unwrapped module's state_dict)
    momentum / Adam moments      optimizer        (SAM's state_dict carries its base optimizer's)
    fp16 loss scale              scaler
    learning rate                (derived)        schedule.lr_factor(step): no scheduler state to save
    data order, augmentation     (derived)        generators seeded from (seed, epoch) at each epoch start
    dropout and other global RNG rng              torch (and CUDA), numpy and python ``random`` states
    the training labels          train_labels     after label noise / bootstrap relabelling
    history                      metrics, epoch, step, wall_seconds

The file is serialized in memory, then written atomically (temp file + os.replace; Ctrl-C waits for the write
to end, see files.py), so a failed write is a plain OSError naming the file. It loads with
``torch.load(weights_only=True)``: only tensors, numbers, strings, lists and dicts go in.
"""

from __future__ import annotations

import io
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samkit.experiments.files import interrupts_held, write_bytes_with

CHECKPOINT_VERSION = 1


def capture_rng_state() -> dict[str, Any]:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    python_version, python_state, python_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": python_version, "state": list(python_state), "gauss": python_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (plus the RNG states and a version) atomically to ``path``."""
    payload = {"version": CHECKPOINT_VERSION, "rng": capture_rng_state(), **state}
    with interrupts_held():  # Ctrl-C inside torch.save's writer would surface as a RuntimeError from C++
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        write_bytes_with(Path(path), lambda handle: handle.write(buffer.getbuffer()))


def load_checkpoint(path: Path, *, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; raise ValueError if it is not one."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: pass a run folder or its checkpoint.pt")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(
            f"{path} is not a readable samkit checkpoint: it is empty (0 bytes), so a copy or a write outside samkit "
            "was cut off (samkit replaces a checkpoint only by a whole one); give a run's folder or its checkpoint.pt"
        )
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            start = handle.read(16)
        raise ValueError(
            f"{path} is not a readable samkit checkpoint: not a torch.save zip file (it starts with {start!r}, "
            f"{size} bytes): give a run's folder or its checkpoint.pt"
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which and why
        why = str(error).strip().splitlines()[0] if str(error).strip() else "no message"
        raise ValueError(f"{path} is not a readable samkit checkpoint: {type(error).__name__}: {why}") from error
    if not isinstance(payload, dict) or payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is not a samkit checkpoint (version {CHECKPOINT_VERSION} expected)")
    return payload
