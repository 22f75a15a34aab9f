"""LookSAM: a SAM step every k steps; in between one pass, with the last SAM step's "flat" direction reused.

Liu, Mai, Chen, Hsieh, You, "Towards Efficient and Scalable Sharpness-Aware Minimization", CVPR 2022,
arXiv 2203.02714. Step t, with g = ∇L_B(w)::

    t % k == 0:   g_s = ∇L_B(w + ε̂)                        # a SAM step (two passes)
                  g_v = g_s − (⟨g, g_s⟩ / ||g||²) g         # the part of g_s orthogonal to g, kept
                  w  <- base_optimizer.step(w, g_s)
    otherwise:    w  <- base_optimizer.step(w, g + α (||g|| / ||g_v||) g_v)   # one pass

Inner products and norms run over the whole gradient (all parameters together), as the paper writes them;
``layerwise=True`` takes them per parameter tensor instead (what the pytorch_optimizer implementation does).
``eps`` stabilises ||g_v|| (added outside the norm, as for ε̂); a zero g leaves g_s whole as g_v.

Source: the paper's rule, g_v = g_s − ||g_s|| cos θ · g / ||g|| with θ the angle between g and g_s (the
projection written above), and its reuse rule. No code by the authors was found; pytorch_optimizer's ``LookSAM``
(``pytorch_optimizer/optimizer/sam.py``) was read to know what it does: the same g_v and reuse rule but per tensor,
1e-8 added to ||g_v||, defaults ``k=10, alpha=0.7, rho=0.1``, and both passes on every step. Defaults here:
``k=5, alpha=0.7`` (the settings the paper is cited with; not checked against its full text), ``rho=0.05``
(SAM's).

Micro-batches (mSAM through ``sam_step``): g is the batch's clean gradient Σ_j (|B_j| / |B|) g_j and g_s the
accumulated perturbed gradient, so g_v is taken from the step as a whole. Under DistributedDataParallel, g is the
replica's own clean gradient (the ascent's, never all-reduced) while g_s is all-reduced, so every replica would keep
a different g_v and the replicas' weights drift apart on the one-pass steps: not supported there yet.
"""

from __future__ import annotations

import math
from typing import Any, Optional, cast

import torch
from torch import Tensor

from samkit.optim.perturbation import TensorList, at_least_float32
from samkit.optim.sam import SAM


