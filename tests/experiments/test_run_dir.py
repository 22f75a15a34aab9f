"""The run folder loses nothing and is never silently wrong: checks before deletion, refused resumes, the lock,
stale temporary files, write failures and Ctrl-C during a checkpoint write."""

import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from samkit.experiments import files as files_module
from samkit.experiments import rundir
from samkit.experiments import trainer as trainer_module
from samkit.experiments.checkpoint import load_checkpoint
from samkit.experiments.errors import OutputError, UsageError
from samkit.experiments.rundir import RunDirError, RunLock
from samkit.experiments.trainer import TrainingInterrupted, train
from samkit.experiments.training import checkpointing

from .conftest import TINY

STEPS = 256 // TINY.batch_size  # steps per epoch of TINY on synthetic


def contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def interrupted_run(out, monkeypatch, config=TINY):
    """A run stopped by Ctrl-C in its second epoch: checkpoint.pt holds epoch 1."""
    real_step, calls = trainer_module.train_step, []

    def stop_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == STEPS + 1:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", stop_in_epoch_two)
    with pytest.raises(TrainingInterrupted, match="holds epoch 1"):
        train(config, out, device="cpu", quiet=True, plot=False)
    monkeypatch.setattr(trainer_module, "train_step", real_step)
    return out


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_overwrite_deletes_nothing_when_a_later_check_refuses_the_new_run(finished_run, tmp_path):
    out, _ = finished_run
    before = contents(out)
    # a batch larger than the data is found only once the data is loaded
    with pytest.raises(UsageError, match="batch_size=32 is larger than the 10 training examples"):
        train(TINY.replace(subset=10), out, device="cpu", quiet=True, plot=False, overwrite=True)
    with pytest.raises(UsageError, match="unknown model 'vit'"):
        train(TINY.replace(model="vit"), out, device="cpu", quiet=True, plot=False, overwrite=True)
    assert contents(out) == before


def test_a_resume_under_another_world_size_is_refused_naming_both(tmp_path, monkeypatch):
    out = interrupted_run(tmp_path / "run", monkeypatch)
    assert json.loads((out / "config.json").read_text())["world_size"] == 1
    assert load_checkpoint(out)["world_size"] == 1
    # the records a 2-process (torchrun) run writes, in config.json and in the checkpoint
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "world_size": 2}))
    with pytest.raises(RunDirError, match=r"trained by 2 process\(es\) and this resume runs 1.*nproc_per_node 2"):
        train(TINY, out, device="cpu", quiet=True, plot=False, resume=True)
    (out / "config.json").write_text(json.dumps(config))  # an older config.json without the record:
    payload = load_checkpoint(out)  # the checkpoint's own record still refuses
    torch.save({**payload, "world_size": 2}, out / "checkpoint.pt")
    with pytest.raises(RunDirError, match=r"trained by 2 process\(es\) and this resume runs 1"):
        train(TINY, out, device="cpu", quiet=True, plot=False, resume=True)
    assert load_checkpoint(out)["epoch"] == 1 and not (out / "summary.json").exists()


def test_the_thread_count_is_recorded_and_a_resume_with_another_is_refused(tmp_path, monkeypatch, one_thread):
    out = interrupted_run(tmp_path / "run", monkeypatch)
    assert json.loads((out / "config.json").read_text())["threads"] == 1
    torch.set_num_threads(2)
    with pytest.raises(RunDirError, match=r"trained with 1 torch CPU thread\(s\) and this resume uses 2.*--threads 1"):
        train(TINY, out, device="cpu", quiet=True, plot=False, resume=True)
    torch.set_num_threads(1)
    summary = train(TINY, out, device="cpu", quiet=True, plot=False, resume=True)
    assert summary["epochs_completed"] == 2 and summary["threads"] == 1 and summary["world_size"] == 1


