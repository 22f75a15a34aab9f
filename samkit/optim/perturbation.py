"""The SAM ascent step ε̂ (Foret et al. 2021, eq. 2; ASAM, Kwon et al. 2021): the only place samkit computes it.

For gradients g and 1/p + 1/q = 1, with T = diag(|w| + eta) when adaptive and T = I otherwise::

    g~ = T g
    ε~ = rho * sign(g~) * |g~|^(q-1) / ((||g~||_q^q)^(1/p) + eps)     # the dual-norm maximiser
    ε^ = T ε~                                                          # ||T^-1 ε^||_p = rho

    p = 2:   ε^ = rho * T² g / (||T g||_2 + eps)
    p = inf: ε^ = rho * T sign(T g)

The norm is global: it runs over every parameter (of every param group) that shares the same p, while rho,
adaptive and eta may differ per group. Numerics follow the most used PyTorch implementation: for p = 2 the
norm is the 2-norm of the stacked per-tensor 2-norms, and the stabiliser eps is added outside the norm.

Two implementations share these formulas: `torch._foreach_*` kernels (the fast path, a handful of kernel
launches for any number of tensors) and a plain per-tensor loop (the reference, also usable under
`torch.func.vmap`). Tests hold them equal.

With ``out=`` the result is written into tensors the caller owns instead of new ones, so a step allocates
nothing parameter-sized: ``SAM`` passes the parameters themselves, after saving them (a fresh ε̂ of every
parameter each step costs page faults on CPU, where freed large blocks go back to the OS; see BENCHMARKS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union, cast

import torch
from torch import Tensor

from samkit.optim import sharded
from samkit.optim.sharded import ShardLayout

TensorList = Union[list[Tensor], tuple[Tensor, ...]]  # what torch's foreach ops take; they return tuples
GROUP_OPTIONS = ("rho", "p", "adaptive", "eta")  # the per-param-group options of every SAM-family optimizer


def is_number(value) -> bool:
    """An int or float, not a bool: ``rho=True`` is a mistake, not 1."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_group_options(group: dict) -> None:
    """Raise ``ValueError`` naming the bad value when a param group's SAM options are out of range."""
    rho, p, eta = group["rho"], group["p"], group["eta"]
    if not is_number(rho) or not math.isfinite(rho) or rho < 0:
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
    if not is_number(p) or math.isnan(p) or p <= 1:
        raise ValueError(f"p must be > 1 (2 for SAM, float('inf') for the sign variant), got {p!r}")
    if not is_number(eta) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    if not isinstance(group["adaptive"], bool):
        raise ValueError(f"adaptive must be True or False, got {group['adaptive']!r}")


@dataclass
class PerturbationGroup:
    """Parameters and their gradients that share one set of SAM options (one param group)."""

    params: Sequence[Tensor]
    grads: Sequence[Tensor]
    rho: float
    p: float = 2.0
    adaptive: bool = False
    eta: float = 0.0

    @classmethod
    def from_param_group(
        cls, group: dict, params: Sequence[Tensor], grads: Sequence[Tensor], *, rho: Optional[float] = None
    ) -> PerturbationGroup:
        """The group's SAM options (``GROUP_OPTIONS``) with these params and grads; ``rho`` overrides the group's."""
        return cls(
            params,
            grads,
            rho=group["rho"] if rho is None else rho,
            p=group["p"],
            adaptive=group["adaptive"],
            eta=group["eta"],
        )


def dual_exponent(p: float) -> float:
    """q with 1/p + 1/q = 1 (q = 1 for p = inf)."""
    return 1.0 if math.isinf(p) else p / (p - 1.0)