class LookSAM(SAM):
    """LookSAM around any ``torch.optim`` optimizer (see the module docstring for the rule).

    Args:
        params, base_optimizer, rho, p, adaptive, eta, eps, foreach, restore_by, base_kwargs: as for ``SAM``.
        k: a SAM step every ``k`` steps (steps 0, k, 2k, ...); the others cost one forward-backward.
        alpha: α, the weight of the reused direction g_v on the one-pass steps (0 makes them plain base steps).
        layerwise: take ⟨g, g_s⟩, ||g|| and ||g_v|| per parameter tensor instead of over the whole gradient.

    g_v (one tensor per parameter) is saved in ``state_dict()``, so a resume inside a k-cycle continues exactly.

    Example::

        >>> model = torch.nn.Linear(3, 1)
        >>> opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.05, k=5, alpha=0.7, lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> torch.nn.functional.mse_loss(model(x), y).backward()
        >>> if opt.first_step(zero_grad=True):  # True on steps 0, 5, 10, ...
        ...     torch.nn.functional.mse_loss(model(x), y).backward()
        >>> opt.second_step(zero_grad=True)
    """

    uses_clean_gradient = True  # g_v is taken from g and g_s in _descend
    vectorizable = True  # _descend reads only .grad and the recorded clean gradient

    def __init__(
        self,
        params,
        base_optimizer,
        *,
        rho: float = 0.05,
        k: int = 5,
        alpha: float = 0.7,
        layerwise: bool = False,
        p: float = 2,
        adaptive: bool = False,
        eta: float = 0.0,
        eps: float = 1e-12,
        foreach: Optional[bool] = None,
        restore_by: str = "copy",
        **base_kwargs: Any,
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1 (a SAM step every k steps; 1 is SAM), got {k!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0 (the paper uses 0.7), got {alpha!r}")
        if not isinstance(layerwise, bool):
            raise ValueError(f"layerwise must be True or False, got {layerwise!r}")
        self.k = k
        self.alpha = float(alpha)
        self.layerwise = layerwise
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

    # ----------------------------------------------------------------------------------------------------------
    # hooks

    def _plan(self) -> Optional[bool]:
        return self._step.steps % self.k == 0

    def _descend(self, sam: bool) -> None:
        params = self._params()
        stored = self._stored()
        if sam:
            if self.k > 1:  # with k = 1 no step ever reuses g_v
                self._keep_orthogonal_part(params, stored)
            return
        pairs = cast(  # both present, by the filter
            list[tuple[Tensor, Tensor]],
            [(t.grad, stored[i]) for i, t in enumerate(params) if t.grad is not None and stored[i] is not None],
        )
        if pairs and self.alpha != 0.0:
            self._add_reused_direction([g for g, _ in pairs], [v for _, v in pairs])

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "k": self.k, "alpha": self.alpha, "layerwise": self.layerwise}

    # ----------------------------------------------------------------------------------------------------------
    # the variant's own math

    def _stored(self) -> list[Optional[Tensor]]:
        """g_v, one entry per parameter (None where the last SAM step gave it no gradient)."""
        return self._param_list("g_v")

    def _keep_orthogonal_part(self, params: list[Tensor], stored: list[Optional[Tensor]]) -> None:
        """g_v = g_s − (⟨g, g_s⟩ / ||g||²) g, from this step's clean gradient g and .grad = g_s (left as it is)."""
        clean = self._step.clean or [None] * len(params)
        index = [i for i, t in enumerate(params) if t.grad is not None and clean[i] is not None]
        for i in range(len(params)):
            stored[i] = None
        if not index:
            return
        g, gs = [clean[i] for i in index], cast(list[Tensor], [params[i].grad for i in index])  # index: grads exist
        g_wide, gs_wide = at_least_float32(g), at_least_float32(gs)  # the scalars of fp16 / bf16 in float32
        if self.foreach:
            dots = [t.sum() for t in torch._foreach_mul(g_wide, gs_wide)]
            norms = list(torch._foreach_norm(g_wide))
        else:
            dots = [(a * b).sum() for a, b in zip(g_wide, gs_wide)]
            norms = [torch.linalg.vector_norm(a) for a in g_wide]
        if self.layerwise:
            coefficients = [_ratio(dot, norm * norm) for dot, norm in zip(dots, norms)]
        else:
            norm = torch.linalg.vector_norm(torch.stack(norms))
            coefficient = _ratio(torch.stack(dots).sum(), norm * norm)
            coefficients = [coefficient] * len(g)
        g_v: TensorList
        if self.foreach:
            # one 0-dim tensor for all (global) takes the fused kernel; a list of them (layerwise) the per-tensor one
            parallel = torch._foreach_mul(g, coefficients if self.layerwise else coefficient)
            g_v = torch._foreach_sub(gs, parallel)
        else:
            g_v = [b - a * c for a, b, c in zip(g, gs, coefficients)]
        for i, v in zip(index, g_v):
            stored[i] = v

    def _add_reused_direction(self, grads: list[Tensor], g_v: list[Tensor]) -> None:
        """.grad = g + α (||g|| / (||g_v|| + eps)) g_v, in place."""
        grads_wide, g_v_wide = at_least_float32(grads), at_least_float32(g_v)  # fp16 / bf16 norms in float32
        if self.foreach:
            norms_g, norms_v = list(torch._foreach_norm(grads_wide)), list(torch._foreach_norm(g_v_wide))
        else:
            norms_g = [torch.linalg.vector_norm(t) for t in grads_wide]
            norms_v = [torch.linalg.vector_norm(t) for t in g_v_wide]
        if self.layerwise:
            factors = [_ratio(self.alpha * a, b + self.eps) for a, b in zip(norms_g, norms_v)]
        else:
            a, b = (torch.linalg.vector_norm(torch.stack(n)) for n in (norms_g, norms_v))
            factor = _ratio(self.alpha * a, b + self.eps)
            factors = [factor] * len(grads)
        if self.foreach:
            torch._foreach_add_(grads, torch._foreach_mul(g_v, factors if self.layerwise else factor))
        else:
            for t, v, f in zip(grads, g_v, factors):
                t.add_(v * f)


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, and 0 where the denominator is 0 (a zero gradient: nothing to project or rescale)."""
    safe = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    return torch.where(denominator == 0, torch.zeros_like(numerator), numerator / safe)
