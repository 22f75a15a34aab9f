"""Friendly SAM (F-SAM): the ascent along the current gradient minus an EMA of past gradients.

Li, Zhou, He, Cheng, Huang, "Friendly Sharpness-Aware Minimization", CVPR 2024, arXiv 2403.12350. One step::

    g   = ∇L_B(w)
    d   = g − σ m_{t−1}                  # d = g on the first step (no m yet)
    m_t = λ m_{t−1} + (1 − λ) g          # m_1 = g
    ε̂   = ρ d / ||d||                    # SAM's ascent (samkit.optim.perturbation) applied to d
    w   <- base_optimizer.step(w, ∇L_B(w + ε̂))

m estimates the full-batch gradient, so d is (an estimate of) the batch's stochastic gradient noise: the ascent
leaves out the full-gradient component, which the paper finds harmful to generalization.

Source: the authors' code, nblt/F-SAM ``utils.py`` (class ``FriendlySAM``, ``first_step``): d uses the EMA
*before* this step's gradient enters it, m starts as the first gradient (so the first step is SAM's), the EMA is
elementwise (per tensor and global are the same for a linear average), ||d|| is global, and ``adaptive`` scales d
as ASAM scales g. Defaults: ``sigma=1``, ``lmbda=0.9``, ``rho=0.05`` are the class's defaults there; its
``train.py`` / ``run.sh`` (CIFAR-100, ResNet-18) use ``lmbda=0.95`` and ``rho=0.2``.

Where the paper differs: its update writes d = g − σ m_t with m_t already holding g (and m_0 = 0). For σ = 1 the
two directions are parallel (g − m_t = λ (g − m_{t−1})), so only the start of m differs; for other σ the paper's
d is parallel to the code's with σ' = σλ / (1 − σ(1 − λ)) (while 1 − σ(1 − λ) > 0). ``form="code"`` (the
default, the authors' code) and ``form="paper"`` offer both.

Micro-batches (``sam_step(..., micro_batches=k)``, one ascent per micro-batch j with its own g_j): every ascent
uses the EMA of the previous steps, d_j = g_j − σ m_{t−1} (``form="paper"``: d_j = g_j − σ (λ m_{t−1} + (1 − λ)
g_j)), and the EMA moves once per step, in ``second_step``, with the batch gradient Σ_j (|B_j| / |B|) g_j. With
one micro-batch this is the rule above; a step abandoned by ``cancel_step`` (an overflow) leaves m untouched.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, cast

import torch
from torch import Tensor

from samkit.optim.perturbation import PerturbationGroup, TensorList
from samkit.optim.sam import SAM

FORMS = ("code", "paper")


def _check_number(name: str, value, low: float, high: float, fix: str) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name} must be {fix}, got {value!r}")


class FriendlySAM(SAM):
    """Friendly SAM around any ``torch.optim`` optimizer (see the module docstring for the rule).

    Args:
        params, base_optimizer, rho, p, adaptive, eta, eps, foreach, restore_by, base_kwargs: as for ``SAM``.
        sigma: σ, how much of the EMA the ascent direction leaves out (0 is SAM; the authors use 1).
        lmbda: λ, the EMA's decay, in [0, 1].
        form: ``"code"`` (d = g − σ m_{t−1}, m_1 = g: the authors' code) or ``"paper"`` (d = g − σ m_t, m_0 = 0).

    The EMA (one tensor per parameter) is saved in ``state_dict()``.

    Example::

        >>> model = torch.nn.Linear(3, 1)
        >>> opt = FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.05, sigma=1.0, lmbda=0.9, lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> torch.nn.functional.mse_loss(model(x), y).backward()
        >>> if opt.first_step(zero_grad=True):
        ...     torch.nn.functional.mse_loss(model(x), y).backward()
        >>> opt.second_step(zero_grad=True)
    """

    uses_clean_gradient = True  # the EMA takes the step's clean gradient in _descend
    vectorizable = False  # the ascent reads running state (the EMA): the loop backend of sam_step runs it

    def __init__(
        self,
        params,
        base_optimizer,
        *,
        rho: float = 0.05,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        form: str = "code",
        p: float = 2,
        adaptive: bool = False,
        eta: float = 0.0,
        eps: float = 1e-12,
        foreach: Optional[bool] = None,
        restore_by: str = "copy",
        **base_kwargs: Any,
    ) -> None:
        _check_number("sigma", sigma, 0.0, math.inf, "a finite number >= 0 (0 is SAM, the authors use 1)")
        _check_number("lmbda", lmbda, 0.0, 1.0, "in [0, 1] (the EMA's decay; the authors use 0.9 to 0.95)")
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS} ('code': the authors' code, the default), got {form!r}")
        self.sigma = float(sigma)
        self.lmbda = float(lmbda)
        self.form = form
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

    def _ascent_groups(self, groups: list[PerturbationGroup]) -> list[PerturbationGroup]:
        if self.sigma == 0.0:
            return groups  # d = g exactly: SAM bit for bit
        position = {id(t): i for i, t in enumerate(self._params())}
        ema = self._ema()
        out = []
        for group in groups:
            m = [ema[position[id(t)]] for t in group.params]
            out.append(dataclasses.replace(group, grads=self._direction(list(group.grads), m)))
        return out

    def _descend(self, sam: bool) -> None:
        clean = self._step.clean
        if not sam or clean is None:
            return  # a step without an ascent records no clean gradient: the EMA stays as it was
        ema = self._ema()
        fresh = [i for i, g in enumerate(clean) if g is not None and ema[i] is None]
        moving = [i for i, g in enumerate(clean) if g is not None and ema[i] is not None]
        for i in fresh:
            # clean[i] is a tensor of this step's own (end_step drops the list), so it can become m as it is
            ema[i] = clean[i] if self.form == "code" else clean[i] * (1.0 - self.lmbda)
        if not moving:
            return
        m, g = cast(list[Tensor], [ema[i] for i in moving]), [clean[i] for i in moving]  # moving: m exists
        if self.foreach:
            torch._foreach_mul_(m, self.lmbda)
            torch._foreach_add_(m, g, alpha=1.0 - self.lmbda)
        else:
            for mi, gi in zip(m, g):
                mi.mul_(self.lmbda).add_(gi, alpha=1.0 - self.lmbda)

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "sigma": self.sigma, "lmbda": self.lmbda, "form": self.form}

    # ----------------------------------------------------------------------------------------------------------
    # the variant's own math

    def _ema(self) -> list[Optional[Tensor]]:
        """m, one entry per parameter (None before its first gradient), in the step's shared memory."""
        return self._param_list("m")

    def _direction(self, grads: list[Tensor], ema: list[Optional[Tensor]]) -> list[Tensor]:
        """d = g − σ m_{t−1} ("code"; d = g before m exists) or d = g − σ (λ m_{t−1} + (1 − λ) g) ("paper", m_0 = 0)."""
        sigma, lmbda = self.sigma, self.lmbda
        present = [i for i, m in enumerate(ema) if m is not None]
        out = list(grads)
        if self.form == "paper":
            for i in (i for i, m in enumerate(ema) if m is None):
                out[i] = grads[i].add(grads[i] * (1.0 - lmbda), alpha=-sigma)
        if not present:
            return out
        m: TensorList
        g, m = [grads[i] for i in present], cast(list[Tensor], [ema[i] for i in present])  # present: m exists
        if self.form == "paper":  # m_t = λ m_{t−1} + (1 − λ) g takes m's place
            if self.foreach:
                m = torch._foreach_mul(m, lmbda)
                torch._foreach_add_(m, g, alpha=1.0 - lmbda)
            else:
                m = [mi.mul(lmbda).add_(gi, alpha=1.0 - lmbda) for mi, gi in zip(m, g)]
        d = torch._foreach_add(g, m, alpha=-sigma) if self.foreach else [a.add(b, alpha=-sigma) for a, b in zip(g, m)]
        for i, di in zip(present, d):
            out[i] = di
        return out