def perturbation(
    groups: Sequence[PerturbationGroup],
    *,
    eps: float = 1e-12,
    foreach: bool = True,
    out: Optional[Sequence[Sequence[Tensor]]] = None,
    check_out: bool = True,
    shards: Optional[ShardLayout] = None,
    record: Optional[dict[str, Tensor]] = None,
) -> tuple[list[list[Tensor]], Optional[Tensor]]:
    """ε̂ for every gradient of every group, and the largest ||T g||_q over the p-classes.

    Returns ``(epsilons, norm)``: ``epsilons[i][j]`` matches ``groups[i].grads[j]``; ``norm`` is a 0-dim tensor
    (``None`` when there are no gradients) whose finiteness tells whether ε̂ is usable.

    ``out``, if given, holds one tensor per gradient (same nesting and shapes) that receives ε̂ in place,
    and ``epsilons`` is then ``out``. ``out`` may be the groups' ``params``: every read of a group's
    params and grads happens before its ``out`` is written (values are the same bit for bit either way).
    ``check_out=False`` skips the check of ``out``'s nesting and shapes, for a caller that built ``out`` from the
    parameters themselves (``SAM`` does: on 800 small tensors the check was a fifth of the ascent's time).

    Sharded tensors (DTensors, FSDP2): the math runs on this rank's shards and the norm is the WHOLE gradient's
    (``samkit.optim.sharded``); ε̂ and ``out`` are then local shards. ``shards`` is the layout for groups that
    the caller has already made local with ``sharded.local_groups``.

    ``record``, a dict, receives two 0-dim tensors for the step's diagnostics (``samkit.optim.step_stats``):
    ``"grad_norm"``, ||T g||_q (the largest over the p-classes), and ``"eps_norm"``, ||ε̂||_2 over every group.
    Where ε̂ is a multiple of the gradient (p = 2, not adaptive) its norm follows from the norms already taken,
    rho ||g_i|| / (||g|| + eps) per group, with no pass over the tensors; otherwise it is measured on ε̂ (one
    read of it).

    >>> g = PerturbationGroup(params=[torch.zeros(2)], grads=[torch.tensor([3.0, 4.0])], rho=0.5)
    >>> [e.tolist() for e in perturbation([g])[0][0]]
    [[0.30000001192092896, 0.4000000059604645]]
    """
    if shards is None and sharded.is_sharded([t for g in groups for t in g.grads[:1]]):  # cheap: first ones
        groups, shards = sharded.local_groups(groups)  # checks every tensor
        out = None if out is None else [[sharded.to_local(o) for o in targets] for targets in out]
    if out is not None and check_out:
        _check_out(groups, out)
    given, groups = groups, [_at_least_float32(g) for g in groups]  # fp16 / bf16 groups: their math in float32
    scaled = [_scaled_grads(g, foreach) if g.grads else [] for g in groups]  # T g per group
    epsilons: list[list[Tensor]] = [[] for _ in groups]
    norms: list[Tensor] = []
    sizes: list[Tensor] = []  # ||ε̂_i||_2 per group, for ``record``
    dual_norms: list[Tensor] = []  # ||T g||_q per p-class (for p = inf, norm holds only the largest 1-norm)
    for p in sorted({float(g.p) for g in groups}):
        members = [i for i, g in enumerate(groups) if float(g.p) == p and len(g.grads) > 0]
        if not members:
            continue
        q = dual_exponent(p)
        device = scaled[members[0]][0].device
        per_group = [_norms(scaled[i], q, foreach) for i in members]
        per_tensor = [n for norms_i in per_group for n in norms_i]
        if any(n.device != device for n in per_tensor):  # parameters on several devices (model parallel)
            per_tensor = [n.to(device) for n in per_tensor]
        stacked = torch.stack(per_tensor)
        if shards is not None:  # the norms of this rank's shards -> those of the whole tensors (one all-reduce)
            stacked = shards.whole_norms(stacked, q)
        if p == 2.0:
            norm = torch.linalg.vector_norm(stacked, 2)
            denominator = norm + eps
        elif math.isinf(p):
            norm = torch.linalg.vector_norm(stacked, math.inf)  # only for the finiteness check
            denominator = None
        else:
            norm = torch.linalg.vector_norm(stacked, q)
            denominator = norm.pow(q / p) + eps  # (||g~||_q^q)^(1/p)
        if denominator is not None and eps == 0.0:
            # without the stabiliser a zero gradient would give 0/0 = NaN; its ε̂ is 0 (a NaN norm stays NaN)
            denominator = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
        norms.append(norm)
        for i in members:
            target = None if out is None or groups[i] is not given[i] else list(out[i])
            epsilons[i] = _epsilon(groups[i], scaled[i], p, q, denominator, foreach, target)
        if record is not None:
            sizes.extend(_epsilon_sizes(groups, members, stacked, epsilons, norm, denominator, p, foreach, shards))
            dual_norms.append(torch.linalg.vector_norm(stacked, 1) if math.isinf(p) else norm)
    for i, group in enumerate(given):
        if groups[i] is not group and group.grads:  # computed in float32: back to the gradients' dtype
            epsilons[i] = _lowered(epsilons[i], group.grads, None if out is None else list(out[i]), foreach)
    norm = torch.stack([n.to(norms[0].device) for n in norms]).max() if norms else None
    if record is not None and norm is not None:
        record["grad_norm"] = dual_norms[0] if len(dual_norms) == 1 else _on(dual_norms, norm.device).max()
        record["eps_norm"] = sizes[0] if len(sizes) == 1 else torch.linalg.vector_norm(_on(sizes, norm.device))
    return epsilons, norm


