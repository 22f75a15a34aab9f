"""Parameters sharded as DTensors (FSDP2's ``fully_shard``): their local shards, and whole-tensor norms from them.

Under FSDP2 every rank holds one shard of each parameter and of its (already averaged) gradient. The ascent is
elementwise apart from its norm, so it runs on the local shards ``to_local()`` with the plain ``torch._foreach_*``
kernels (DTensor has no sharding rule for some of them, e.g. ``_foreach_copy_``). The norm needs the whole
tensors: for each tensor, the q-th powers of its shards' q-norms summed over the ranks that shard it are the
q-th power of the whole tensor's q-norm, so ONE all-reduce of a vector with one entry per tensor turns the local
per-tensor norms into those of the whole tensors, and the rest of the norm is computed as in one process.

Supported: every tensor is a DTensor whose placements are Shard or Replicate, all on one device mesh and sharded
over the same mesh dimensions (what ``fully_shard`` gives, with or without a replicate dimension), or none is.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

Group = TypeVar("Group")  # samkit.optim.perturbation.PerturbationGroup (a dataclass with params and grads)


@dataclass(frozen=True)
class ShardLayout:
    """The device mesh of sharded tensors and the mesh dimensions over which they are split."""

    mesh: Any  # torch.distributed.device_mesh.DeviceMesh
    dims: tuple[int, ...]

    @classmethod
    def of(cls, t: DTensor) -> ShardLayout:
        partial = [p for p in t.placements if p.is_partial()]
        if partial:
            raise ValueError(
                f"a DTensor of shape {tuple(t.shape)} has a Partial placement {t.placements}: its values are not "
                "final; redistribute it to Shard or Replicate before the SAM step"
            )
        return cls(t.device_mesh, tuple(i for i, p in enumerate(t.placements) if p.is_shard()))

    def whole_norms(self, local_norms: Tensor, q: float) -> Tensor:
        """Per-tensor q-norms of the whole tensors, from those of this rank's shards (a 1-d tensor, one a tensor)."""
        if not self.dims:
            return local_norms
        total = local_norms.pow(q)
        for dim in self.dims:
            dist.all_reduce(total, group=self.mesh.get_group(dim))
        return total.pow(1.0 / q)

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` (computed from the local shards) summed in place over the ranks that share the tensors."""
        for dim in self.dims:
            dist.all_reduce(tensor, group=self.mesh.get_group(dim))
        return tensor


def is_sharded(tensors: Sequence[Optional[Tensor]]) -> bool:
    """Whether any of these tensors is a DTensor (by their few distinct types: a step's fast path checks this)."""
    return any(issubclass(kind, DTensor) for kind in {type(t) for t in tensors})


def layout(tensors: Sequence[Tensor]) -> Optional[ShardLayout]:
    """The one layout of these tensors (None when none is a DTensor); refuses, saying why, what it cannot reduce."""
    if not is_sharded(tensors):
        return None
    sharded = [t for t in tensors if isinstance(t, DTensor)]
    if len(sharded) != len(tensors):
        plain = next(t for t in tensors if not isinstance(t, DTensor))
        raise ValueError(
            f"the SAM step mixes DTensor (sharded) tensors with a plain tensor of shape {tuple(plain.shape)}: a "
            "global norm needs to know how every tensor is split; apply fully_shard to the root module too, so "
            "that every parameter is a DTensor"
        )
    first = ShardLayout.of(sharded[0])
    for t in sharded[1:]:
        other = ShardLayout.of(t)
        if other != first:
            raise ValueError(
                f"the sharded tensors sit on different device meshes or mesh dimensions ({first.mesh} over dims "
                f"{first.dims} vs {other.mesh} over dims {other.dims}): SAM reduces its norm over one mesh; shard "
                "every parameter the same way (one fully_shard mesh)"
            )
    return first


def to_local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise); in-place writes reach the DTensor."""
    return t.to_local() if isinstance(t, DTensor) else t


def local_groups(groups: Sequence[Group]) -> tuple[list[Group], Optional[ShardLayout]]:
    """The perturbation groups over this rank's shards, and the layout whose ``whole_norms`` completes their norms
    (the groups themselves and None when nothing is sharded)."""
    tensors = [t for g in groups for t in (*g.params, *g.grads)]  # type: ignore[attr-defined]
    found = layout(tensors)
    if found is None:
        return list(groups), None
    for g in groups:
        for w, d in zip(g.params, g.grads):  # type: ignore[attr-defined]
            if w.placements != d.placements:
                raise ValueError(
                    f"a parameter of shape {tuple(w.shape)} is split as {w.placements} but its gradient as "
                    f"{d.placements}: their shards must match elementwise for the ascent"
                )
    with torch.no_grad():
        local = [
            replace(g, params=[to_local(t) for t in g.params], grads=[to_local(t) for t in g.grads])  # type: ignore
            for g in groups
        ]
    return local, found
