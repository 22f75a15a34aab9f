"""``samkit train --fsdp`` under torchrun: the model sharded by FSDP2 (``fully_shard``), full tensors in the files.

    torchrun --nproc_per_node N -m samkit train --fsdp ...

Every parameter (and the optimizer's state) is split over the N ranks; each rank trains on its slice of the
global batch and holds its shard of the global batch's gradient, so the SAM family's ε̂ comes from the GLOBAL
batch (``sam_step(..., perturbation="shared")``): N ranks equal one process on the whole batch, not mSAM as under
DDP (docs/fsdp.md). Checkpoints hold the full tensors, as a one-process run's do: the ranks gather them, rank 0
writes, and a resume shards them again. Evaluation runs on a plain copy of the model that holds the full weights.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from samkit.experiments.config import TrainConfig

# the methods --fsdp refuses, and why (each rank holds a shard of the weights and its slice of the global batch)
REFUSED = {
    "msam": "mSAM perturbs each micro-batch (and each rank) with its own gradient, but under FSDP2 the ranks share "
    "one sharded copy of the weights, all-gathered from every rank in each forward, so no rank can sit at its own "
    "w + ε̂; train mSAM with DDP (torchrun without --fsdp)",
    "esam": "ESAM ranks the examples of the batch by their losses, and under FSDP2 the ε̂ is the global batch's, "
    "whose examples no single rank holds; use DDP (each replica ranks its own examples)",
    "ksam": "K-SAM ranks the examples of the batch by their losses, and under FSDP2 the ε̂ is the global batch's, "
    "whose examples no single rank holds; use DDP (each replica ranks its own examples)",
    "mesa": "MESA keeps an EMA copy of the model for its teacher, which has not been made to follow FSDP2's sharding; "
    "use DDP",
    "saf": "SAF records each example's logits on the rank that saw it, which has not been made to follow FSDP2's "
    "sharding; use DDP",
}


def check_fsdp(config: TrainConfig, world_size: int) -> None:
    """Refuse, with the reason, a run --fsdp cannot train (before anything is written)."""
    if world_size < 2:
        raise ValueError(
            "--fsdp shards the model over torchrun's processes, but this is a single process: run it as "
            "torchrun --nproc_per_node N -m samkit train --fsdp ... (N >= 2), or drop --fsdp"
        )
    if config.optimizer in REFUSED:
        raise ValueError(f"--optimizer {config.optimizer} with --fsdp: {REFUSED[config.optimizer]}")
    if config.subspace is not None:
        raise ValueError(
            f"--subspace {config.subspace} with --fsdp: the line's network runs on weights interpolated from its two "
            "endpoints, which FSDP2's all-gather of the sharded parameters does not produce; train the line "
            "without --fsdp (one process, or DDP under torchrun)"
        )


def shard(model: nn.Module) -> nn.Module:
    """``fully_shard`` each child module that holds parameters, then the root (every parameter a DTensor)."""
    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child)
    fully_shard(model)
    return model


def plain_copy(model: nn.Module) -> nn.Module:
    """An unsharded copy of ``model`` (call before ``shard``): evaluation runs on it, with the gathered weights."""
    return copy.deepcopy(model)


def full(value: Any) -> Any:
    """``value`` with every DTensor replaced by its full tensor (a collective: every rank calls it alike)."""
    if isinstance(value, DTensor):
        return value.full_tensor()
    if isinstance(value, dict):
        return {k: full(v) for k, v in value.items()}
    if isinstance(value, list):
        return [full(v) for v in value]
    if isinstance(value, tuple):
        return tuple(full(v) for v in value)
    return value


def sharded_model_state(model: nn.Module, state: dict) -> dict:
    """A full model state dict with each tensor that the sharded ``model`` holds as a DTensor split like it."""
    mine = model.state_dict()
    return {k: _like(v, mine[k]) if k in mine else v for k, v in state.items()}


def sharded_optimizer_state(state: dict, params: list[Tensor]) -> dict:
    """A full optimizer state dict (as ``full`` saved it) with each parameter-shaped tensor split like its parameter:
    the base optimizer's per-parameter state and the SAM family's per-parameter lists."""
    state = dict(state)
    state["state"] = {
        i: {k: _like(v, params[int(i)]) for k, v in entry.items()} for i, entry in state.get("state", {}).items()
    }
    if "sam" in state:
        sam = dict(state["sam"])
        memory = dict(sam.get("memory", {}))
        for key, value in memory.items():
            if isinstance(value, list) and len(value) == len(params):
                memory[key] = [_like(v, t) for v, t in zip(value, params)]
        sam["memory"] = memory
        state["sam"] = sam
    return state


def _like(value: Any, param: Tensor) -> Any:
    if isinstance(param, DTensor) and isinstance(value, Tensor) and value.shape == param.shape:
        # every rank holds the full tensor: each keeps its own shard, nothing is sent
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return value