def _on(tensors: list[Tensor], device: torch.device) -> Tensor:
    return torch.stack([t.to(device) for t in tensors])


def _epsilon_sizes(groups, members, whole_norms, epsilons, norm, denominator, p, foreach, shards) -> list[Tensor]:
    """||ε̂_i||_2 of each member group of one p-class (see ``record`` in ``perturbation``); ``whole_norms`` holds
    the members' per-tensor ||T g||_q in order, already over every shard. Under FSDP2 a measured ε̂ norm takes
    one all-reduce for the whole p-class."""
    sizes: list[Optional[Tensor]] = []
    measured: list[Tensor] = []  # this rank's per-tensor ||ε̂||_2 of the groups measured on ε̂
    spans: list[tuple[int, int, int]] = []  # (index in sizes, start, end) in measured
    start = 0
    for i in members:
        group, count = groups[i], len(groups[i].grads)
        if p == 2.0 and not group.adaptive:  # ε̂_i = (rho_i / denominator) g_i
            g_norm = norm if len(members) == 1 else torch.linalg.vector_norm(whole_norms[start : start + count])
            sizes.append(g_norm * (abs(group.rho) / denominator))
        else:
            local = [n.to(norm.device) for n in _norms(epsilons[i], 2.0, foreach)]
            spans.append((len(sizes), len(measured), len(measured) + len(local)))
            measured.extend(local)
            sizes.append(None)
        start += count
    if measured:
        stacked = torch.stack(measured)
        if shards is not None:
            stacked = shards.whole_norms(stacked, 2.0)
        for index, first, last in spans:
            sizes[index] = torch.linalg.vector_norm(stacked[first:last])
    return [cast(Tensor, size) for size in sizes]


LOW_PRECISION = frozenset({torch.float16, torch.bfloat16})  # ε̂ of these is computed in float32


def _at_least_float32(group: PerturbationGroup) -> PerturbationGroup:
    """The group itself, or, when it holds fp16 / bf16 tensors that ε̂ reads, a copy of it whose gradients (and
    weights, for the adaptive T) are float32 copies: in fp16 the norm overflows above 65504, rho / norm above
    65504 too (a norm below ~1e-5 at rho = 0.05), eps = 1e-12 rounds to 0 and T² above |w| = 256 overflows."""
    low_grads = any(g.dtype in LOW_PRECISION for g in group.grads)
    low_params = group.adaptive and any(t.dtype in LOW_PRECISION for t in group.params)
    if not (low_grads or low_params):
        return group

    def upcast(tensors: Sequence[Tensor]) -> list[Tensor]:
        return [t.float() if t.dtype in LOW_PRECISION else t for t in tensors]

    params = upcast(group.params) if low_params else group.params
    return PerturbationGroup(params, upcast(group.grads), group.rho, group.p, group.adaptive, group.eta)


def _lowered(
    epsilons: list[Tensor], grads: Sequence[Tensor], out: Optional[list[Tensor]], foreach: bool
) -> list[Tensor]:
    """ε̂ computed in float32, rounded once to the gradients' dtype (into ``out`` when given)."""
    if out is None:
        return [e.to(g.dtype) for e, g in zip(epsilons, grads)]
    return _copied_into(out, epsilons, foreach)


def at_least_float32(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The tensors, with float32 copies of the fp16 / bf16 ones: the variants' own norms and inner products (GSAM,
    LookSAM) are taken on these, as ε̂'s are above (squares overflow fp16 above 256 and vanish below ~1e-4)."""
    return [t.float() if t.dtype in LOW_PRECISION else t for t in tensors]


