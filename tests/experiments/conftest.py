"""Shared tiny runs on the `synthetic` dataset (256 train / 128 test 8x8 images, 4 classes), and the distributed
runs of test_distributed.py and test_fsdp_train.py, trained in one torchrun launch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from samkit.experiments.config import TrainConfig
from samkit.experiments.trainer import train

TINY = TrainConfig(data="synthetic", model="mlp", epochs=2, batch_size=32, lr=0.05)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A finished 2-epoch SGD run: (folder, summary)."""
    out = tmp_path_factory.mktemp("runs") / "sgd"
    return out, train(TINY, out, device="cpu", quiet=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STEPS_PER_EPOCH = 256 // TINY.batch_size  # the synthetic set's 256 training examples
_COMMON = ["--data", "synthetic", "--model", "mlp", "--batch-size", str(TINY.batch_size), "--lr", str(TINY.lr),
           "--device", "cpu"]  # fmt: skip


def _distributed_jobs(folder: Path) -> list[dict[str, Any]]:
    """The commands of the distributed tests, in the order the ranks run them."""
    train = ["train", *_COMMON, "--optimizer"]
    fsdp = [*train, "sam", "--epochs", str(TINY.epochs), "--fsdp", "--out", str(folder / "fsdp")]
    return [
        # test_distributed: 2 ranks of SAM (each its own ε̂) against 1 process of mSAM with 2 micro-batches
        {"name": "sam", "argv": [*train, "sam", "--epochs", "1", "--out", str(folder / "ddp")]},
        # test_distributed: SAF's logits recorded by whichever rank saw an example
        {
            "name": "saf",
            "argv": [*train, "saf", "--option", "start_epoch=1", "--option", "delay=1", "--epochs", "2", "--out",
                     str(folder / "saf")],
        },  # fmt: skip
        # test_fsdp_train: stopped by Ctrl-C in epoch 2, then resumed
        {"name": "fsdp-stopped", "argv": fsdp, "stop_at": STEPS_PER_EPOCH + 2},
        {"name": "fsdp-resumed", "argv": [*fsdp, "--resume"]},
    ]


@dataclass(frozen=True)
class DistributedRuns:
    folder: Path
    launch: subprocess.CompletedProcess
    ranks: list[dict[str, dict[str, Any]]]  # per rank: job name -> returncode, stdout, stderr, checkpoint_epoch

    def job(self, name: str, rank: int = 0) -> dict[str, Any]:
        assert self.launch.returncode == 0, self.launch.stderr[-3000:]
        return self.ranks[rank][name]


@pytest.fixture(scope="session")
def distributed_runs(tmp_path_factory) -> DistributedRuns:
    """`torchrun --nproc_per_node 2` (CPU, gloo) running every distributed test's `samkit train` commands in turn:
    one start-up of torchrun and its two ranks for all of them (tests/experiments/torchrun_jobs.py)."""
    folder = tmp_path_factory.mktemp("torchrun")
    jobs = folder / "jobs.json"
    jobs.write_text(json.dumps(_distributed_jobs(folder)))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(Path(__file__).with_name("torchrun_jobs.py")), str(jobs),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    ranks = [
        json.loads(path.read_text()) if path.exists() else {}
        for path in (folder / f"RESULTS-{rank}.json" for rank in (0, 1))
    ]
    return DistributedRuns(folder, launch, ranks)
