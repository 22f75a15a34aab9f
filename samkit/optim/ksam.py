"""K-SAM: both passes of SAM on the k examples of the batch with the highest loss.

One step on a batch B of n examples::

    ℓ_j  = ℓ_j(w) for each example j              # a forward on all of B without gradient, to rank them
    K    = the k examples with the largest ℓ_j     # ties: the lower index first; a NaN loss ranks highest
    g    = ∇L_K(w)                                 # the clean forward-backward on K only (mean over K)
    ε̂    = SAM's ascent from g                     # samkit.optim.perturbation
    g_s  = ∇L_K(w + ε̂)                             # the perturbed forward-backward on K
    w    <- base_optimizer.step(w, g_s)

k is a count (an int >= 1: that many examples, or all of a smaller batch) or a fraction of the batch (a float in
(0, 1]: max(1, ⌊k n⌋) examples). k >= n is SAM: no ranking forward, both passes on all of B.

Paper: Renkun Ni, Ping-yeh Chiang, Jonas Geiping, Micah Goldblum, Andrew Gordon Wilson, Tom Goldstein, "K-SAM:
Sharpness-Aware Minimization at the Speed of SGD", 2022, arXiv 2210.12864.

Source followed: the paper's description, "compute gradients in both stages of SAM on only the top-k samples with
highest loss", with the extra forward pass over the whole batch that ranks them; no code of the authors was found
to compare with, and the paper's own choice of k could not be checked, so ``k`` has no default. The descent is
SAM's, the gradient at w + ε̂ of the mean loss over the same k examples. The clean gradient is taken by a second
forward on the k examples (not by a backward through the ranking forward, which would cost a backward over the
whole batch).

The ranking needs one loss per example: ``samkit.sam_step`` runs it with a ``loss_fn`` of ``reduction="none"``
(its ranking forward also updates BatchNorm's running statistics, once, with the whole batch; the passes on K
leave them alone); a hand-written loop calls ``samkit.step.select_examples`` (see ``KSAM``); a loop that does
not runs both passes on the whole batch (SAM), and is counted so. Cost, as counted in
``passes``: 1/3 (the ranking forward; a forward is counted as a third of a forward-backward) + 2 k / n, e.g.
1/3 + 1/2 for k = n / 4; 2 when k >= n.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from torch import Tensor

from samkit.optim.protocol import Phase
from samkit.optim.sam import SAM

FORWARD_SHARE = 1.0 / 3.0  # a forward without backward, in forward-backward passes (a backward costs two forwards)


class KSAM(SAM):
    """K-SAM: SAM whose clean and perturbed passes both run on the k highest-loss examples of the batch.

    Args:
        params, base_optimizer, rho, p, adaptive, eta, eps, foreach, restore_by, **base_kwargs: as for ``SAM``.
        k: how many examples both passes use: an int >= 1 is a count (all of a batch no larger than it), a float
            in (0, 1] a fraction of the batch (1.0: all of it). Note ``k=1`` is one example, ``k=1.0`` the batch.
            Under DDP and with micro-batches k applies to each replica's (micro-)batch.

    Example (``sam_step`` needs a per-example loss; a hand-written loop selects with ``select_examples``)::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from samkit.step import sam_step, select_examples
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = KSAM(model.parameters(), torch.optim.SGD, k=0.25, rho=0.05, lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> per_example = lambda out, t: F.cross_entropy(out, t, reduction="none")
        >>> loss = sam_step(opt, model, per_example, x, y)
        >>> keep = select_examples(opt, model, per_example, x, y)   # the same step by hand
        >>> per_example(model(x[keep]), y[keep]).mean().backward()
        >>> if opt.first_step(zero_grad=True):
        ...     per_example(model(x[keep]), y[keep]).mean().backward()
        >>> opt.second_step(zero_grad=True)
        >>> len(keep)
        2
    """

    vectorizable = False  # the vmap backend cannot select examples
    selects_examples = True  # sam_step: the step needs per-example losses, the optimizer picks the examples
    ranks_perturbed_losses = False  # by the clean loss: the ranking forward runs before the clean pass

    def __init__(
        self,
        params,
        base_optimizer,
        *,
        k: Union[int, float],
        rho: float = 0.05,
        p: float = 2,
        adaptive: bool = False,
        eta: float = 0.0,
        eps: float = 1e-12,
        foreach: Optional[bool] = None,
        restore_by: str = "copy",
        **base_kwargs: Any,
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            raise ValueError(
                f"k must be a count (an int >= 1) or a fraction of the batch (a float in (0, 1]), got {k!r}"
            )
        if isinstance(k, int) and k < 1:
            raise ValueError(f"k must be a count >= 1 (or a fraction of the batch, a float in (0, 1]), got {k!r}")
        if isinstance(k, float) and not 0.0 < k <= 1.0:
            raise ValueError(
                f"k must be a fraction of the batch in (0, 1] (or a count, an int >= 1; 1.0 = the whole batch), "
                f"got {k!r}"
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
        self.k = k

    def _selected_count(self, n: int) -> int:
        """|K| for a batch of n examples."""
        if isinstance(self.k, int):
            return min(self.k, n)
        if self.k == 1.0:
            return n
        return max(1, min(n, math.floor(self.k * n + 1e-9)))  # 1e-9: 0.29 * 100 is 29, not 28

    def _select_examples(
        self, n: int, clean_losses: Optional[Tensor] = None, perturbed_losses: Optional[Tensor] = None
    ) -> Optional[Tensor]:
        """The sorted indices of K among n examples (None: all of them), from their clean losses; counted."""
        memory = self._step.memory
        if self._step.phase is Phase.READY:
            memory.pop("examples", None)  # the first selection of a step (or of the retry of a cancelled one)
        m = self._selected_count(n)
        record = memory.setdefault("examples", {"seen": 0, "chosen": 0, "ranked": 0})
        record["seen"] += n
        record["chosen"] += m
        if m == n:
            return None
        if clean_losses is None:
            raise ValueError(f"K-SAM ranks examples by their clean loss: give the {n} losses at w")
        record["ranked"] += n
        top = torch.sort(clean_losses.detach(), descending=True, stable=True).indices[:m]
        return torch.sort(top).values

    def _step_passes(self, sam: bool) -> float:
        record = self._step.memory.pop("examples", None)
        if record is None or record["seen"] == 0:
            return 2.0 if sam else 1.0  # no selection asked for: the passes ran on the whole batch
        seen = record["seen"]
        share = record["chosen"] / seen
        return FORWARD_SHARE * (record["ranked"] / seen) + (2.0 * share if sam else share)

    def _options(self) -> dict[str, Any]:
        # k=1 (one example) and k=1.0 (the batch) compare equal: the kind tells them apart
        return {**super()._options(), "k": self.k, "k_is_count": isinstance(self.k, int)}

    def _memory_state(self) -> dict[str, Any]:
        state = super()._memory_state()
        state.pop("examples", None)  # a step's count, never complete between steps
        return state

    def _load_memory_state(self, memory: dict[str, Any]) -> None:
        memory = dict(memory)
        memory.pop("examples", None)
        super()._load_memory_state(memory)