def _copied_into(out: list[Tensor], values: Sequence[Tensor], foreach: bool) -> list[Tensor]:
    """``out`` after copying ``values`` into it (cast to each out's dtype)."""
    if foreach:
        torch._foreach_copy_(out, list(values))
    else:
        for o, v in zip(out, values):
            o.copy_(v)
    return out


def _scale(group: PerturbationGroup, foreach: bool) -> Optional[TensorList]:
    """T = |w| + eta for adaptive groups, None (identity) otherwise."""
    if not group.adaptive:
        return None
    if foreach:
        t = torch._foreach_abs(list(group.params))
        if group.eta != 0.0:
            torch._foreach_add_(t, group.eta)
        return t
    return [w.abs() + group.eta if group.eta != 0.0 else w.abs() for w in group.params]


def _scaled_grads(group: PerturbationGroup, foreach: bool) -> TensorList:
    t = _scale(group, foreach)
    grads = list(group.grads)
    if t is None:
        return grads
    if foreach:
        return torch._foreach_mul(t, grads)
    return [ti * g for ti, g in zip(t, grads)]


def _norms(tensors: TensorList, q: float, foreach: bool) -> list[Tensor]:
    if foreach:
        return list(torch._foreach_norm(tensors, q))
    return [torch.linalg.vector_norm(t, q) for t in tensors]


def _epsilon(
    group: PerturbationGroup,
    scaled: TensorList,
    p: float,
    q: float,
    denominator: Optional[Tensor],
    foreach: bool,
    out: Optional[list[Tensor]] = None,
) -> list[Tensor]:
    # direction d = sign(g~)|g~|^(q-1); for p = 2 that is g~ itself, for p = inf sign(g~)
    t = _scale(group, foreach)
    factor = group.rho if denominator is None else group.rho / denominator
    if out is not None and p == 2.0 and t is None:
        # the default case without a temporary: out = g, then out *= factor (the same rounding as g * factor)
        if foreach:
            torch._foreach_copy_(out, list(group.grads))
            torch._foreach_mul_(out, factor)
        else:
            for o, g in zip(out, group.grads):
                o.copy_(g).mul_(factor)
        return out
    eps_hat = _epsilon_values(group, scaled, p, q, t, factor, foreach)
    if out is None:
        return eps_hat
    return _copied_into(out, eps_hat, foreach)


def _epsilon_values(group, scaled, p, q, t, factor, foreach) -> list[Tensor]:
    direction: TensorList
    eps_hat: TensorList
    if p == 2.0:
        if t is None:
            direction, t = list(group.grads), None
        elif foreach:  # T² g, in the order the common implementation multiplies (bit-exact with it)
            direction, t = torch._foreach_mul(torch._foreach_mul(t, t), list(group.grads)), None
        else:
            direction, t = [ti * ti * g for ti, g in zip(t, group.grads)], None
    elif math.isinf(p):
        direction = torch._foreach_sign(scaled) if foreach else [s.sign() for s in scaled]
    elif foreach:
        magnitude = torch._foreach_pow(torch._foreach_abs(scaled), q - 1)
        direction = torch._foreach_mul(torch._foreach_sign(scaled), magnitude)
    else:
        direction = [s.sign() * s.abs().pow(q - 1) for s in scaled]
    if foreach:
        eps_hat = torch._foreach_mul(direction, factor)
        if t is not None:
            torch._foreach_mul_(eps_hat, t)
        return list(eps_hat)
    eps_hat = [d * factor for d in direction]
    return eps_hat if t is None else [e * ti for e, ti in zip(eps_hat, t)]


def _check_out(groups: Sequence[PerturbationGroup], out: Sequence[Sequence[Tensor]]) -> None:
    if len(out) != len(groups):
        raise ValueError(f"out must hold one list per group ({len(groups)}), got {len(out)} lists")
    for i, (group, targets) in enumerate(zip(groups, out)):
        if len(targets) != len(group.grads):
            raise ValueError(
                f"out[{i}] must hold one tensor per gradient of group {i} ({len(group.grads)}), got {len(targets)}"
            )
        if [o.shape for o in targets] == [g.shape for g in group.grads]:
            continue
        j, o, g = next((j, o, g) for j, (o, g) in enumerate(zip(targets, group.grads)) if o.shape != g.shape)
        raise ValueError(f"out[{i}][{j}] must have the gradient's shape {tuple(g.shape)}, got {tuple(o.shape)}")
