"""DDP: 2 replicas with half the batch each and k = 1 equal one process with k = 2 on the whole batch.

Each replica perturbs with its own gradient (the ascent runs under no_sync), and only the perturbed gradient is
all-reduced; so the replicas together compute exactly mSAM with one micro-batch per replica.
"""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from samkit import SAM, sam_step
from tests.optim.reference import batch, loss_fn, mlp

STEPS = 3
OPTIONS = dict(rho=0.1, lr=0.1, momentum=0.9, weight_decay=5e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica(rank: int, world_size: int, port: int, out_dir: str, mode: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model = torch.nn.parallel.DistributedDataParallel(mlp())
        opt = SAM(model.parameters(), torch.optim.SGD, **OPTIONS)
        x, y = batch(n=24)
        half = slice(rank * 12, (rank + 1) * 12)
        for _ in range(STEPS):
            sam_step(opt, model, loss_fn, x[half], y[half], micro_batches=1, perturbation=mode)
        weights = torch.cat([p.detach().flatten() for p in model.module.parameters()])
        torch.save(weights, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _single_process(micro_batches: int, mode: str) -> torch.Tensor:
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, **OPTIONS)
    x, y = batch(n=24)
    for _ in range(STEPS):
        sam_step(opt, model, loss_fn, x, y, micro_batches=micro_batches, perturbation=mode)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_two_replicas_equal_two_micro_batches(tmp_path):
    mp.spawn(_replica, args=(2, _free_port(), str(tmp_path), "per_micro_batch"), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert torch.equal(rank0, rank1)
    expected = _single_process(micro_batches=2, mode="per_micro_batch")
    assert (rank0 - expected).abs().max().item() <= 1e-10
    # and it is not plain SAM on the whole batch (the replicas really perturbed separately)
    assert (rank0 - _single_process(micro_batches=1, mode="per_micro_batch")).abs().max().item() > 1e-6
