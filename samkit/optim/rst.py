"""RST, randomized sharpness-aware training: each step is a SAM step with probability p_t, else a base step.

One step t (t = completed steps, counted from 0)::

    p_t = prob                                              schedule="constant"
    p_t = prob + (prob_end - prob) * min(t, T) / T          schedule="linear"
    p_t = prob_end + (prob - prob_end) (1 + cos(pi min(t, T) / T)) / 2      schedule="cosine"
    u_t = torch.rand((), dtype=float64) from the optimizer's own CPU torch.Generator seeded with ``seed``
    u_t < p_t:  a SAM step   (g, ε̂, g_s = ∇L(w + ε̂), base step with g_s: two passes)
    otherwise:  a base step with the clean gradient g (one pass)

Paper: Yang Zhao, Hao Zhang, Xiuyuan Hu, "Randomized Sharpness-Aware Training for Boosting Computational
Efficiency in Deep Learning" (first circulated as SS-SAM, Stochastic Scheduled SAM), arXiv 2203.09962. Each
iteration is a Bernoulli trial between the base algorithm and SAM, with a probability given by a predefined
scheduling function; the paper studies constant, piecewise, linear and trigonometric schedules, and an average
of 1.5 passes per step (p = 0.5 on average) giving results comparable to SAM's.

Source followed: the paper's description (no code of the authors was found to compare with). Its schedules
are functions of the iteration; ``linear`` and ``cosine`` here run from ``prob`` at step 0 to ``prob_end`` at step
``total_steps`` and stay at ``prob_end`` after it (the paper's piecewise schedules are not offered). The paper's
G-RST, which sets the degree of sharpness regularization independently of the schedule, is not implemented.
Under DDP every replica builds the optimizer with the same ``seed`` and so takes the same decisions, with no
communication. The draw of a step is cached for its step index: a decision asked for before the clean pass
(``will_perturb``) and the one taken after it agree, and a cancelled step (an overflow under a GradScaler) draws
nothing new.
"""

from __future__ import annotations

import math
from typing import Any, Optional, cast

import torch

from samkit.optim.sam import SAM

SCHEDULES = ("constant", "linear", "cosine")


def _check_probability(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1] (the chance of a SAM step), got {value!r}")


class RandomSAM(SAM):
    """RST: each step perturbs with probability p_t, drawn from the optimizer's own seeded generator.

    Args:
        params, base_optimizer, rho, p, adaptive, eta, eps, foreach, restore_by, **base_kwargs: as for ``SAM``.
        prob: the probability that a step is a SAM step (with a schedule, its value at step 0). The paper's
            headline setting averages 0.5: 1.5 passes per step.
        schedule: ``"constant"`` (p_t = prob), ``"linear"`` or ``"cosine"`` (from ``prob`` at step 0 to
            ``prob_end`` at ``total_steps``, then ``prob_end``).
        prob_end: p_t at ``total_steps``; required by a schedule, refused by ``"constant"``.
        total_steps: the number of optimizer steps of the training; required by a schedule.
        seed: seeds the generator of the draws (one per step). Replicas with the same seed decide alike.

    Example::

        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = RandomSAM(model.parameters(), torch.optim.SGD, rho=0.05, prob=0.5, seed=0, lr=0.1)
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
        prob: float = 0.5,
        schedule: str = "constant",
        prob_end: Optional[float] = None,
        total_steps: Optional[int] = None,
        seed: int = 0,
        p: float = 2,
        adaptive: bool = False,
        eta: float = 0.0,
        eps: float = 1e-12,
        foreach: Optional[bool] = None,
        restore_by: str = "copy",
        **base_kwargs: Any,
    ) -> None:
        _check_probability("prob", prob)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if schedule == "constant":
            if prob_end is not None:
                raise ValueError(
                    f"prob_end={prob_end!r} needs a schedule: pass schedule='linear' or 'cosine', or leave "
                    "prob_end out for a constant probability"
                )
        else:
            if prob_end is None:
                raise ValueError(f"schedule={schedule!r} needs prob_end, the probability at total_steps, got None")
            _check_probability("prob_end", prob_end)
            if total_steps is None:
                raise ValueError(
                    f"schedule={schedule!r} needs total_steps, the number of optimizer steps of the training, got None"
                )
        if total_steps is not None and (
            isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
        ):
            raise ValueError(f"total_steps must be an integer >= 1 (optimizer steps in training), got {total_steps!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
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
        self.prob = float(prob)
        self.schedule = schedule
        self.prob_end = None if prob_end is None else float(prob_end)
        self.total_steps = total_steps
        self.seed = seed

    def _probability(self, t: int) -> float:
        """p_t of step t."""
        if self.schedule == "constant":
            return self.prob
        # a scheduled p has prob_end and total_steps (checked in __init__)
        prob_end, total_steps = cast(float, self.prob_end), cast(int, self.total_steps)
        progress = min(t, total_steps) / total_steps
        if self.schedule == "linear":
            return self.prob + (prob_end - self.prob) * progress
        return prob_end + (self.prob - prob_end) * (1.0 + math.cos(math.pi * progress)) / 2.0

    def _plan(self) -> bool:
        memory, step = self._step.memory, self._step.steps
        cached = memory.get("draw")
        if cached is not None and cached[0] == step:
            return cached[1]
        generator = torch.Generator(device="cpu")
        if "generator" in memory:
            generator.set_state(memory["generator"])
        else:
            generator.manual_seed(self.seed)
        # one draw per step whatever p_t is, so the sequence of draws depends on the seed alone
        u = torch.rand((), generator=generator, dtype=torch.float64).item()
        sam = u < self._probability(step)
        memory["generator"] = generator.get_state()
        memory["draw"] = (step, sam)
        return sam

    def _options(self) -> dict[str, Any]:
        return {
            **super()._options(),
            "prob": self.prob,
            "schedule": self.schedule,
            "prob_end": self.prob_end,
            "total_steps": self.total_steps,
            "seed": self.seed,
        }

    def _load_memory_state(self, memory: dict[str, Any]) -> None:
        memory = dict(memory)
        if "generator" in memory:
            # a checkpoint loaded with map_location="cuda" moves it; torch.Generator.set_state needs a CPU ByteTensor
            memory["generator"] = memory["generator"].to("cpu", torch.uint8)
        if "draw" in memory:
            step, sam = memory["draw"]
            memory["draw"] = (int(step), bool(sam))
        super()._load_memory_state(memory)