def test_resume_without_a_checkpoint_never_starts_again_silently(finished_run, tmp_path, monkeypatch):
    out = interrupted_run(tmp_path / "run", monkeypatch)
    (out / "checkpoint.pt").unlink()
    before = contents(out)
    with pytest.raises(RunDirError, match="unfinished run .* but no checkpoint.pt to continue from: pass --overwrite"):
        train(TINY, out, device="cpu", quiet=True, plot=False, resume=True)
    assert contents(out) == before
    # a finished run without its checkpoint is read back, its results untouched
    finished, summary = finished_run
    copy = tmp_path / "finished"
    copy.mkdir()
    for name in ("config.json", "metrics.jsonl", "summary.json"):
        (copy / name).write_bytes((finished / name).read_bytes())
    before = contents(copy)
    assert train(TINY, copy, device="cpu", quiet=True, plot=False, resume=True) == summary
    assert contents(copy) == before
    (copy / "config.json").unlink()  # what is left of a run is not written over either
    with pytest.raises(RunDirError, match="holds summary.json, metrics.jsonl but no config.json: pass --overwrite"):
        train(TINY, copy, device="cpu", quiet=True, plot=False)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporary_files_of_killed_writes_are_removed_by_resume_and_overwrite(tmp_path, monkeypatch):
    out = interrupted_run(tmp_path / "run", monkeypatch)
    dead = _dead_pid()
    stale = [out / f".checkpoint.pt.tmp-{dead}", out / f".metrics.jsonl.tmp-{dead}"]
    alive = out / f".summary.json.tmp-{os.getppid()}"  # a live process's write in progress is left alone
    for path in (*stale, alive):
        path.write_bytes(b"half a file")
    train(TINY, out, device="cpu", quiet=True, plot=False, resume=True)
    assert not any(p.exists() for p in stale) and alive.exists()
    alive.unlink()
    stale[0].write_bytes(b"half a file")
    train(TINY, out, device="cpu", quiet=True, plot=False, overwrite=True)
    assert not stale[0].exists()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl", "summary.json"]


def test_a_folder_in_use_is_refused_and_a_lock_left_by_a_crash_is_taken_over(tmp_path):
    out = tmp_path / "run"
    lock = RunLock.acquire(out)
    try:
        with pytest.raises(RunDirError, match=rf"{out} is in use by another samkit command \(pid {os.getpid()} on "):
            train(TINY, out, device="cpu", quiet=True, plot=False)
    finally:
        lock.release()
    assert list(out.iterdir()) == []
    (out / rundir.LOCK).write_text(f"pid {_dead_pid()} on somewhere\n")  # the file a killed command leaves
    assert train(TINY, out, device="cpu", quiet=True, plot=False)["epochs_completed"] == 2
    assert not (out / rundir.LOCK).exists()


def _failing_open(name, error):
    """``open`` for samkit.experiments.files whose handles fail to write files called ``name``."""

    class Failing:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def write(self, data):
            raise OSError(error, os.strerror(error))

        def __getattr__(self, attribute):
            return getattr(self.handle, attribute)

    def fake_open(path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)
        return Failing(handle) if os.path.basename(path).startswith(f".{name}.tmp-") else handle

    return fake_open


def test_a_full_disk_is_a_clear_error_and_the_checkpoint_stays_whole(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_checkpoint, saves = checkpointing.write_checkpoint, []

    def disk_full_at_epoch_two(state, *args):
        saves.append(state.epoch)
        if state.epoch == 2:
            monkeypatch.setattr(files_module, "open", _failing_open("checkpoint.pt", errno.ENOSPC), raising=False)
        return real_checkpoint(state, *args)

    monkeypatch.setattr(checkpointing, "write_checkpoint", disk_full_at_epoch_two)
    with pytest.raises(OutputError) as failed:
        train(TINY, out, device="cpu", quiet=True, plot=False)
    message = str(failed.value)
    assert f"cannot write {out / 'checkpoint.pt'}: No space left on device" in message
    assert "checkpoint.pt holds epoch 1 and is whole" in message and "--resume" in message
    assert load_checkpoint(out)["epoch"] == 1
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    monkeypatch.undo()
    assert train(TINY, out, device="cpu", quiet=True, plot=False, resume=True)["epochs_completed"] == 2


def test_ctrl_c_during_a_checkpoint_write_finishes_the_write_then_stops(tmp_path, monkeypatch):
    real_save, writes = torch.save, []

    class SignalsWhileWriting:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            writes.append(len(data))
            if len(writes) == 3:  # in the middle of the zip stream
                os.kill(os.getpid(), signal.SIGINT)
            return self.handle.write(data)

        def __getattr__(self, attribute):
            return getattr(self.handle, attribute)

    def save(payload, handle, *args, **kwargs):
        if payload.get("epoch") == 1:
            return real_save(payload, SignalsWhileWriting(handle), *args, **kwargs)
        return real_save(payload, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(TrainingInterrupted, match="holds epoch 1") as stopped:
        train(TINY, tmp_path / "run", device="cpu", quiet=True, plot=False)
    assert len(writes) > 3 and stopped.value.checkpoint_epoch == 1
    assert load_checkpoint(tmp_path / "run")["epoch"] == 1  # the interrupted write was finished, whole
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp-" in p.name]
