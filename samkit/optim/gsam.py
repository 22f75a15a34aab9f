"""GSAM: Surrogate Gap Guided Sharpness-Aware Minimization (Zhuang, Gong, Yuan, Cui, Adam, Dvornek, Tatikonda,
Duncan, Liu; ICLR 2022, arXiv 2203.08065).

One step, with ⟨·,·⟩ and ||·|| global over all parameters::

    g    = ∇L(w)                                  # clean pass, kept for the descent
    ε̂    = rho_t g / (||g|| + eps)                 # SAM's ascent (samkit.optim.perturbation)
    g_s  = ∇L(w + ε̂)                               # perturbed pass
    g_⊥  = g − ⟨g, ĝ_s⟩ ĝ_s,   ĝ_s = g_s / (||g_s|| + eps)
    d    = g_s − alpha g_⊥                         # minimises the perturbed loss and, orthogonally, the surrogate gap
    w    <- base_optimizer.step(w, d)

    rho_t = rho                                   (default: constant)
    rho_t = rho_min + (rho − rho_min) (lr_t − lr_min) / (lr_max − lr_min)   (given rho_min, lr_max, lr_min)

Sources. The authors' code: google-research/big_vision ``big_vision/trainers/proj/gsam/gsam.py`` (the official
JAX code, its default ``minimize_fp=True``: the original GSAM) and juntang-zhuang/GSAM ``gsam/gsam.py`` (their
PyTorch port). Both descend along ``g_s − alpha · g_⊥`` with g_⊥ the part of the CLEAN gradient orthogonal to
g_s (the sign above); big_vision reads rho_t off the learning rate as above, the port's ``ProportionScheduler``
likewise. Choices where they differ:

- The stabiliser. big_vision has none in the decomposition (ĝ_s = g_s / ||g_s||); the port puts one in the
  cosine's denominator and one more in ``||g_s|| + eps``. Here eps is added once, outside the norm, as in the
  ascent; for nonzero gradients the three agree to ~eps / ||g_s||, and a zero g_s gives g_⊥ = g, not NaN.
- The schedule outside [lr_min, lr_max] (a warm-up from 0, say): big_vision extrapolates, which can make
  rho_t negative (an ascent that descends); here rho_t is clamped to [rho_min, rho].
- alpha: neither code has a default. big_vision's ImageNet ViT config uses 0.6 (with rho 0.6 -> 0.1); the
  port's CIFAR example (SGD, a wide ResNet) uses 0.2, the default here.
- ``adaptive=True`` is samkit's ASAM ball, which is the port's ``adaptive`` (eta = 0). big_vision's
  ``adaptive_perturbation`` (ε̂ = |w| rho g / (||g|| + eps)) is not offered, nor its ``minimize_fp=False``.
- rho defaults to 0.05, SAM's: the paper tunes rho (rho_max) per model, and neither code has a default.

With alpha = 0 and a constant rho, GSAM is SAM step for step.

Under DDP, ``sam_step`` ascends from each replica's own clean gradient and all-reduces only g_s; a different
g on each replica would give each its own g_⊥, and the replicas' weights would drift apart. So when the
replicas hold the same g_s but different g, the descent uses the replicas' mean g (one 4-number all-reduce per
step decides; the gradient-sized one runs only then): 2 replicas x 1 micro-batch are 1 process x 2.
"""

from __future__ import annotations

import math
from typing import Any, Optional, cast

import torch
from torch import Tensor

