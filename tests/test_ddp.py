"""DDP: 2 replicas with half the batch each and k = 1 equal one process with k = 2 on the whole batch.

Each replica perturbs with its own gradient (the ascent runs under no_sync), and only the perturbed gradient is
all-reduced; so the replicas together compute exactly mSAM with one micro-batch per replica.
"""

from __future__ import annotations

import gc
import socket

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
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


def test_two_replicas_equal_two_micro_batches(tmp_path):
    mp.spawn(_replica, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for name, (_, (mode, k, interval)) in CASES.items():
        rank0 = torch.load(tmp_path / f"{name}-rank0.pt", weights_only=True)
        rank1 = torch.load(tmp_path / f"{name}-rank1.pt", weights_only=True)
        assert torch.equal(rank0, rank1), name
        expected = _single_process(micro_batches=k, mode=mode, interval=interval)
        assert (rank0 - expected).abs().max().item() <= 1e-10, name
        # and it is not plain SAM on the whole batch (the replicas really perturbed separately)
        whole = _single_process(micro_batches=1, mode="per_micro_batch", interval=interval)
        assert (rank0 - whole).abs().max().item() > 1e-6, name
