"""Momentum-SAM (MSAM): SAM's ascent along the base optimizer's momentum instead of a fresh gradient; one pass.

Becker, Altrock, Risse, "Momentum-SAM: Sharpness Aware Minimization without Computational Overhead", TMLR 2024,
arXiv 2401.12033. With m the base optimizer's momentum (SGD's buffer m <- μ m + g, Adam's first moment exp_avg),
which points along +g, one step from the unperturbed weights w::

    w~ = w - rho m / (||m|| + eps)              # where the weights sit between steps (w~ = w while m = 0)
    g  = ∇L_B(w~)                               # the user's one forward-backward, at w~
    w  <- saved w (a copy: bit-exact)           # second_step()
    w  <- base_optimizer.step(w, g)             # updates m with g: SGD m <- μ m + g + wd w~, w <- w - lr m
    w~ <- w - rho m / (||m|| + eps)             # move on to the next evaluation point

The norm is global over every parameter that has a momentum (rho may differ per param group), eps is added
outside it, and m starts at zero, so the first step is a plain base step. The move is the SAM ascent of
``samkit.optim.perturbation`` with -m in place of the gradient: ``p`` and ``adaptive`` shape it as they shape
SAM's (p=2, adaptive=False is the authors' rule; the others are this library's extension).

Source followed: the authors' code, MarlonBecker/MSAM ``optimizer/msam.py`` (SGD) and ``optimizer/adamW_msam.py``
(AdamW), and the paper's Algorithm 1, which agree on the rule above. Where they differ or leave a choice:

- weight decay: the paper's algorithm has none. The authors' SGD adds coupled decay to the gradient while the
  weights are still at w~ (wd w~); so does this class for every coupled decay (SGD, Adam's ``weight_decay``) by
  adding wd (w~ - w) to the gradient before the base step adds wd w. Decoupled decay (AdamW) scales w, as in
  their AdamW, but in torch's order (decay, then the Adam update; theirs is the other way round: a difference
  of order lr² wd per step).
- rho: the code's constructor defaults (0.3 for SGD, 1 for AdamW) are never used by their training script,
  which always passes rho from its config: 3 (``configs/default.ini``; their README runs all four setups,
  SGD and AdamW, with rho 3). The default here is 3.0: much larger than SAM's, because the direction is not
  the local gradient.
- the norm: theirs runs over the parameters that have a gradient in the step; here over all parameters with a
  momentum (the same unless a parameter got no gradient). Any number of param groups (theirs: one).
- ``nesterov=True`` (SGD) descends as torch does; the ascent still follows the momentum buffer (their SGD
  accepts the flag and ignores it). ``maximize=True`` is refused.
- clipping (``max_grad_norm``) sees g plus the decay correction wd (w~ - w); theirs clips g alone.

The weights sit at w~ between steps, as in the authors' code. Evaluation and checkpoints need w: call
``optimizer.eval()`` (weights to w) and ``optimizer.train()`` (back to w~) around them, as for schedule-free
optimizers. BatchNorm running statistics are gathered at w~; the authors recompute them at w with one
forward-only epoch at the end of training (e.g. ``torch.optim.swa_utils.update_bn`` after ``eval()``).
"""

from __future__ import annotations

from typing import Any, Optional, cast

import torch
from torch import Tensor

from samkit.optim import sharded
from samkit.optim.perturbation import PerturbationGroup, perturbation
from samkit.optim.sam import SAM, check_base_optimizer

# the base optimizers whose state holds the momentum, and its key
MOMENTA = ((torch.optim.SGD, "momentum_buffer"), (torch.optim.Adam, "exp_avg"))  # AdamW is an Adam