from samkit.optim import sharded
from samkit.optim.perturbation import at_least_float32
from samkit.optim.sam import SAM


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class GSAM(SAM):
    """Surrogate Gap Guided SAM around any ``torch.optim`` optimizer: SAM's two passes, descent along g_s − α g_⊥.

    Args:
        params, base_optimizer, p, adaptive, eta, eps, foreach, restore_by, **base_kwargs: as for ``samkit.SAM``.
        rho: the radius (rho_max of the paper when the schedule is on; a param group may carry its own).
        alpha: weight of the ascent along g_⊥, the part of the clean gradient orthogonal to g_s (0: SAM).
        rho_min, lr_max, lr_min: give all three to tie rho to the learning rate: rho_t goes linearly from
            ``rho`` at ``lr = lr_max`` to ``rho_min`` at ``lr = lr_min``, read from each param group's current
            ``lr`` at every step, so any LR scheduler drives it (clamped to [rho_min, rho] outside that range).

    Example::

        >>> model = torch.nn.Linear(3, 1)
        >>> opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.05, alpha=0.2, lr=0.1,
        ...            rho_min=0.01, lr_max=0.1, lr_min=0.001)
        >>> scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=0.001)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> torch.nn.functional.mse_loss(model(x), y).backward()
        >>> if opt.first_step(zero_grad=True):
        ...     torch.nn.functional.mse_loss(model(x), y).backward()
        >>> opt.second_step(zero_grad=True)
        >>> scheduler.step()
    """

    uses_clean_gradient = True

    def __init__(
        self,
        params,
        base_optimizer,
        *,
        rho: float = 0.05,
        alpha: float = 0.2,
        rho_min: Optional[float] = None,
        lr_max: Optional[float] = None,
        lr_min: Optional[float] = None,
        p: float = 2,
        adaptive: bool = False,
        eta: float = 0.0,
        eps: float = 1e-12,
        foreach: Optional[bool] = None,
        restore_by: str = "copy",
        **base_kwargs: Any,
    ) -> None:
        if not _finite_number(alpha) or alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0 (0 gives SAM), got {alpha!r}")
        schedule: dict[str, Any] = {"rho_min": rho_min, "lr_max": lr_max, "lr_min": lr_min}
        given = [k for k, v in schedule.items() if v is not None]
        if given and len(given) < 3:
            missing = [k for k in schedule if k not in given]
            raise ValueError(
                f"the rho schedule needs rho_min, lr_max and lr_min together; got {given} without {missing}: give "
                "all three (rho then is the value at lr_max), or none for a constant rho"
            )
        if given:
            for name in ("rho_min", "lr_max", "lr_min"):
                if not _finite_number(schedule[name]) or schedule[name] < 0:
                    raise ValueError(f"{name} must be a finite number >= 0, got {schedule[name]!r}")
            if not cast(float, lr_max) > cast(float, lr_min):  # both given: checked above
                raise ValueError(
                    f"lr_max must be > lr_min, got lr_max={lr_max!r}, lr_min={lr_min!r}: pass the schedule's peak and "
                    "final learning rates (for a constant learning rate, leave the schedule out)"
                )
        super().__init__(
            params,
            base_optimizer,
            rho=rho,
            p=p,
            adaptive=adaptive,
            eta=eta,
            eps=eps,
            foreach=foreach,
            restore_by=restore_by,
            **base_kwargs,
        )
        self.alpha = float(alpha)
        self.rho_min = None if rho_min is None else float(rho_min)
        self.lr_max = None if lr_max is None else float(lr_max)
        self.lr_min = None if lr_min is None else float(lr_min)
        if self.rho_min is not None:
            for group in self.param_groups:
                if self.rho_min > group["rho"]:
                    raise ValueError(
                        f"rho_min must be <= rho (rho is the value at lr_max), got rho_min={rho_min!r} and a param "
                        f"group with rho={group['rho']!r}"
                    )

    def _options(self) -> dict[str, Any]:
        return {
            **super()._options(),
            "alpha": self.alpha,
            "rho_min": self.rho_min,
            "lr_max": self.lr_max,
            "lr_min": self.lr_min,
        }

    def _group_rho(self, group: dict) -> float:
        rho = group["rho"]
        if self.rho_min is None:
            return rho
        lr_min, lr_max = cast(float, self.lr_min), cast(float, self.lr_max)  # set with rho_min (checked in __init__)
        fraction = (float(group["lr"]) - lr_min) / (lr_max - lr_min)
        low, high = min(self.rho_min, rho), max(self.rho_min, rho)
        return min(max(self.rho_min + (rho - self.rho_min) * fraction, low), high)

    def _descend(self, sam: bool) -> None:
        clean = self._step.clean
        if not sam or clean is None:
            return  # a one-pass step: the base optimizer gets g as it is
        perturbed, kept = [], []
        for t, g in zip(self._params(), clean):
            if t.grad is not None:
                perturbed.append(t.grad)
                kept.append(torch.zeros_like(t.grad) if g is None else g)
        if not perturbed:
            return
        shards = sharded.layout(perturbed + kept)  # FSDP2: the math on each rank's shards, sums over all ranks
        perturbed, kept = [sharded.to_local(t) for t in perturbed], [sharded.to_local(t) for t in kept]
        perturbed_wide, kept_wide = at_least_float32(perturbed), at_least_float32(kept)  # fp16 / bf16 in float32
        norm = self._global_norm(perturbed_wide, shards)
        # d = g_s − α (g − c g_s) = (1 + α c) g_s − α g with c = ⟨g, g_s⟩ / (||g_s|| + eps)²: in place, no temporary
        inner = torch.stack([torch.vdot(g.reshape(-1), s.reshape(-1)) for g, s in zip(kept_wide, perturbed_wide)]).sum()
        if shards is not None:
            inner = shards.all_reduce_sum(inner)
        denominator = (norm + self.eps) ** 2
        denominator = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
        scale = 1.0 + self.alpha * (inner / denominator)
        if self.foreach:
            torch._foreach_mul_(perturbed, scale)
            torch._foreach_add_(perturbed, kept, alpha=-self.alpha)
        else:
            for s, g in zip(perturbed, kept):
                s.mul_(scale).add_(g, alpha=-self.alpha)

    def _global_norm(self, tensors: list[Tensor], shards: Optional[sharded.ShardLayout] = None) -> Tensor:
        if self.foreach:
            norms = torch.stack(list(torch._foreach_norm(tensors)))
        else:
            norms = torch.stack([torch.linalg.vector_norm(t) for t in tensors])
        if shards is not None:
            norms = shards.whole_norms(norms, 2.0)
        return torch.linalg.vector_norm(norms, 2)
