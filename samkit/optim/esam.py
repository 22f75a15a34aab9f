"""ESAM, efficient SAM: perturb a random subset of the weights (SWP), descend on the sharpest examples (SDS).

One step on a batch B of n examples::

    m_i ~ Bernoulli(beta), one draw per parameter tensor i   # the optimizer's own seeded generator
    g    = ∇L_B(w)                                           # the clean pass, every example
    ε̂    = SAM's ascent of the tensors with m_i = 1, radius rho / beta, the norm over those tensors only
           (ε̂_i = 0 where m_i = 0)
    r_j  = ℓ_j(w + ε̂) - ℓ_j(w) for each example j           # a forward at w + ε̂ without gradient
    B+   = the max(1, ⌊gamma n⌋) examples with the largest r_j (ties: the lower index first)
    g_s  = ∇L_{B+}(w + ε̂)                                    # the mean over B+, gradients of every tensor
    w    <- base_optimizer.step(w, g_s)

beta = gamma = 1 is SAM: every tensor perturbed with radius rho, no ranking forward, the second pass on all of B.

Paper: Jiawei Du, Hanshu Yan, Jiashi Feng, Joey Tianyi Zhou, Liangli Zhen, Rick Siow Mong Goh, Vincent Y. F. Tan,
"Efficient Sharpness-aware Minimization for Improved Training of Neural Networks", ICLR 2022, arXiv 2110.03141.

Source followed: the authors' code, dydjw9/Efficient_SAM ``utils/Esam.py`` (the class ``train.py`` trains with;
``run.sh`` passes ``--beta 0.6 --gamma 0.5 --rho 0.05`` for ResNet-18 on CIFAR, the defaults here, and beta = 0.5
for its WideResNet and PyramidNet runs). There, a tensor is left out of the next step by ``requires_grad =
False``, drawn with probability 1 - beta per tensor after each step, so its clean gradient is never formed: the
ascent scales rho / (||g|| + 1e-7) / beta, with the norm over the drawn tensors only, and moves only them; every
tensor is back to ``requires_grad = True`` before the second pass, so the descent uses g_s for all of them. The
SDS forward at w + ε̂ runs on the whole batch without gradient; the second forward-backward runs on the selected
examples, their mean loss. Where this class differs, and why:

- The draw is this step's, from this optimizer's generator (``seed``), also on the first step; the code draws
  after a step for the next one (its first step perturbs every tensor) from Python's global ``random``.
- The clean pass still computes every tensor's gradient (the loop runs it before the optimizer is asked);
  the unselected ones are not used. The result is the code's; the code's saving in that backward is not taken.
- B+ holds exactly max(1, ⌊gamma n⌋) examples. The code keeps those strictly above the ⌊gamma n⌋-th largest
  rise, one example fewer (none at all when the rises tie), and treats gamma >= 0.99 as the whole batch.
- ``eps`` (1e-12, the family's) is added to the norm as the code adds 1e-7; pass ``eps=1e-7`` to match it.
- ``utils/layer_dp_sam.py`` (the class the README shows) weights the selected losses by a softmax of their rise
  with a temperature; ``train.py`` does not use it, and neither does this class.

The example selection needs one loss per example: ``samkit.sam_step`` runs it with a ``loss_fn`` of
``reduction="none"``; a hand-written loop calls ``samkit.step.select_examples`` (see ``ESAM``); a loop that does
not runs its second pass on the whole batch (SWP alone), and is counted so. Cost, as counted
in ``passes``: 1 (clean) + 1/3 (the ranking forward; a forward is counted as a third of a forward-backward)
+ |B+| / n (the second pass), e.g. 1 + 1/3 + 1/2 for gamma = 0.5; 2 when gamma = 1.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch
from torch import Tensor

from samkit.optim.perturbation import PerturbationGroup
from samkit.optim.sam import SAM

FORWARD_SHARE = 1.0 / 3.0  # a forward without backward, in forward-backward passes (a backward costs two forwards)


def _check_fraction(name: str, value, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1] ({meaning}; 1 = as SAM), got {value!r}")


class ESAM(SAM):
    """ESAM: SAM's ascent on a random subset of the tensors, the second pass on the examples whose loss rose most.

    Args:
        params, base_optimizer, rho, p, adaptive, eta, eps, foreach, restore_by, **base_kwargs: as for ``SAM``.
        beta: the probability that a parameter tensor is perturbed in a step (SWP); the ascent radius is
            rho / beta. 1 perturbs every tensor.
        gamma: the fraction of the batch the second pass runs on (SDS): the examples whose loss rises most from
            w to w + ε̂. 1 runs it on the whole batch, without the ranking forward.
        seed: seeds the generator of the tensors' draws (saved in the state dict; replicas with the same seed
            draw alike).

    Example (``sam_step`` needs a per-example loss; a hand-written loop selects with ``select_examples``)::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from samkit.step import sam_step, select_examples
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = ESAM(model.parameters(), torch.optim.SGD, rho=0.05, beta=0.6, gamma=0.5, lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> per_example = lambda out, t: F.cross_entropy(out, t, reduction="none")
        >>> loss = sam_step(opt, model, per_example, x, y)
        >>> losses = per_example(model(x), y)      # the same step by hand
        >>> losses.mean().backward()
        >>> if opt.first_step(zero_grad=True):
        ...     keep = select_examples(opt, model, per_example, x, y, clean_losses=losses)
        ...     per_example(model(x[keep]), y[keep]).mean().backward()
        >>> opt.second_step(zero_grad=True)
        >>> len(keep)
        4
    """

    vectorizable = False  # the vmap backend cannot select examples
    selects_examples = True  # sam_step: the step needs per-example losses, the optimizer picks the examples
    ranks_perturbed_losses = True  # by the rise from w to w + ε̂: the ranking forward runs after the ascent

    def __init__(
        self,
        params,
        base_optimizer,
        *,
        rho: float = 0.05,
        beta: float = 0.6,
        gamma: float = 0.5,
        seed: int = 0,
        p: float = 2,
        adaptive: bool = False,
        eta: float = 0.0,
        eps: float = 1e-12,
        foreach: Optional[bool] = None,
        restore_by: str = "copy",
        **base_kwargs: Any,
    ) -> None:
        _check_fraction("beta", beta, "the probability that a tensor is perturbed")
        _check_fraction("gamma", gamma, "the fraction of the batch the second pass runs on")
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
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.seed = seed

    # ----------------------------------------------------------------------------------------------------------
    # SWP: which tensors this step perturbs

    def _drawn(self) -> Tensor:
        """This step's draw (True: perturbed), one per parameter in ``_params()`` order; drawn once per step."""
        memory, step, count = self._step.memory, self._step.steps, len(self._params())
        cached = memory.get("draw")
        if cached is not None and cached["step"] == step and len(cached["keep"]) == count:
            return cached["keep"]
        if self.beta == 1.0:
            return torch.ones(count, dtype=torch.bool)
        generator = torch.Generator(device="cpu")
        if "generator" in memory:
            generator.set_state(memory["generator"])
        else:
            generator.manual_seed(self.seed)
        keep = torch.rand(count, generator=generator, dtype=torch.float64) < self.beta
        memory["generator"] = generator.get_state()
        memory["draw"] = {"step": step, "keep": keep}
        return keep

    def _ascent_groups(self, groups: list[PerturbationGroup]) -> list[PerturbationGroup]:
        if self.beta == 1.0:
            return groups
        chosen = {id(t) for t, keep in zip(self._params(), self._drawn().tolist()) if keep}
        out = []
        for group in groups:
            pairs = [(t, g) for t, g in zip(group.params, group.grads) if id(t) in chosen]
            out.append(dataclasses.replace(group, params=[t for t, _ in pairs], grads=[g for _, g in pairs]))
        return out

    def _group_rho(self, group: dict) -> float:
        return group["rho"] / self.beta

    # ----------------------------------------------------------------------------------------------------------
    # SDS: which examples the second pass runs on

    def _decide(self, grads: list[Optional[Tensor]]) -> bool:
        self._step.memory.pop("examples", None)  # a new step (or the retry of a cancelled one) counts afresh
        return super()._decide(grads)

    def _selected_count(self, n: int) -> int:
        """|B+| for a batch of n examples."""
        if self.gamma == 1.0:
            return n
        return max(1, min(n, math.floor(self.gamma * n + 1e-9)))  # 1e-9: 0.29 * 100 is 29, not 28

    def _select_examples(
        self, n: int, clean_losses: Optional[Tensor] = None, perturbed_losses: Optional[Tensor] = None
    ) -> Optional[Tensor]:
        """The sorted indices of B+ among n examples (None: all of them), from ℓ(w) and ℓ(w + ε̂); counted."""
        m = self._selected_count(n)
        record = self._step.memory.setdefault("examples", {"seen": 0, "chosen": 0, "ranked": 0})
        record["seen"] += n
        record["chosen"] += m
        if m == n:
            return None
        if clean_losses is None or perturbed_losses is None:
            raise ValueError(
                f"ESAM ranks examples by the rise of their loss from w to w + ε̂: give both losses ({n} each)"
            )
        record["ranked"] += n
        rise = perturbed_losses.detach() - clean_losses.detach()
        top = torch.sort(rise, descending=True, stable=True).indices[:m]
        return torch.sort(top).values

    def _step_passes(self, sam: bool) -> float:
        record = self._step.memory.pop("examples", None)
        if not sam:
            return 1.0
        if record is None or record["seen"] == 0:
            return 2.0  # no selection asked for: the second pass ran on the whole batch
        seen = record["seen"]
        return 1.0 + FORWARD_SHARE * (record["ranked"] / seen) + record["chosen"] / seen

    # ----------------------------------------------------------------------------------------------------------
    # checkpoints

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "beta": self.beta, "gamma": self.gamma, "seed": self.seed}

    def _memory_state(self) -> dict[str, Any]:
        state = super()._memory_state()
        state.pop("examples", None)  # a step's count, never complete between steps
        return state

    def _load_memory_state(self, memory: dict[str, Any]) -> None:
        memory = dict(memory)
        memory.pop("examples", None)
        if "generator" in memory:
            # a checkpoint loaded with map_location="cuda" moves it; torch.Generator.set_state needs a CPU ByteTensor
            memory["generator"] = memory["generator"].to("cpu", torch.uint8)
        if "draw" in memory:
            draw = memory["draw"]
            memory["draw"] = {"step": int(draw["step"]), "keep": draw["keep"].to("cpu", torch.bool)}
        super()._load_memory_state(memory)
