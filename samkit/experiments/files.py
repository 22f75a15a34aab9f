"""Atomic writes for the files a user relies on (config, metrics, checkpoint, summary, reports).

Each writer puts the bytes in a temporary file in the same folder, flushes it to disk, then renames it
over the target with ``os.replace``, so a reader (or a run killed half-way) sees the old file or the new
one, never a torn one. Non-finite floats are written as Python's json writes them (NaN, Infinity), so a
diverged run's losses read back as floats:

    write tmp = path.tmp-<pid>;  fsync(tmp);  os.replace(tmp, path)

Ctrl-C during such a write is held back until the write is done, then raised: an interrupted command leaves
the new file whole (and says so), instead of an error from deep inside the writer. A failed write (disk full,
read-only folder) raises OSError naming the target file, and leaves no temporary file behind.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold SIGINT back during the block and deliver it after (main thread only; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    if previous is None:  # installed outside Python: put Python's default back
        previous = signal.default_int_handler
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)  # to the handler that was in place: KeyboardInterrupt by default


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with interrupts_held():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, mode) as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as error:
            if error.errno is None:
                raise
            raise OSError(error.errno, error.strerror, str(path)) from error
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
