"""DDP: 2 replicas with half the batch each and k = 1 equal one process with k = 2 on the whole batch.

Each replica perturbs with its own gradient (the ascent runs under no_sync), and only the perturbed gradient is
all-reduced; so the replicas together compute exactly mSAM with one micro-batch per replica.
"""

from __future__ import annotations

import contextlib
import gc
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from samkit import SAM, sam_step
from tests.optim.reference import batch, loss_fn, mlp

STEPS = 3
OPTIONS = dict(rho=0.1, lr=0.1, momentum=0.9, weight_decay=5e-4)
# (perturbation, micro-batches per replica, interval) on 2 replicas -> the same on one process with the whole batch
CASES = {
    "k1": (("per_micro_batch", 1, 1), ("per_micro_batch", 2, 1)),  # the defining case: R replicas x 1 = 1 process x R
    "k2": (("per_micro_batch", 2, 1), ("per_micro_batch", 4, 1)),  # no all-reduce before the last micro-batch
    "shared": (("shared", 2, 1), ("per_micro_batch", 2, 1)),  # one ε per replica, from its own accumulated gradient
    "interval": (("per_micro_batch", 1, 2), ("per_micro_batch", 2, 2)),  # the skipped step is all-reduced
}


# Forked replicas inherit the imported torch and samkit; spawned ones start Python and import both again, which
# was 7 of the test's 10 s on 2 busy cores (forked: under 1 s). Spawn where fork is not the platform's default.
START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"
TIMEOUT_S = 120  # a replica that hangs (e.g. a collective no peer joins) fails the test instead of the whole run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # before any op: a forked child must not use the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        for name, ((mode, k, interval), _) in CASES.items():
            torch.save(_replica_weights(rank, mode, k, interval), f"{out_dir}/{name}-rank{rank}.pt")
    finally:
        gc.collect()  # no DDP reducer may outlive the process group: gloo would abort the process at exit
        dist.destroy_process_group()


def _replica_weights(rank: int, mode: str, k: int, interval: int) -> torch.Tensor:
    x, y = batch(n=24)
    half = slice(rank * 12, (rank + 1) * 12)
    model = torch.nn.parallel.DistributedDataParallel(mlp())
    opt = SAM(model.parameters(), torch.optim.SGD, interval=interval, **OPTIONS)
    for _ in range(STEPS):
        sam_step(opt, model, loss_fn, x[half], y[half], micro_batches=k, perturbation=mode)
    return torch.cat([p.detach().flatten() for p in model.module.parameters()])


def _single_process(micro_batches: int, mode: str, interval: int = 1) -> torch.Tensor:
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, interval=interval, **OPTIONS)
    x, y = batch(n=24)
    for _ in range(STEPS):
        sam_step(opt, model, loss_fn, x, y, micro_batches=micro_batches, perturbation=mode)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@contextlib.contextmanager
def _one_thread():
    # the references are tiny: on a busy 2-core machine OpenMP's hand-offs cost 100 times their arithmetic
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _run_replicas(world_size: int, out_dir: str) -> None:
    """All cases in one start of ``world_size`` replicas; a replica's error is raised here, a hang fails."""
    context = mp.start_processes(
        _replica, args=(world_size, _free_port(), out_dir), nprocs=world_size, join=False, start_method=START_METHOD
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world_size} DDP replicas did not finish within {TIMEOUT_S} s")


# Python >= 3.12 warns on any fork of a process with threads; the replicas take no lock a parent thread could
# hold (they start one-threaded, and a hang fails after TIMEOUT_S)
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_two_replicas_equal_two_micro_batches(tmp_path):
    _run_replicas(2, str(tmp_path))
    with _one_thread():
        whole = {i: _single_process(micro_batches=1, mode="per_micro_batch", interval=i) for i in (1, 2)}
        for name, (_, (mode, k, interval)) in CASES.items():
            rank0 = torch.load(tmp_path / f"{name}-rank0.pt", weights_only=True)
            rank1 = torch.load(tmp_path / f"{name}-rank1.pt", weights_only=True)
            assert torch.equal(rank0, rank1), name
            expected = _single_process(micro_batches=k, mode=mode, interval=interval)
            assert (rank0 - expected).abs().max().item() <= 1e-10, name
            # and it is not plain SAM on the whole batch (the replicas really perturbed separately)
            assert (rank0 - whole[interval]).abs().max().item() > 1e-6, name
