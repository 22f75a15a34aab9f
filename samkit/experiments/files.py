"""Atomic writes for the files a user relies on (config, metrics, checkpoint, summary, reports).

Each writer puts the bytes in a temporary file in the same folder, flushes it to disk, then renames it
over the target with ``os.replace``, so a reader (or a run killed half-way) sees the old file or the new
one, never a torn one. Non-finite floats are written as Python's json writes them (NaN, Infinity), so a
diverged run's losses read back as floats:

    write tmp = path.tmp-<pid>;  fsync(tmp);  os.replace(tmp, path)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda handle: handle.write(text), "w")


def write_json(path: Path, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def read_json(path: Path) -> Any:
    with open(path) as handle:
        return json.load(handle)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_bytes_with(path: Path, save: Callable[[Any], None]) -> None:
    """Atomically write a binary file produced by ``save(handle)`` (e.g. ``torch.save`` or ``savefig``)."""
    _atomic_write(path, save, "wb")
