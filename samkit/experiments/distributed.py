"""Data-parallel training under ``torchrun``: process group, device, and each rank's shard of a batch.

    torchrun --nproc_per_node N -m samkit train ...      (add --nnodes/--node_rank/--master_addr across machines)

    world = WORLD_SIZE processes, rank r = RANK; backend gloo on CPU, nccl on CUDA
    global batch B (--batch-size) -> rank r trains on the contiguous slice B[r*B/W : (r+1)*B/W]
    each rank computes its own perturbation from its local gradient (DDP no_sync in sam_step's first
    pass), only the second gradient is all-reduced: m-sharpness with m = B / W per rank,
    so W ranks x 1 micro-batch = 1 process x W micro-batches (Foret et al. 2021, sec. 4.1).
    rank 0 alone evaluates and writes the run's files.

Without torchrun (no WORLD_SIZE in the environment) this is a single process and nothing is initialised.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, batch: Tensor) -> Tensor:
        """This rank's contiguous slice of a global batch (of size divisible by world_size)."""
        if not self.distributed:
            return batch
        size = batch.shape[0] // self.world_size
        return batch[self.rank * size : (self.rank + 1) * size]

    def mean(self, value: float) -> float:
        """The mean of a per-rank number over all ranks."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.world_size

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_error(self, message: str) -> str:
        """Rank 0's message (empty when all is well) on every rank, so all ranks stop together."""
        if not self.distributed:
            return message
        box = [message]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; valid: {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device; use --device cpu or auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _world_rank_local() -> tuple[int, int, int]:
    """(WORLD_SIZE, RANK, LOCAL_RANK) as torchrun sets them; a lone RANK without WORLD_SIZE > 1 (left over in
    a cluster shell, say) is ignored, or a single process would think it is not rank 0 and write nothing."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 1, 0, 0
    return world_size, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True in a single process and on rank 0 under torchrun: the process that writes and prints."""
    return _world_rank_local()[1] == 0


def setup(device: str = "auto") -> Context:
    """Join the process group if torchrun started us, and pick this rank's device."""
    world_size, rank, local_rank = _world_rank_local()
    resolved = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    return Context(rank=rank, world_size=world_size, device=resolved)


def teardown(context: Context) -> None:
    if context.distributed and dist.is_initialized():
        # free the DDP model (its reducer) while the process group lives: a reducer outliving the group
        # aborted the process at exit ("terminate called without an active exception") in ~1 of 8 runs
        gc.collect()
        dist.destroy_process_group()
