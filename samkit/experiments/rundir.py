"""The output folder of a run: what it holds, and when an existing one may be reused.

    DIR/config.json    the resolved TrainConfig, plus what else changes the numbers: world_size (processes
                       under torchrun) and threads (torch CPU threads)
    DIR/checkpoint.pt  written atomically every epoch   DIR/summary.json   when training has finished
    DIR/metrics.jsonl  one line per epoch               DIR/curves.png     learning curves
    DIR/hessian.png    with --track-hessian             DIR/label_noise.json  which labels --label-noise flipped
    written later by `samkit evaluate / sharpness / landscape`: evaluation.json, corruptions.csv,
    sharpness.json, landscape.png (they describe the trained model, so --overwrite removes them too)
    DIR/.lock          while a command trains in DIR (holds its pid; the kernel frees it when the process dies)

A DIR with checkpoint.pt, summary.json or metrics.jsonl but no config.json is refused unless --overwrite.
An existing DIR with a config.json is
    refused        when its config differs from the new one (unless --overwrite), naming the differences;
    refused        when its config is the same but neither --resume nor --overwrite is given;
    read back      with --resume when it is finished (summary.json): its results are never rewritten;
    continued      with --resume from checkpoint.pt, only under the world size and thread count it was trained
                   with (both change the numbers; the world size changes SAM itself: each process perturbs
                   with its own gradient), and refused when checkpoint.pt is missing;
    cleared        with --overwrite (only the files above are removed), after every check has passed.

Two steps, so that nothing is deleted before the new run is known to be possible:
    plan  = inspect_run_dir(...)     reads only; raises RunDirError (a UsageError) naming the fix
    ...   (the trainer loads the data, builds the model and the optimizer: more checks)
    lock  = RunLock.acquire(out)     one command per folder; inspect again under the lock
    apply_plan(out, plan)            stale temporary files of killed writes removed; --overwrite deletes
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from samkit.experiments.errors import UsageError
from samkit.experiments.files import read_json

try:
    import fcntl
except ImportError:  # not POSIX: no lock (see RunLock)
    fcntl = None  # type: ignore[assignment]

CONFIG, METRICS, CHECKPOINT, SUMMARY = "config.json", "metrics.jsonl", "checkpoint.pt", "summary.json"
CURVES_PLOT, HESSIAN_PLOT, LABEL_NOISE = "curves.png", "hessian.png", "label_noise.json"
EVALUATION, CORRUPTIONS_CSV = "evaluation.json", "corruptions.csv"
DERIVED_FILES = (EVALUATION, CORRUPTIONS_CSV, "sharpness.json", "landscape.png")  # the last two: experiments.flatness
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, SUMMARY, CURVES_PLOT, HESSIAN_PLOT, LABEL_NOISE, *DERIVED_FILES)
LOCK = ".lock"
RUNTIME_KEYS = ("world_size", "threads", "fsdp")  # in config.json beside the TrainConfig's fields

NEW, RESUME, FINISHED, OVERWRITE = "new", "resume", "finished", "overwrite"


class RunDirError(UsageError):
    """The output folder cannot be used as asked."""


@dataclass(frozen=True)
class Plan:
    action: str  # NEW, RESUME (from ``checkpoint``), FINISHED (read summary.json back) or OVERWRITE
    checkpoint: Optional[Path] = None


def config_differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(wanted))
    return [f"{key}: {saved.get(key)!r} -> {wanted.get(key)!r}" for key in keys if saved.get(key) != wanted.get(key)]


def runtime_record(*, world_size: int, threads: int, fsdp: bool = False) -> dict[str, Any]:
    return {"world_size": int(world_size), "threads": int(threads), "fsdp": bool(fsdp)}


def check_runtime(out: Path, saved: dict[str, Any], runtime: dict[str, Any], *, cpu: bool = True) -> None:
    """Refuse to continue a run under another world size, or (on CPU) another thread count, than it was trained
    with: the resumed run would silently not be the run that was started. A missing record (an older run) passes."""
    world, now = saved.get("world_size"), runtime["world_size"]
    if world is not None and world != now:
        how = "one process (no torchrun)" if world == 1 else f"torchrun --nproc_per_node {world}"
        raise RunDirError(
            f"{out} was trained by {world} process(es) and this resume runs {now}: the world size is part of the "
            f"algorithm (each process perturbs SAM with its own gradient, and batch statistics are per process), so "
            f"the resumed run would be neither run; resume it as it was started ({how}), or pass --overwrite"
        )
    sharded, now_sharded = bool(saved.get("fsdp", False)), bool(runtime.get("fsdp", False))
    if sharded != now_sharded:
        then, this = ("with", "without") if sharded else ("without", "with")
        raise RunDirError(
            f"{out} was trained {then} --fsdp and this resume runs {this} it: the SAM family's ε̂ differs between the "
            f"two (the global batch's under FSDP2, each process's own under DDP); resume {then} --fsdp, or pass "
            "--overwrite"
        )
    threads, now = saved.get("threads"), runtime["threads"]
    if cpu and threads is not None and threads != now:
        raise RunDirError(
            f"{out} was trained with {threads} torch CPU thread(s) and this resume uses {now}: the thread count "
            f"changes how sums are rounded, so the resumed run would not end with the uninterrupted run's weights; "
            f"pass --threads {threads} (or --overwrite to start again)"
        )


def finished_summary(out: Path, epochs: int) -> Optional[dict[str, Any]]:
    """summary.json of a run that has ended (all epochs, or diverged), else None."""
    path = Path(out) / SUMMARY
    if not path.exists():
        return None
    summary = read_json(path)
    if summary.get("epochs_completed") == epochs or summary.get("status") == "diverged":
        return summary
    return None


def _check_out_path(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a folder: pick another path")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunDirError(f"--out {out} lies under {parent}, which is a file, not a folder: pick another path")
            break


def inspect_run_dir(
    out: Path, config: dict[str, Any], runtime: dict[str, Any], *, resume: bool, overwrite: bool, cpu: bool = True
) -> Plan:
    """What to do with ``out`` under the rules above; reads files only. Raises RunDirError naming the fix."""
    out = Path(out)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: pick one")
    _check_out_path(out)
    config_path = out / CONFIG
    if not config_path.exists():
        found = [name for name in (CHECKPOINT, SUMMARY, METRICS) if (out / name).exists()]
        if found and not overwrite:  # the remains of a run: never written over unasked
            raise RunDirError(
                f"{out} holds {', '.join(found)} but no config.json: pass --overwrite to replace it, or another --out"
            )
        return Plan(NEW)
    if overwrite:
        return Plan(OVERWRITE)
    try:
        saved = read_json(config_path)
    except ValueError as error:
        raise RunDirError(f"{config_path} is not readable JSON ({error}): pass --overwrite or another --out") from None
    differences = config_differences({k: v for k, v in saved.items() if k not in RUNTIME_KEYS}, config)
    if differences:
        raise RunDirError(
            f"{out} already holds a run with a different config ({'; '.join(differences)}): "
            "pass --overwrite to replace it, or choose another --out"
        )
    finished = finished_summary(out, config["epochs"])
    if not resume:
        state = "finished" if finished is not None else "unfinished"
        raise RunDirError(
            f"{out} already holds a {state} run with this config: pass --resume to continue it "
            "or --overwrite to start again"
        )
    if finished is not None:
        return Plan(FINISHED)
    checkpoint = out / CHECKPOINT
    if not checkpoint.exists():
        raise RunDirError(
            f"{out} holds an unfinished run (config.json, no summary.json) but no {CHECKPOINT} to continue from: "
            "pass --overwrite to train it again from the start"
        )
    check_runtime(out, saved, runtime, cpu=cpu)
    return Plan(RESUME, checkpoint)


def require_run(out: Path) -> None:
    """For ``--resume``: refuse a folder that holds no run, rather than start a new one there unasked."""
    out = Path(out)
    if (out / CONFIG).exists():
        return
    if not out.exists():
        state = "does not exist"
    elif out.is_dir() and not any(out.iterdir()):
        state = "is empty"
    else:
        state = f"has no {CONFIG}"
    raise RunDirError(
        f"--resume: {out} {state}, so there is no run to continue: check the path, or drop --resume to start "
        "a new run there"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[str]:
    """Remove ``.NAME.tmp-<pid>`` files that writes killed half-way left (their process is gone)."""
    removed = []
    for path in Path(out).glob(".*.tmp-*"):
        name, _, pid = path.name[1:].rpartition(".tmp-")
        if name not in RUN_FILES or not pid.isdigit():
            continue
        if int(pid) != os.getpid() and _alive(int(pid)):
            continue
        path.unlink(missing_ok=True)
        removed.append(path.name)
    return sorted(removed)


def apply_plan(out: Path, plan: Plan) -> list[str]:
    """Under the lock: remove stale temporary files, and with OVERWRITE the run's files. Returns what was removed."""
    out = Path(out)
    removed = remove_stale_temporaries(out)
    if plan.action == OVERWRITE:
        for name in RUN_FILES:
            if (out / name).exists():
                (out / name).unlink()
                removed.append(name)
    return removed


