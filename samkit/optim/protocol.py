"""The step protocol every optimizer of the SAM family speaks, and the one object that holds a step's state.

A loop drives any of them (``SAM``, ``GSAM``, ``LookSAM``, ...) the same way::

    loss_fn(model(x), y).backward()              # the clean pass: g = ∇L(w)
    if optimizer.first_step(zero_grad=True):     # the optimizer decides: does this step need a perturbed pass?
        loss_fn(model(x), y).backward()          # yes: the perturbed pass at w + ε̂, g_s = ∇L(w + ε̂)
    optimizer.second_step(zero_grad=True)        # w restored; the base optimizer steps with the descent gradient

``first_step`` takes the decision (interval: the step count; RST: its own generator; AE-SAM: ||g||²;
late-phase SAM: the schedule) and reports it: ``True`` means "the weights are now at w + ε̂, run the second
pass"; ``False`` means "this step is one pass; the gradient you have is the one the base optimizer gets".
``second_step`` turns what the step left (g, g_s, the variant's own buffers) into the descent gradient. The
same calls cover micro-batches: ``first_step(grads=g_j, weight=|B_j|/|B|)`` then ``restore()`` for each
micro-batch, one ``second_step`` at the end.

Other entry points, for loops that need them:

- ``decide(grads)``: take the decision alone (``first_step`` does it on the step's first call). A loop that
  splits the batch calls it with the whole batch's clean gradient when the rule reads the gradient.
- ``skip_perturbation()``: mark this step as one pass without consulting the rule.
- ``will_perturb``: the decision before the clean pass, when the rule can know it (``None`` when it needs g).
- ``first_step(..., move=False)``: record the clean gradient and the decision but leave the weights at w, for
  a backend that evaluates the perturbed gradient itself (the vmap backend of ``sam_step``).
- ``cancel_step()``: abandon the step (an overflow under a GradScaler): weights back at w, nothing stepped.

Everything that changes during a step lives in one ``StepState`` object. An object that copies the
optimizer's ``__dict__`` (Lightning's optimizer wrapper does) still shares it, so counts and phases stay right
whichever of the two the loop calls; and ``torch.compile`` keeps writes to it across graph breaks.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional


class Phase(enum.Enum):
    """Where the step in progress stands."""

    READY = "ready"  # no step in progress: waiting for the clean gradient
    PLAIN = "plain"  # decided: this step has one pass; waiting for second_step
    SAM = "sam"  # decided: a SAM step, the weights are at w (before an ascent, between micro-batches)
    PERTURBED = "perturbed"  # a SAM step, the weights are at w + ε̂: run the perturbed pass, then restore


@dataclass
class StepState:
    """A step's state and the optimizer's counters, in one place (see the module docstring)."""

    phase: Phase = Phase.READY
    steps: int = 0  # completed steps (second_step calls)
    sam_steps: int = 0  # of which had a perturbed pass
    passes: float = 0.0  # forward-backward passes over the whole batch, all steps together
    perturbed: list = field(default_factory=list)  # parameters moved by the ascent in progress
    saved: list = field(default_factory=list)  # their saved w, in the same order
    set_aside: list = field(default_factory=list)  # (param, clean gradient) of a one-pass step, see first_step
    clean: Optional[list] = None  # Σ_j weight_j g_j of this step, for variants that use g in second_step
    ascents: int = 0  # first_step calls of this SAM step that succeeded (second_step needs one)
    buffers: dict = field(default_factory=dict)  # reused storage for the saved w, keyed by parameter
    buffer_list: tuple = ((), (), ())  # (params, buffers, signature) of the last ascent
    memory: dict[str, Any] = field(default_factory=dict)  # a variant's own running state (EMAs, draws, ...)

    @property
    def decided(self) -> bool:
        return self.phase is not Phase.READY

    def end_step(self, sam: bool, passes: float) -> None:
        self.phase = Phase.READY
        self.steps += 1
        self.sam_steps += int(sam)
        self.passes += passes
        self.set_aside = []
        self.clean = None
        self.ascents = 0

