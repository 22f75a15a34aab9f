"""Late-phase SAM: the base optimizer alone for the first steps of training, SAM for the last fraction.

One step t (t = completed steps, counted from 0)::

    start = start_step, or total_steps - round(sam_fraction * total_steps)
    t <  start:  a base step with the clean gradient g (one pass)
    t >= start:  a SAM step (ε̂ from g, base step with g_s = ∇L(w + ε̂): two passes)
    reset_base_state and t == start:  the base optimizer's state (momentum, Adam's moments) is cleared first

Paper: Zhanpeng Zhou, Mingze Wang, Yuchen Mao, Bingrui Li, Junchi Yan, "Sharpness-Aware Minimization Efficiently
Selects Flatter Minima Late In Training", ICLR 2025, arXiv 2410.10373: "even a few epochs of SAM applied at the
end of training yield nearly the same generalization and solution sharpness as full SAM training" (their
Figure 1: SGD to epoch 175, then SAM to epoch 200).

Source followed: the authors' code, zzp1012/SAM-in-Late-Phase ``script/ERM_to_SAM.py``: the switch is an epoch
index (``--start_SAM``, default 150 of ``--epochs`` 160, so the last 1/16 of training; SAM runs while
``start_SAM <= epoch <= end_SAM``). Here it is a step index, given directly (``start_step``: e.g. the first step of
the switching epoch) or as the fraction of the training's steps that are SAM steps (``sam_fraction``, default
10/160 = 0.0625 from those script defaults). Their script steps with two optimizers, a plain SGD before the switch
and a SAM with its own SGD after it, so the momentum buffer starts from zero at the switch; here one base optimizer
carries its state across the switch (what a single optimizer in a training loop does), and ``reset_base_state=True``
reproduces their fresh start. rho defaults to SAM's 0.05; their script's command-line default is 2.0 (for SAM
and, with ``--adaptive``, ASAM alike), so pass the value of the run being reproduced.
"""

from __future__ import annotations

from typing import Any, Optional

from samkit.optim.sam import SAM

DEFAULT_SAM_FRACTION = 10 / 160


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class LateSAM(SAM):
    """SAM from step ``start_step`` on (or for the last ``sam_fraction`` of ``total_steps``), the base optimizer before.

    Args:
        params, base_optimizer, rho, p, adaptive, eta, eps, foreach, restore_by, **base_kwargs: as for ``SAM``.
        start_step: the index of the first SAM step (0 = SAM throughout). Give it, or ``total_steps``.
        total_steps: the number of optimizer steps of the training; the switch is then at
            ``total_steps - round(sam_fraction * total_steps)``.
        sam_fraction: the fraction of ``total_steps`` that are SAM steps, in [0, 1] (default 0.0625, the authors'
            10 of 160 epochs). Only with ``total_steps``.
        reset_base_state: clear the base optimizer's state at the switch, as the authors' two-optimizer script does.

    Example::

        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = LateSAM(model.parameters(), torch.optim.SGD, total_steps=1000, sam_fraction=0.1, lr=0.1)
        >>> opt.start_step
        900
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
        start_step: Optional[int] = None,
        total_steps: Optional[int] = None,
        sam_fraction: Optional[float] = None,
        reset_base_state: bool = False,
        p: float = 2,
        adaptive: bool = False,
        eta: float = 0.0,
        eps: float = 1e-12,
        foreach: Optional[bool] = None,
        restore_by: str = "copy",
        **base_kwargs: Any,
    ) -> None:
        self.start_step = _switch_step(start_step, total_steps, sam_fraction)
        if not isinstance(reset_base_state, bool):
            raise ValueError(f"reset_base_state must be True or False, got {reset_base_state!r}")
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
        self.reset_base_state = reset_base_state

    def _plan(self) -> bool:
        return self._step.steps >= self.start_step

    def _descend(self, sam: bool) -> None:
        if self.reset_base_state and sam and self._step.steps == self.start_step:
            self.base_optimizer.state.clear()  # clear in place: SAM's `state` is the same object

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "start_step": self.start_step, "reset_base_state": self.reset_base_state}


def _switch_step(start_step: Optional[int], total_steps: Optional[int], sam_fraction: Optional[float]) -> int:
    if start_step is not None:
        if total_steps is not None or sam_fraction is not None:
            raise ValueError(
                f"give the switch once: start_step={start_step!r}, or total_steps with sam_fraction, not both "
                f"(got total_steps={total_steps!r}, sam_fraction={sam_fraction!r})"
            )
        if not _is_int(start_step) or start_step < 0:
            raise ValueError(f"start_step must be an integer >= 0 (the first SAM step's index), got {start_step!r}")
        return start_step
    if total_steps is None:
        raise ValueError(
            "LateSAM needs the switch point: start_step=<index of the first SAM step>, or total_steps=<steps of the "
            f"training> with sam_fraction=<fraction of them that are SAM steps> (got sam_fraction={sam_fraction!r})"
        )
    if not _is_int(total_steps) or total_steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1 (optimizer steps in training), got {total_steps!r}")
    fraction = DEFAULT_SAM_FRACTION if sam_fraction is None else sam_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"sam_fraction must be in [0, 1] (the share of SAM steps, at the end), got {sam_fraction!r}")
    # round(): a fraction like 0.1 of 1000 is 100 steps, not 99 from 0.1 * 1000 landing just below an integer
    return total_steps - round(fraction * total_steps)
