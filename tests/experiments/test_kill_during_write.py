"""kill -9 in the middle of writing checkpoint.pt: the previous checkpoint stays whole, and --resume removes the
half-written temporary file and ends with the weights of an uninterrupted run."""

import signal
import subprocess
import sys

import torch

from samkit.cli import main
from samkit.experiments.checkpoint import load_checkpoint

TINY = ["--data", "synthetic", "--model", "mlp", "--epochs", "3", "--batch-size", "32", "--device", "cpu", "--quiet"]
TINY += ["--optimizer", "sam", "--threads", "1"]

# the child trains, and while writing epoch 2's checkpoint file it writes a few bytes and kills itself (SIGKILL: no
# handler, no cleanup, as a machine losing power or the OOM killer would)
CHILD = """
import os, signal, sys
import samkit.experiments.checkpoint as checkpoint
real_write, writes = checkpoint.write_bytes_with, []
def write(path, save):
    writes.append(path)
    if len(writes) == 3:  # epoch 0 (before training), epoch 1, then epoch 2: killed half-way
        def half(handle):
            handle.write(b"half a checkpoint")
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(path, half)
    return real_write(path, save)
checkpoint.write_bytes_with = write
from samkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_during_a_checkpoint_write_keeps_the_last_checkpoint_and_resumes_exactly(tmp_path):
    killed = tmp_path / "killed"
    child = subprocess.run([sys.executable, "-c", CHILD, "train", *TINY, "--out", str(killed)], timeout=300)
    assert child.returncode == -signal.SIGKILL
    assert load_checkpoint(killed / "checkpoint.pt")["epoch"] == 1  # the last whole checkpoint
    leftovers = [p.name for p in killed.iterdir() if p.name.startswith(".checkpoint.pt.tmp-")]
    assert len(leftovers) == 1, sorted(p.name for p in killed.iterdir())  # the half-written file

    assert main(["train", *TINY, "--out", str(killed), "--resume"]) == 0
    assert not [p for p in killed.iterdir() if p.name.startswith(".checkpoint.pt.tmp-")]
    whole = tmp_path / "whole"
    assert main(["train", *TINY, "--out", str(whole)]) == 0
    resumed, uninterrupted = load_checkpoint(killed)["model"], load_checkpoint(whole)["model"]
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