class MomentumSAM(SAM):
    """Momentum-SAM around SGD (with momentum), Adam or AdamW (see the module docstring for the rule).

    Args:
        params, base_optimizer, p, adaptive, eta, eps, foreach, base_kwargs: as for ``SAM``; the base optimizer
            must be ``torch.optim.SGD`` with momentum > 0, ``Adam`` or ``AdamW`` (their momentum is the ascent).
        rho: the distance of w~ from w along -m/||m|| (the authors' experiments: 3).
        restore_by: ``"copy"`` only (the weights move between steps, not within a pass).

    Every step is one forward-backward (``first_step`` returns False), taken at w~. Between steps the optimizer
    is in train mode (``training`` is True, the weights at w~) or, after ``eval()``, in eval mode (the weights at
    w). ``state_dict()`` refuses while the weights sit at w~: call ``eval()`` first, save the model and the
    optimizer, then ``train()``. A resumed optimizer (``load_state_dict`` of such a checkpoint, and the model's)
    starts in eval mode: call ``train()`` before its first step. A step in eval mode raises: its gradient would
    have been taken at w, not at w~.

    Example::

        >>> model = torch.nn.Linear(3, 1)
        >>> opt = MomentumSAM(model.parameters(), torch.optim.SGD, rho=3.0, lr=0.1, momentum=0.9)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> torch.nn.functional.mse_loss(model(x), y).backward()  # at w~
        >>> opt.first_step(zero_grad=True)  # always a one-pass step
        False
        >>> opt.second_step(zero_grad=True)  # the base step from w, then the weights move to the next w~
        >>> opt.eval()  # the weights at w: evaluate, save checkpoints
        >>> opt.train()  # back to w~ before the next training step
    """

    uses_clean_gradient = False
    vectorizable = True  # one pass at the weights' current values (w~): sam_step's vmap backend reads them as they are

    def __init__(
        self,
        params,
        base_optimizer,
        *,
        rho: float = 3.0,
        p: float = 2,
        adaptive: bool = False,
        eta: float = 0.0,
        eps: float = 1e-12,
        foreach: Optional[bool] = None,
        restore_by: str = "copy",
        **base_kwargs: Any,
    ) -> None:
        check_base_optimizer(base_optimizer)
        cls = base_optimizer if isinstance(base_optimizer, type) else type(base_optimizer)
        moment = next((key for base, key in MOMENTA if issubclass(cls, base)), None)
        if moment is None:
            raise ValueError(
                f"MomentumSAM ascends along the base optimizer's momentum and supports torch.optim.SGD (with "
                f"momentum > 0), Adam and AdamW, got base_optimizer {cls.__name__}"
            )
        if restore_by != "copy":
            raise ValueError(
                f"MomentumSAM supports restore_by='copy' only (it moves the weights between steps itself), got "
                f"restore_by={restore_by!r}"
            )
        self._moment = moment
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
        for group in self.param_groups:
            if moment == "momentum_buffer" and not group.get("momentum", 0) > 0:
                raise ValueError(
                    f"MomentumSAM needs SGD with momentum > 0 (the momentum buffer is its ascent direction), got "
                    f"momentum={group.get('momentum')!r}: pass e.g. momentum=0.9"
                )
            if group.get("maximize", False):
                raise ValueError(
                    f"MomentumSAM minimizes: maximize={group['maximize']!r} is not supported, pass maximize=False"
                )
        self._step.memory["training"] = True

    # ----------------------------------------------------------------------------------------------------------
    # train and eval modes

    @property
    def training(self) -> bool:
        """True in train mode (between steps the weights sit at w~), False after ``eval()`` (they sit at w)."""
        return bool(self._step.memory.get("training", True))

    @torch.no_grad()
    def eval(self) -> None:
        """Move the weights to w, for evaluation and checkpoints. A no-op in eval mode."""
        self._check_between_steps("eval")
        if self.training:
            self._move_back()
            self._step.memory["training"] = False

    @torch.no_grad()
    def train(self) -> None:
        """Move the weights to w~ = w - rho m/||m||, for the next training step. A no-op in train mode."""
        self._check_between_steps("train")
        if not self.training:
            self._step.memory["training"] = True
            self._move_to_ascent_point()

    def _check_between_steps(self, name: str) -> None:
        if self._step.decided:
            raise RuntimeError(
                f"MomentumSAM.{name}() in the middle of a step (phase {self._step.phase.value}): call it before the "
                "step's forward pass or after second_step()"
            )

    # ----------------------------------------------------------------------------------------------------------
    # hooks

    def _plan(self) -> Optional[bool]:
        if not self.training:
            raise RuntimeError(
                "MomentumSAM is in eval mode (the weights are at w, not at the point w~ its gradient must be taken "
                "at): call optimizer.train() before the training step's forward pass"
            )
        return False

    def _descend(self, sam: bool) -> None:
        if not self.training:  # reached only through skip_perturbation(): _plan refuses every other way
            raise RuntimeError("MomentumSAM is in eval mode: call optimizer.train() before a training step")
        moved = self._step.memory.get("moved", ())
        if moved:
            self._decay_at_ascent_point(moved)
            self._move_back()

    def _after_base_step(self, sam: bool) -> None:
        self._move_to_ascent_point()

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "moment": self._moment}

    def _memory_state(self) -> dict[str, Any]:
        if self._step.memory.get("moved"):
            raise RuntimeError(
                "MomentumSAM.state_dict() in train mode: the weights sit at w~ = w - rho m/||m||, so a checkpoint "
                "of the model would not hold w. Call optimizer.eval() first (the weights go back to w), save the "
                "model and the optimizer, then call optimizer.train() to continue training"
            )
        return {"training": self.training}  # the saved w is scratch between checkpoints: the model holds w

    def _load_memory_state(self, memory: dict[str, Any]) -> None:
        # the model's weights (loaded with the optimizer) are w: nothing is displaced
        super()._load_memory_state({"training": bool(memory.get("training", True))})

    # ----------------------------------------------------------------------------------------------------------
    # the variant's own moves

    def _move_to_ascent_point(self) -> None:
        """Save w, then w~ = w + ε̂(-m): the SAM ascent with the momentum, negated, in place of the gradient."""
        groups, moved, position = [], [], 0
        for group in self.param_groups:
            members, indices, momenta = [], [], []
            for t in group["params"]:
                m = self.state.get(t, {}).get(self._moment)
                if m is not None:
                    members.append(t)
                    indices.append(position)
                    momenta.append(m)
                position += 1
            # ε̂ is odd in its direction, ε̂(-m) = -ε̂(m): a negative rho spares a negated copy of m
            groups.append(PerturbationGroup.from_param_group(group, members, momenta, rho=-self._group_rho(group)))
            moved.extend(indices)
        if not moved:
            return
        # FSDP2: the moves run on each rank's shards, the norm of m over all of them (samkit.optim.sharded)
        groups, shards = sharded.local_groups(groups)
        params = [t for g in groups for t in g.params]
        saved = [sharded.to_local(b) for b in self._saved_weights(moved)]
        if self.foreach:
            torch._foreach_copy_(saved, params)
            try:
                out = [list(g.params) for g in groups]
                perturbation(groups, eps=self.eps, foreach=True, out=out, check_out=False, shards=shards)
            except BaseException:
                torch._foreach_copy_(params, saved)  # the weights may hold part of ε̂: put w back
                raise
            torch._foreach_add_(params, saved)  # ε̂ + w: IEEE addition commutes, so bit-exact with w + ε̂
        else:
            epsilons, _ = perturbation(groups, eps=self.eps, foreach=False, shards=shards)
            for buffer, t, e in zip(saved, params, (e for eg in epsilons for e in eg)):
                buffer.copy_(t)
                t.add_(e)
        self._step.memory["moved"] = tuple(moved)

    def _move_back(self) -> None:
        """Put back the saved w (bit-exact) where the weights sit at w~."""
        moved = self._step.memory.get("moved", ())
        if not moved:
            return
        params, saved = self._params(), self._param_list("w")
        targets, sources = [sharded.to_local(params[i]) for i in moved], [sharded.to_local(saved[i]) for i in moved]
        if self.foreach:
            torch._foreach_copy_(targets, sources)
        else:
            for t, w in zip(targets, sources):
                t.copy_(w)
        self._step.memory["moved"] = ()

    def _saved_weights(self, indices: list[int]) -> list[Tensor]:
        """The buffers that hold w while the weights sit at w~, one per moved parameter, reused from step to step."""
        params, buffers = self._params(), self._param_list("w")
        for i in indices:
            t, b = params[i], buffers[i]
            if b is None or b.shape != t.shape or b.dtype != t.dtype or b.device != t.device:
                buffers[i] = torch.empty_like(t, memory_format=torch.preserve_format)
        return cast(list[Tensor], [buffers[i] for i in indices])  # each one set above

    def _decay_at_ascent_point(self, moved: tuple[int, ...]) -> None:
        """.grad += wd (w~ - w) for coupled weight decay, so that the base step's g + wd w is g + wd w~."""
        # only moved parameters are read from saved, and each of them has its w there
        params, saved, position = self._params(), cast(list[Tensor], self._param_list("w")), 0
        moved_set = set(moved)
        for group in self.param_groups:
            n = len(group["params"])
            decay = group.get("weight_decay", 0.0)
            decay = float(decay) if isinstance(decay, Tensor) else decay
            if decay != 0 and not group.get("decoupled_weight_decay", False):
                index = [i for i in range(position, position + n) if i in moved_set and params[i].grad is not None]
                grads = [sharded.to_local(cast(Tensor, params[i].grad)) for i in index]  # index: grads exist
                weights = [sharded.to_local(params[i]) for i in index]
                origins = [sharded.to_local(saved[i]) for i in index]
                if self.foreach and index:
                    shift = torch._foreach_sub(weights, origins)
                    torch._foreach_add_(grads, shift, alpha=decay)
                else:
                    for g, w, w0 in zip(grads, weights, origins):
                        g.add_(w - w0, alpha=decay)
            position += n
