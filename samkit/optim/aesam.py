"""AE-SAM: a SAM step only where the squared gradient norm is large for its running statistics, else a base step.

One step t (t = completed steps, counted from 0; T = ``total_steps``), after the clean pass g_t = ∇L_B(w_t)::

    s_t   = ||g_t||²                                       global over all parameters, the loss gradient alone
    mu_t  = delta mu_{t-1} + (1 - delta) s_t               this step's value is added first,
    var_t = delta var_{t-1} + (1 - delta) (s_t - mu_t)²    then the comparison is made
    c_t   = (t/T) lambda1 + (1 - t/T) lambda2              linear from lambda2 (t = 0) to lambda1 (t = T), then lambda1
    s_t >= mu_t + c_t sqrt(var_t):  a SAM step (ε̂ from g_t, base step with g_s = ∇L(w_t + ε̂): two passes)
    otherwise:                      a base step with g_t (one pass)
    mu_{-1} = 0,  var_{-1} = e^-10

Paper: Weisen Jiang, Hansi Yang, Yu Zhang, James T. Kwok, "An Adaptive Policy to Employ Sharpness-Aware
Minimization", ICLR 2023, arXiv 2304.14647 (AE-SAM; AE-LookSAM, the same policy around LookSAM, is not
implemented here). Source followed: the paper's Algorithm 1 (the EMA updates, that they include the current
||g_t||² before the comparison, the initial values and the schedule of c_t) and its experimental defaults
delta = 0.9, lambda1 = -1, lambda2 = 1: with ||g||² roughly normal, about 16 % of the steps perturb at the start
and about 84 % at the end, half of them over the training. No authors' code was found to compare with.

The statistics move only when a step completes (``second_step``): a step abandoned by ``cancel_step`` (an
overflow under a GradScaler) leaves them as they were, and a step made one-pass by ``skip_perturbation()``
(without consulting the rule) does not update them. Under ``sam_step`` with micro-batches or DDP the rule sees
the whole batch's clean gradient, averaged over the replicas, so every replica takes the same decision.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from samkit.optim.perturbation import LOW_PRECISION
from samkit.optim.sam import SAM

INITIAL_MEAN = 0.0
INITIAL_VARIANCE = math.exp(-10.0)


def _check_finite(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number (an endpoint of the threshold schedule c_t), got {value!r}")


class AESAM(SAM):
    """AE-SAM: perturb only the steps whose ||g||² is at least mu_t + c_t sigma_t (EMAs of ||g||²).

    Args:
        params, base_optimizer, rho, p, adaptive, eta, eps, foreach, restore_by, **base_kwargs: as for ``SAM``.
        total_steps: T, the number of optimizer steps of the training (c_t reaches lambda1 there).
        delta: the decay of the EMAs mu_t and sigma²_t, in (0, 1) (paper: 0.9).
        lambda1: c_t at the end of training (paper: -1).
        lambda2: c_t at the start of training (paper: 1). The larger c_t, the fewer SAM steps.

    The decision reads the clean gradient, so ``will_perturb`` is None before the clean pass: use the value that
    ``first_step()`` returns (``sam_step`` and ``step(closure)`` do).

    Example::

        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = AESAM(model.parameters(), torch.optim.SGD, total_steps=100, lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> torch.nn.functional.mse_loss(model(x), y).backward()
        >>> if opt.first_step(zero_grad=True):
        ...     torch.nn.functional.mse_loss(model(x), y).backward()
        >>> opt.second_step(zero_grad=True)
    """

    def __init__(
        self,
        params,
        base_optimizer,
        *,
        rho: float = 0.05,
        total_steps: int,
        delta: float = 0.9,
        lambda1: float = -1.0,
        lambda2: float = 1.0,
        p: float = 2,
        adaptive: bool = False,
        eta: float = 0.0,
        eps: float = 1e-12,
        foreach: Optional[bool] = None,
        restore_by: str = "copy",
        **base_kwargs: Any,
    ) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1 (optimizer steps in training), got {total_steps!r}")
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1) (the EMAs' decay; the paper uses 0.9), got {delta!r}")
        _check_finite("lambda1", lambda1)
        _check_finite("lambda2", lambda2)
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
        self.total_steps = total_steps
        self.delta = float(delta)
        self.lambda1 = float(lambda1)
        self.lambda2 = float(lambda2)

    def _threshold_factor(self, t: int) -> float:
        """c_t."""
        progress = min(t, self.total_steps) / self.total_steps
        return progress * self.lambda1 + (1.0 - progress) * self.lambda2

    def _squared_norm(self, grads: list[Optional[Tensor]]) -> float:
        present = [g for g in grads if g is not None]
        if not present:
            return 0.0
        # fp16 / bf16 gradients are summed in float32: an fp16 norm overflows above 65504
        low = [g for g in present if g.dtype in LOW_PRECISION]
        high = [g for g in present if g.dtype not in LOW_PRECISION]
        if self.foreach:
            norms = list(torch._foreach_norm(high)) if high else []
            norms += list(torch._foreach_norm(low, dtype=torch.float32)) if low else []
        else:
            norms = [torch.linalg.vector_norm(g) for g in high]
            norms += [torch.linalg.vector_norm(g, dtype=torch.float32) for g in low]
        device = norms[0].device
        stacked = torch.stack([n.to(device=device, dtype=torch.float64) for n in norms])
        return float(torch.linalg.vector_norm(stacked).square())

    def _plan(self) -> None:
        return None

    def _decide(self, grads: list[Optional[Tensor]]) -> bool:
        memory, step = self._step.memory, self._step.steps
        squared = self._squared_norm(grads)
        if not math.isfinite(squared):
            raise FloatingPointError(
                f"the squared gradient norm in first_step is {squared}: AE-SAM will not let it into its statistics. "
                "Under mixed precision, unscale the gradients first or use samkit.sam_step(..., scaler=GradScaler()), "
                "which skips such steps"
            )
        mean = self.delta * memory.get("mean", INITIAL_MEAN) + (1.0 - self.delta) * squared
        variance = self.delta * memory.get("variance", INITIAL_VARIANCE) + (1.0 - self.delta) * (squared - mean) ** 2
        memory["pending"] = (step, mean, variance)  # committed by _descend once the step completes
        return squared >= mean + self._threshold_factor(step) * math.sqrt(variance)

    def _descend(self, sam: bool) -> None:
        memory = self._step.memory
        pending = memory.pop("pending", None)
        if pending is not None and pending[0] == self._step.steps:
            memory["mean"], memory["variance"] = pending[1], pending[2]

    def _options(self) -> dict[str, Any]:
        return {
            **super()._options(),
            "total_steps": self.total_steps,
            "delta": self.delta,
            "lambda1": self.lambda1,
            "lambda2": self.lambda2,
        }

    def _memory_state(self) -> dict[str, Any]:
        # between steps a pending update is one of an abandoned step: not part of the state
        return {k: v for k, v in self._step.memory.items() if k != "pending"}

    def _load_memory_state(self, memory: dict[str, Any]) -> None:
        super()._load_memory_state({k: float(v) for k, v in memory.items() if k in ("mean", "variance")})