class RunLock:
    """An exclusive ``flock`` on DIR/.lock while a command trains in DIR; the file records ``pid N on HOST``.

    The kernel drops the lock when the process ends, however it ends (kill -9 included), so a lock left by a crash
    is stale and simply taken over. Where ``fcntl`` is missing (not POSIX) there is no lock."""

    def __init__(self, path: Path, fd: Optional[int]):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, out: Path) -> RunLock:
        out = Path(out)
        path = out / LOCK
        try:
            out.mkdir(parents=True, exist_ok=True)
            if fcntl is None:
                return cls(path, None)
            for _ in range(20):
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 200).decode(errors="replace").strip() or "pid unknown"
                    os.close(fd)
                    raise RunDirError(
                        f"{out} is in use by another samkit command ({holder}): two commands writing one folder "
                        "would mix their files; wait for it to end (or stop it), or choose another --out"
                    ) from None
                try:
                    current = os.stat(path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    current = False
                if current:  # not a file that its last holder unlinked while we opened it
                    os.ftruncate(fd, 0)
                    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
                    return cls(path, fd)
                os.close(fd)
        except OSError as error:
            raise RunDirError(
                f"cannot write in --out {out}: {error.strerror or error}: pick a folder you can write to"
            ) from error
        raise RunDirError(f"could not lock {path}: the lock file keeps changing; try again")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it, so nobody locks a file about to vanish
        finally:
            os.close(self.fd)
            self.fd = None
