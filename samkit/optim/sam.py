"""SAM: Sharpness-Aware Minimization (Foret et al., ICLR 2021, arXiv 2010.01412) as a torch.optim.Optimizer.

One step on a batch B, wrapping any base optimizer::

    g   = ∇L_B(w)                       # first forward-backward (the user's)
    ε̂   = rho g / ||g||                 # first_step(): save w, move to w + ε̂   (samkit.optim.perturbation)
    g'  = ∇L_B(w + ε̂)                   # second forward-backward (the user's)
    w   <- saved w (a copy: bit-exact)   # second_step(): restore, then
    w   <- base_optimizer.step(w, g')

With ``adaptive=True`` this is ASAM (Kwon et al. 2021): ε̂ = rho T² g / ||T g|| with T = |w| + eta.
``interval=k`` makes only every k-th step a SAM step; the others are plain base steps with one pass.

SAM shares ``param_groups`` (and ``state``) with its base optimizer, so LR schedulers, ``zero_grad``,
``add_param_group`` and checkpoints act on both. ``rho``, ``p``, ``adaptive`` and ``eta`` may differ per
param group; the gradient norm is global.

SAM is also the base class of the family (GSAM, LookSAM, RST, ...): it implements the step protocol of
``samkit.optim.protocol`` once, and a variant overrides only the hooks that make it different:

    _plan()                 the decision before the clean pass (None: it needs the gradient)
    _decide(grads)          the decision after the clean pass (default: the plan)
    _ascent_groups(groups)  what the ascent perturbs and along which direction (default: SAM's)
    _descend(sam)           turn .grad into the descent gradient before the base step (default: as is)
    _group_rho(group)       this step's rho of a param group (default: the group's rho)
    _after_base_step(sam)   right after the base step (Momentum-SAM moves to its next evaluation point)
    _step_passes(sam)       the forward-backward passes this step cost (default 2 on a SAM step, else 1)
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Optional, Sequence, Union, cast

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from samkit.optim import sharded
from samkit.optim.perturbation import (
    GROUP_OPTIONS,
    LOW_PRECISION,
    PerturbationGroup,
    check_group_options,
    is_number,
    perturbation,
)
from samkit.optim.protocol import Phase, StepState
from samkit.optim.step_stats import StepStats, StepStatsRecorder

RESTORE_BY = ("copy", "swap")


def check_base_optimizer(base_optimizer) -> None:
    """Refuse, with the reason, a base optimizer the family cannot wrap (not an Optimizer, a SAM, LBFGS)."""
    cls = base_optimizer if isinstance(base_optimizer, type) else type(base_optimizer)
    if not (isinstance(cls, type) and issubclass(cls, Optimizer)):
        raise TypeError(
            "base_optimizer must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD) or an instance "
            f"built over the same parameters, got {base_optimizer!r}"
        )
    if issubclass(cls, SAM):
        raise TypeError(
            f"base_optimizer is a {cls.__name__}, itself a SAM-family optimizer: nesting them perturbs twice and "
            "steps once; pass the optimizer that takes the step (e.g. torch.optim.SGD) instead"
        )
    if issubclass(cls, torch.optim.LBFGS):
        raise TypeError(
            "base_optimizer LBFGS re-evaluates the loss itself inside step(closure), so it cannot step with the "
            "gradient taken at w + ε̂; use a first-order optimizer (SGD, Adam, AdamW, ...)"
        )


def check_max_grad_norm(max_grad_norm) -> None:
    """Refuse, naming it, a clipping norm that is not a number > 0 (None: no clipping; True is not 1)."""
    if max_grad_norm is not None and (not is_number(max_grad_norm) or not max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be > 0, a number (or None for no clipping), got {max_grad_norm!r}")


def sparse_gradient_message(param: Tensor, index: Optional[int] = None) -> str:
    """The refusal of a sparse gradient, naming the parameter (shape; position in param-group order) and the fix."""
    shape = tuple(param.shape)
    where = f"parameter of shape {shape}" if index is None else f"parameter {index}, shape {shape}"
    return (
        f"SAM does not support sparse gradients ({where}): ε̂ and the perturbed pass need dense gradients; use "
        "dense gradients, e.g. nn.Embedding(..., sparse=False) or nn.EmbeddingBag(..., sparse=False)"
    )


class SAM(Optimizer):
    """Sharpness-Aware Minimization around any ``torch.optim`` optimizer, and the base class of the family.

    Args:
        params: parameters or param-group dicts (a group may carry its own ``rho``, ``p``, ``adaptive``, ``eta``).
        base_optimizer: an Optimizer class (built here over the same param groups with ``base_kwargs``) or an
            already built instance over exactly these parameters.
        rho: radius of the neighbourhood (paper default 0.05; ASAM uses 0.5 to 1.0).
        p: the norm of the ρ-ball: 2 (default), ``float("inf")``, or any p > 1.
        adaptive: ASAM's scale-invariant ball, T = |w| + eta.
        eta: ASAM's offset (0 is the common definition; the ASAM authors use 0.01 on weights only, see README).
        eps: stabiliser added to the norm (outside it, as the common implementation does).
        interval: only every ``interval``-th step perturbs; the others are plain base steps with one pass.
        foreach: use ``torch._foreach_*`` kernels (default) or the plain per-tensor loop.
        restore_by: how the weights leave and come back to w, both bit-exact. ``"copy"`` (default) perturbs each
            parameter in its own memory and copies the saved w back: storage never changes, safe for anything.
            ``"swap"`` computes w + ε̂ in a second buffer and swaps it in with ``param.data = ...``, then swaps w
            back: no copies, about half the memory traffic of the ascent and restore (BENCHMARKS.md). Use it only
            when the model reads its parameters through the Parameter objects: NOT with FSDP or other
            flat-parameter wrappers, nor with tensors that view a parameter's storage, which would keep seeing w
            during the perturbed pass. FSDP2's DTensor parameters refuse it (docs/fsdp.md).

    Counters (saved in the state dict): ``steps`` (completed steps), ``sam_steps`` (of which had a perturbed
    pass) and ``passes`` (forward-backward passes over the batch, so ``passes / steps`` is the cost per step
    relative to the base optimizer's one pass).

    Example (the two-step API)::

        >>> model = torch.nn.Linear(3, 1)
        >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> torch.nn.functional.mse_loss(model(x), y).backward()
        >>> if opt.first_step(zero_grad=True):
        ...     torch.nn.functional.mse_loss(model(x), y).backward()
        >>> opt.second_step(zero_grad=True)
    """

    uses_clean_gradient = False  # the variant reads this step's clean gradient g in _descend (self._step.clean)
    vectorizable = True  # sam_step(backend="vmap") can run it (its ascent needs no state vmap cannot carry)
    selects_examples = False  # sam_step hands it per-example losses and it picks the examples (ESAM, K-SAM)

    def __init__(
        self,
        params,
        base_optimizer,
        *,
        rho: float = 0.05,
        p: float = 2,
        adaptive: bool = False,
        eta: float = 0.0,
        eps: float = 1e-12,
        interval: int = 1,
        foreach: Optional[bool] = None,
        restore_by: str = "copy",
        **base_kwargs: Any,
    ) -> None:
        check_base_optimizer(base_optimizer)
        reserved = sorted(set(base_kwargs) & set(inspect.signature(SAM.__init__).parameters))
        if reserved:
            raise TypeError(
                f"{type(self).__name__} does not take {reserved[0]!r}: its own rule decides which steps perturb and "
                f"how; see help(samkit.{type(self).__name__})"
            )
        if interval != 1 and "interval" not in inspect.signature(type(self).__init__).parameters:
            raise TypeError(
                f"{type(self).__name__} does not take 'interval': its own rule decides which steps perturb; see "
                f"help(samkit.{type(self).__name__})"
            )
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an integer >= 1 (1 = SAM on every step), got {interval!r}")
        if not is_number(eps) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        if restore_by not in RESTORE_BY:
            raise ValueError(f"restore_by must be one of {RESTORE_BY}, got {restore_by!r}")
        defaults = dict(rho=rho, p=p, adaptive=adaptive, eta=eta)
        check_group_options(defaults)
        self.eps = float(eps)
        self.interval = interval
        self.foreach = True if foreach is None else bool(foreach)
        self.restore_by = restore_by
        self._step = StepState()  # everything a step changes (samkit.optim.protocol)
        self._stats = StepStatsRecorder()  # what the last step did (samkit.optim.step_stats); shared by copies too

        if isinstance(base_optimizer, Optimizer):
            if base_kwargs:
                raise TypeError(
                    f"options {sorted(base_kwargs)} were given for the base optimizer, but base_optimizer is an "
                    f"already built {type(base_optimizer).__name__}: pass them to its constructor instead"
                )
            super().__init__(params, defaults)
            self._adopt(base_optimizer)
            self.base_optimizer = base_optimizer
        else:
            super().__init__(params, defaults)
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        # the base's defaults too (momentum, betas, ...): OneCycleLR and CyclicLR look for them here
        self.defaults = {**self.base_optimizer.defaults, **defaults}
        self._link()
        if sharded.is_sharded(self._params()):
            _refuse_swap_when_sharded(restore_by)

    # ----------------------------------------------------------------------------------------------------------
    # construction helpers

    def _adopt(self, base: Optimizer) -> None:
        """Merge SAM's per-group options into an already built base optimizer's groups."""
        mine = [[id(t) for t in g["params"]] for g in self.param_groups]
        theirs = [[id(t) for t in g["params"]] for g in base.param_groups]
        if sorted(sum(mine, [])) != sorted(sum(theirs, [])):
            raise ValueError(
                f"base_optimizer {type(base).__name__} is built over other parameters than the ones given to SAM "
                f"({sum(map(len, theirs))} vs {sum(map(len, mine))} tensors): build it over the same parameters, "
                "or pass its class and options instead"
            )
        if mine == theirs:
            for sam_group, base_group in zip(self.param_groups, base.param_groups):
                for key in GROUP_OPTIONS:
                    base_group[key] = sam_group[key]
        elif len(self.param_groups) == 1:
            for base_group in base.param_groups:
                for key in GROUP_OPTIONS:
                    base_group.setdefault(key, self.defaults[key])
                check_group_options(base_group)
        else:
            raise ValueError(
                "SAM's param groups do not match the base optimizer's: pass the same groups to both, or a flat "
                "parameter list to SAM (its options then apply to every group of the base optimizer)"
            )

    def _link(self) -> None:
        # one list of group dicts and one state for both: schedulers and checkpoints see a single optimizer
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def add_param_group(self, param_group: dict) -> None:
        base = self.__dict__.get("base_optimizer")
        for key in GROUP_OPTIONS:
            param_group.setdefault(key, self.defaults[key])
        check_group_options(param_group)
        if base is None:  # during Optimizer.__init__
            super().add_param_group(param_group)
        else:
            base.add_param_group(param_group)

    def _params(self) -> list[Tensor]:
        return [t for group in self.param_groups for t in group["params"]]

    # ----------------------------------------------------------------------------------------------------------
    # the hooks a variant overrides (see the module docstring)

    def _plan(self) -> Optional[bool]:
        """Whether the coming step perturbs, when that is known before its clean pass; None when it is not."""
        return self._step.steps % self.interval == 0

    def _decide(self, grads: list[Optional[Tensor]]) -> bool:
        """Whether this step perturbs, given its clean gradient (one entry per parameter, None without one)."""
        plan = self._plan()
        if plan is None:
            raise NotImplementedError(f"{type(self).__name__}._plan() returned None but _decide is not defined")
        return plan

    def _ascent_groups(self, groups: list[PerturbationGroup]) -> list[PerturbationGroup]:
        """The groups the ascent perturbs (params, the direction in ``grads``, rho): SAM's own by default."""
        return groups

    def _descend(self, sam: bool) -> None:
        """Turn ``p.grad`` (g_s on a SAM step, g on a one-pass step) into the gradient the base optimizer gets."""

    def _after_base_step(self, sam: bool) -> None:
        """Runs right after the base optimizer's step (a one-pass variant moves to its next evaluation point)."""

    def _group_rho(self, group: dict) -> float:
        return group["rho"]

    def _options(self) -> dict[str, Any]:
        """The constructor options a checkpoint must agree with on resume."""
        return {"interval": self.interval, "eps": self.eps}

    def _param_list(self, key: str) -> list[Optional[Tensor]]:
        """A per-parameter list in the step's memory, aligned with ``_params()`` (None where there is nothing yet).

        Lists in ``self._step.memory`` are per-parameter by convention: saved as clones, loaded onto each
        parameter's device and dtype, and grown when ``add_param_group`` adds parameters."""
        values = self._step.memory.setdefault(key, [])
        missing = len(self._params()) - len(values)
        if missing > 0:
            values.extend([None] * missing)
        return values

    def _memory_state(self) -> dict[str, Any]:
        """A variant's running state (``self._step.memory``) as saved in the state dict (copies, not aliases)."""
        return {key: _copied(value) for key, value in self._step.memory.items()}

    def _load_memory_state(self, memory: dict[str, Any]) -> None:
        params = self._params()
        loaded = {}
        for key, value in memory.items():
            if isinstance(value, list):
                if len(value) != len(params):
                    raise ValueError(
                        f"the checkpoint's {key!r} has {len(value)} entries but this optimizer has {len(params)} "
                        "parameters: resume with the same parameters and param groups"
                    )
                value = [None if v is None else v.to(t.device, t.dtype, copy=True) for v, t in zip(value, params)]
            else:
                value = _copied(value)
            loaded[key] = value
        self._step.memory.clear()  # the same dict object: a wrapper sharing it sees the loaded state
        self._step.memory.update(loaded)

    # ----------------------------------------------------------------------------------------------------------
    # the step protocol

    @property
    def phase(self) -> Phase:
        """Where the step in progress stands (``samkit.optim.protocol.Phase``)."""
        return self._step.phase

    @property
    def perturbed(self) -> bool:
        """Whether the weights currently sit at w + ε̂ (between first_step and restore/second_step)."""
        return self._step.phase is Phase.PERTURBED

    @property
    def will_perturb(self) -> Optional[bool]:
        """This step's decision once taken; before that, the rule's plan (None when it needs the gradient)."""
        if self._step.decided:
            return self._step.phase in (Phase.SAM, Phase.PERTURBED)
        return self._plan()

    @property
    def is_sam_step(self) -> bool:
        """Whether the current step perturbs; a loop can skip its second pass when this is False."""
        plan = self.will_perturb
        if plan is None:
            raise RuntimeError(
                f"{type(self).__name__} decides from the clean gradient whether a step perturbs: read the value "
                "first_step() returns (or call decide()) after the clean backward"
            )
        return plan

    @property
    def clean_gradient(self) -> Optional[list[Optional[Tensor]]]:
        """This step's clean gradient Σ_j weight_j g_j (one entry per parameter) for variants that read it in
        second_step (``uses_clean_gradient``); None otherwise. A data-parallel loop averages it over replicas
        in place before ``second_step`` (``sam_step`` does), so that every replica's variant state agrees."""
        return self._step.clean

    @property
    def training(self) -> bool:
        """Whether the weights are where training steps need them (see ``eval``); always True for SAM."""
        return True

    def eval(self) -> None:
        """Put the weights where evaluation and checkpoints must see them. SAM keeps them at w between steps, so
        this does nothing; a variant whose weights sit elsewhere between steps (Momentum-SAM) moves them back.
        A loop calls ``optimizer.eval()`` before evaluating or saving and ``optimizer.train()`` after."""

    def train(self) -> None:
        """Undo ``eval()`` before the next training step (nothing to undo for SAM)."""

    @property
    def steps(self) -> int:
        return self._step.steps

    @property
    def last_step_stats(self) -> Optional[StepStats]:
        """What the last completed step did (``samkit.optim.step_stats.StepStats``: ||g||, ||ε̂||, the loss rise,
        the LR, ...), as plain floats; None before the first step and while recording is off. The first read after
        a step copies its values from the device once; the step itself never waits for the device."""
        return self._stats.last()

    def record_step_stats(self, enabled: bool = True, *, cosine: bool = False) -> SAM:
        """Switch the recording of ``last_step_stats`` on (the default) or off, and the cosine between the clean
        and the perturbed gradient on (it keeps a copy of g and takes a dot product: see BENCHMARKS.md)."""
        if not isinstance(enabled, bool) or not isinstance(cosine, bool):
            raise TypeError(f"enabled and cosine must be True or False, got enabled={enabled!r}, cosine={cosine!r}")
        if cosine and not enabled:
            raise ValueError("cosine=True needs the recording on: call record_step_stats(True, cosine=True)")
        self._stats.configure(enabled, cosine)
        return self

    @property
    def sam_steps(self) -> int:
        return self._step.sam_steps

    @property
    def passes(self) -> float:
        return self._step.passes

    @torch.compiler.disable
    @torch.no_grad()
    def decide(self, grads: Optional[Sequence[Optional[Tensor]]] = None) -> bool:
        """Take this step's decision from its clean gradient (``p.grad``, or ``grads`` in param-group order).

        ``first_step`` calls it on the step's first call; call it yourself when the batch is split and the rule
        reads the gradient (AE-SAM): pass the whole batch's clean gradient, then call ``first_step`` per part.
        """
        if self._step.decided:
            raise RuntimeError(f"decide() called twice in one step (this step is already {self._step.phase.value})")
        self._stats.discard()  # a new step: nothing of an aborted one carries over
        sam = bool(self._decide(self._gradient_list(grads)))
        self._step.phase = Phase.SAM if sam else Phase.PLAIN
        return sam

    @torch.compiler.disable
    def skip_perturbation(self) -> None:
        """Make the step in progress a one-pass step without consulting the rule (call it before first_step)."""
        if self._step.decided:
            raise RuntimeError(f"skip_perturbation() after this step's decision (it is {self._step.phase.value})")
        self._stats.discard()
        self._step.phase = Phase.PLAIN

    @torch.compiler.disable
    @torch.no_grad()
    def first_step(
        self,
        zero_grad: bool = False,
        *,
        grads: Optional[Sequence[Optional[Tensor]]] = None,
        weight: float = 1.0,
        move: bool = True,
    ) -> bool:
        """Decide whether this step perturbs and, if so, save w and move to w + ε̂. Returns the decision.

        ``grads``, if given, lists one gradient (or None) per parameter in param-group order, e.g. the output of
        ``torch.autograd.grad``; ``p.grad`` is then left alone (that is how mSAM accumulates perturbed gradients).
        ``weight`` is this gradient's share of the batch (|B_j| / |B| for micro-batch j), for the variants that
        keep the step's clean gradient. ``move=False`` records the gradient and the decision but leaves the
        weights at w, for a caller that evaluates the perturbed gradient itself.

        On a one-pass step (the return value is False) nothing moves and the clean gradient is the descent
        gradient. With ``zero_grad=True`` it is set aside, so a loop that runs its second pass anyway hands the
        base optimizer the gradient at w once, not twice, and a loop that skips it gets it back.
        """
        state = self._step
        if state.phase is Phase.PERTURBED:
            raise RuntimeError(
                "first_step() called twice without second_step() (or restore()) in between: the weights are "
                "already perturbed"
            )
        if state.phase is Phase.PLAIN:
            raise RuntimeError(
                "first_step() called twice in a one-pass step (first_step returned False): call second_step()"
            )
        # a refusal (wrong grads, sparse or complex gradients, a non-finite norm or ε̂) leaves the step as it was
        before = (state.phase, state.clean if state.clean is None else list(state.clean), dict(state.memory))
        try:
            gradients = self._gradient_list(grads)
            if state.phase is Phase.READY:
                self._stats.discard()  # a new step: nothing of an aborted one carries over
                state.phase = Phase.SAM if bool(self._decide(gradients)) else Phase.PLAIN
            if state.phase is Phase.PLAIN:
                if zero_grad:
                    state.set_aside = [(t, t.grad) for t in self._params() if t.grad is not None]
                    self.zero_grad()
                return False
            if type(self).uses_clean_gradient:
                self._accumulate_clean(gradients, weight)
            else:
                self._stats.keep_clean(gradients, weight)
            if move:
                self._stats.ascent(self._ascend(gradients), weight)  # on a refusal the weights are back at w
            state.ascents += 1
        except BaseException:
            state.phase, state.clean = before[0], before[1]
            state.memory.clear()  # the same dict object: a wrapper sharing it sees the restored state
            state.memory.update(before[2])
            raise
        if zero_grad:
            self.zero_grad()
        return True

    def _accumulate_clean(self, gradients: list[Optional[Tensor]], weight: float) -> None:
        state = self._step
        if state.clean is None:
            state.clean = [None if g is None else g.detach() * weight for g in gradients]
            return
        for i, g in enumerate(gradients):
            if g is not None:
                state.clean[i] = g.detach() * weight if state.clean[i] is None else state.clean[i].add(g, alpha=weight)

    def _ascend(self, gradients: list[Optional[Tensor]]) -> dict[str, Tensor]:
        """Save w and move to w + ε̂; return the ascent's norms for the step's diagnostics (empty when off)."""
        groups = self._ascent_groups(self._perturbation_groups(gradients))
        keys = [t for g in groups for t in g.params]
        groups, shards = sharded.local_groups(groups)  # FSDP2: each rank's shards, the norm over all of them
        if shards is not None:
            _refuse_swap_when_sharded(self.restore_by)
        params = [t for g in groups for t in g.params]
        saved = self._saved_buffers(params, keys)
        record: Optional[dict[str, Tensor]] = {} if self._stats.enabled else None
        if self.restore_by == "swap":
            saved = self._swap_in(groups, params, saved, record)  # the original storages, swapped back on restore
        elif self.foreach and params:
            # save w, let ε̂ be computed in the weights' own memory (no temporary), then w = ε̂ + saved
            torch._foreach_copy_(saved, params)
            try:
                _, norm = perturbation(
                    groups,
                    eps=self.eps,
                    foreach=True,
                    out=[g.params for g in groups],
                    check_out=False,
                    shards=shards,
                    record=record,
                )
                torch._foreach_add_(params, saved)  # ε̂ + w: IEEE addition commutes, so bit-exact with w + ε̂
                self._check_written(groups, cast(Tensor, norm), params)  # params has gradients, so a norm exists
            except BaseException:
                torch._foreach_copy_(params, saved)  # the weights may hold part of ε̂: put w back
                raise
        elif params:  # the per-tensor reference path
            epsilons, norm = perturbation(groups, eps=self.eps, foreach=False, shards=shards, record=record)
            if not bool(torch.isfinite(cast(Tensor, norm))):
                self._raise_non_finite(cast(Tensor, norm))  # the weights were never touched
            for buffer, t, e in zip(saved, params, (e for eg in epsilons for e in eg)):
                buffer.copy_(t)
                t.add_(e)
            try:
                self._check_written(groups, cast(Tensor, norm), params)
            except BaseException:
                for t, buffer in zip(params, saved):
                    t.copy_(buffer)
                raise
        self._step.perturbed, self._step.saved = params, saved
        self._step.phase = Phase.PERTURBED
        return {} if record is None else record

    def _swap_in(
        self,
        groups: list[PerturbationGroup],
        params: list[Tensor],
        buffers: list[Tensor],
        record: Optional[dict[str, Tensor]] = None,
    ) -> list[Tensor]:
        """restore_by="swap": buffer = ε̂ + w (bit-exact with w + ε̂), then each parameter's data becomes its buffer.

        Returns the parameters' original data, which ``restore`` swaps back in."""
        nested, start = [], 0
        for group in groups:
            nested.append(buffers[start : start + len(group.params)])
            start += len(group.params)
        _, norm = perturbation(groups, eps=self.eps, foreach=self.foreach, out=nested, check_out=False, record=record)
        if self.foreach and params:
            torch._foreach_add_(buffers, params)
        else:
            for buffer, t in zip(buffers, params):
                buffer.add_(t)
        if norm is not None:
            self._check_written(groups, norm, buffers, params)  # the weights were never touched
        originals = [t.data for t in params]
        for t, buffer in zip(params, buffers):
            t.data = buffer
        return originals

    def _check_written(
        self, groups: list[PerturbationGroup], norm: Tensor, written: list[Tensor], params: Optional[list] = None
    ) -> None:
        """Raise unless the gradient norm and every value of w + ε̂ (``written``, for ``params``) are finite.

        The values are read only where they can be non-finite with a finite norm: fp16 / bf16 values (ε̂ rounded
        to them, w + ε̂ above their range), p other than 2 and inf (|g|^(q-1) overflows), eps = 0 (rho / a
        subnormal norm overflows). Otherwise |ε̂| <= rho T (T = 1, or |w| + eta for ASAM) holds by construction
        in float32 and float64, so w + ε̂ is finite for any weights below ~1e19, and the extra read of every
        weight is skipped (on CPU torch's norm kernels run tensor by tensor: costly for many small tensors)."""
        finite = torch.isfinite(norm)
        values = finite_by_norms(written) if self._values_can_overflow(groups, written) else None
        if bool(finite if values is None else finite & values.to(finite.device)):  # one synchronisation
            return
        if not bool(finite):
            self._raise_non_finite(norm)
        position = first_non_finite(written)
        if position is None:
            return  # finite values whose float32 norm overflowed (weights above ~1e19)
        t = (written if params is None else params)[position]
        index = next(i for i, q in enumerate(self._params()) if q is t)
        raise FloatingPointError(
            f"w + ε̂ is not finite in parameter {index} (shape {tuple(t.shape)}, {t.dtype}) although the gradient norm "
            f"is {norm.item()}: SAM will not write non-finite values into the weights (they are back at w). The "
            f"weights are close to the largest {t.dtype} value or rho is too large for it: lower rho, or keep the "
            "parameters in float32 and train under torch.autocast"
        )

    def _values_can_overflow(self, groups: list[PerturbationGroup], written: list[Tensor]) -> bool:
        if self.eps == 0.0 or any(float(g.p) not in (2.0, math.inf) for g in groups):
            return True
        return not {t.dtype for t in written}.isdisjoint(LOW_PRECISION)

    def _raise_non_finite(self, norm: Tensor) -> None:
        raise FloatingPointError(
            f"the gradient norm in first_step is {norm.item()}: SAM will not write non-finite values into the "
            "weights. Under mixed precision, unscale the gradients first or use samkit.sam_step(..., "
            "scaler=GradScaler()), which skips such steps"
        )

    @torch.compiler.disable
    @torch.no_grad()
    def restore(self) -> None:
        """Put back the saved weights (bit-exact) without stepping. A no-op when nothing is perturbed."""
        state = self._step
        if state.phase is not Phase.PERTURBED:
            return
        params, saved = state.perturbed, state.saved
        state.perturbed, state.saved = [], []
        state.phase = Phase.SAM
        if not params:
            return
        if self.restore_by == "swap":
            for t, original in zip(params, saved):
                t.data = original
        elif self.foreach:
            torch._foreach_copy_(params, saved)
        else:
            for t, buffer in zip(params, saved):
                t.copy_(buffer)

    @torch.compiler.disable
    @torch.no_grad()
    def second_step(
        self,
        zero_grad: bool = False,
        *,
        scaler: Optional[torch.amp.GradScaler] = None,
        max_grad_norm: Optional[float] = None,
        loss: Optional[Union[Tensor, float]] = None,
        perturbed_loss: Optional[Union[Tensor, float]] = None,
    ) -> None:
        """Restore w and run the base optimizer with the descent gradient (g_s, or g on a one-pass step).

        ``loss`` (the clean pass's, L(w)) and ``perturbed_loss`` (the second pass's, L(w + ε̂)), optional, go into
        ``last_step_stats`` (its ``loss_rise`` needs both); tensors are read only when the stats are.

        ``max_grad_norm`` clips the descent gradient's global 2-norm (after the variant has formed it, before the
        base step). With a ``scaler``, the gradients are unscaled here (once) and a step whose gradients
        overflowed is skipped whole, through ``scaler.step``: w restored, no base step, the variant's descent and
        state and the counters untouched; the caller still calls ``scaler.update()`` once per step. Without a
        scaler, an inf or NaN gradient of the perturbed pass (at w + ε̂) raises ``FloatingPointError`` as the
        clean pass's does in ``first_step``: w restored and the step abandoned (nothing stepped, counters and state
        as before the step). Step hooks registered on this optimizer (``register_step_pre_hook`` /
        ``register_step_post_hook``) run around it.
        """
        check_max_grad_norm(max_grad_norm)
        if not self._step.decided:
            raise RuntimeError("second_step() called without first_step(): call first_step() after the first backward")
        if self._step.phase is Phase.SAM and self._step.ascents == 0:
            raise RuntimeError(
                "second_step() in a SAM step without an ascent: the step was decided (decide()) but no first_step() "
                "succeeded, so there is no perturbed gradient to step with; call first_step() with this step's "
                "clean gradient, or abandon the step with cancel_step()"
            )
        self._stats.losses(loss, perturbed_loss)
        self.restore()  # the hooks see w, as they do around step()
        for hook in (*_global_optimizer_pre_hooks.values(), *self._optimizer_step_pre_hooks.values()):
            hook(self, (self,), {})
        self._finish_step(scaler, max_grad_norm)
        for hook in (*self._optimizer_step_post_hooks.values(), *_global_optimizer_post_hooks.values()):
            hook(self, (self,), {})
        if zero_grad:
            self.zero_grad()

    def _finish_step(self, scaler: Optional[torch.amp.GradScaler], max_grad_norm: Optional[float] = None) -> None:
        state = self._step
        self.restore()
        sam = state.phase is Phase.SAM
        if not sam and all(t.grad is None for t, _ in state.set_aside):  # a one-pass step whose loop ran no 2nd pass
            for t, g in state.set_aside:
                t.grad = g
        if self._stats.enabled:
            self._stats.before_descent(sam, self._params(), state.clean, self.param_groups[0].get("lr"))
        if scaler is not None and scaler.is_enabled():
            _unscale_once(scaler, self.base_optimizer)  # the variant's descent mixes g and g_s: both unscaled
            if _found_inf(scaler, self.base_optimizer):  # an overflow: the scaler's business, skipped whole
                scaler.step(self.base_optimizer)  # records the overflow for scaler.update() and skips the base step
                self.cancel_step()
                return
        elif sam:
            self._check_perturbed_gradient()
        self._descend(sam)
        if max_grad_norm is not None:
            if scaler is not None:
                _unscale_once(scaler, self.base_optimizer)
            torch.nn.utils.clip_grad_norm_([t for t in self._params() if t.grad is not None], max_grad_norm)
        if scaler is None:
            self.base_optimizer.step()
        else:
            scaler.step(self.base_optimizer)
        self._after_base_step(sam)
        state.end_step(sam, self._step_passes(sam))
        self._stats.end(state.steps, sam)
        self._opt_called = True  # what an LR scheduler attached to this optimizer checks for

    def _check_perturbed_gradient(self) -> None:
        """Abandon the step and raise when a gradient of the perturbed pass is inf or NaN (w is already restored)."""
        present = [(i, t) for i, t in enumerate(self._params()) if t.grad is not None and not t.grad.is_sparse]
        grads = [cast(Tensor, t.grad) for _, t in present]
        finite = finite_by_norms(grads)
        if finite is None or bool(finite):
            return
        position = first_non_finite(grads)
        if position is None:
            return  # finite gradients whose float32 norm overflowed
        index, t = present[position]
        self.cancel_step()
        raise FloatingPointError(
            f"the gradient of the perturbed pass (at w + ε̂) is inf or NaN in parameter {index} (shape "
            f"{tuple(t.shape)}): SAM will not write non-finite values into the weights. The weights are back at w "
            "and the step was abandoned (no base step; counters and state as before it): zero the gradients and go "
            "on with the next batch, lower rho or the learning rate, or under fp16 pass a GradScaler "
            "(second_step(scaler=...) or samkit.sam_step(..., scaler=...)), which skips such steps"
        )

    def _step_passes(self, sam: bool) -> float:
        """Forward-backward passes over the batch that this step cost."""
        return 2.0 if sam else 1.0

    @torch.compiler.disable
    @torch.no_grad()
    def cancel_step(self) -> None:
        """Abandon the current step: restore the weights and forget its decision (e.g. on an overflow)."""
        self.restore()
        self._step.phase = Phase.READY
        self._step.set_aside = []
        self._step.clean = None
        self._stats.discard()
        self._step.ascents = 0

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """One step with a standard closure (zero grads, forward, backward, return the loss).

        The closure runs twice on a SAM step and once on a one-pass step; returns the loss of the first call.
        """
        if closure is None:
            raise ValueError(
                f"{type(self).__name__}.step() needs a closure that zeroes the gradients, runs forward and backward "
                "and returns the loss; or use first_step()/second_step() with your own two passes"
            )
        closure = torch.enable_grad()(closure)
        loss = closure()
        perturbed_loss = None
        if self.first_step(zero_grad=True):
            try:
                perturbed_loss = closure()
            except BaseException:
                self.cancel_step()  # never leave the weights at w + ε̂
                raise
        self._stats.losses(_loss_value(loss), _loss_value(perturbed_loss))
        self._finish_step(None)  # step() itself runs the step hooks (torch wraps it)
        return loss

    # ----------------------------------------------------------------------------------------------------------
    # helpers

    def _gradient_list(self, grads: Optional[Sequence[Optional[Tensor]]]) -> list[Optional[Tensor]]:
        params = self._params()
        if grads is None:
            gradients = [t.grad for t in params]
        elif len(grads) != len(params):
            raise ValueError(
                f"grads has {len(grads)} entries but the optimizer has {len(params)} parameters: give one gradient "
                "(or None) per parameter, in param-group order"
            )
        else:
            gradients = list(grads)
        sparse = next((i for i, g in enumerate(gradients) if g is not None and g.is_sparse), None)
        if sparse is not None:  # on every step, whatever the rule decides: a one-pass step would work, the next not
            raise RuntimeError(sparse_gradient_message(params[sparse], sparse))
        return gradients

    def ascent_groups(self, grads: Sequence[Optional[Tensor]]) -> list[PerturbationGroup]:
        """The groups this optimizer's ascent perturbs for these gradients (one per parameter, None to leave it
        out), with this step's rho and the variant's direction: what a backend that computes ε̂ itself (the vmap
        backend of ``sam_step``) passes to ``samkit.optim.perturbation.perturbation``."""
        return self._ascent_groups(self._perturbation_groups(self._gradient_list(grads)))

    def _perturbation_groups(self, gradients: list[Optional[Tensor]]) -> list[PerturbationGroup]:
        position = 0
        groups = []
        for number, group in enumerate(self.param_groups):
            members = group["params"]
            start = position
            indexed = zip(range(start, start + len(members)), members, gradients[start : start + len(members)])
            position += len(members)
            present = [(i, t, g) for i, t, g in indexed if g is not None]
            complex_ = None
            if float(group["p"]) != 2.0:
                complex_ = next(((i, t) for i, t, g in present if t.is_complex() or g.is_complex()), None)
            if complex_ is not None:
                i, t = complex_
                raise ValueError(
                    f"p={group['p']!r} (param group {number}) is not defined for the complex parameter {i} (shape "
                    f"{tuple(t.shape)}, {t.dtype}): ε̂ for p != 2 takes the sign of each entry, which a complex number "
                    "does not have; use p=2 for this param group (it treats a complex entry as its real and imaginary "
                    "parts), or make the parameter real (e.g. a real tensor of shape (..., 2) viewed with "
                    "torch.view_as_complex in forward)"
                )
            pairs = [(t, g) for _, t, g in present]
            groups.append(
                PerturbationGroup.from_param_group(
                    group, [t for t, _ in pairs], [g for _, g in pairs], rho=self._group_rho(group)
                )
            )
        return groups

    def _saved_buffers(self, params: list[Tensor], keys: Optional[list[Tensor]] = None) -> list[Tensor]:
        """The buffers that hold w during the ascent, one per parameter, reused from step to step.

        ``keys`` are the parameters the buffers are kept under when ``params`` are views of them that may be new
        objects each step (the local shards of FSDP2's DTensors)."""
        state = self._step
        keys = params if keys is None else keys
        cached_params, cached_buffers, signature = state.buffer_list
        now = [(t.shape, t.dtype, t.device) for t in params]
        same_params = len(cached_params) == len(keys) and all(a is b for a, b in zip(cached_params, keys))
        if same_params and now == signature:
            return cached_buffers  # the common case: the same parameters as last step, shapes unchanged
        buffers = []
        for key, t in zip(keys, params):
            buffer = state.buffers.get(key)
            if buffer is None or buffer.shape != t.shape or buffer.dtype != t.dtype or buffer.device != t.device:
                buffer = torch.empty_like(t, memory_format=torch.preserve_format)
                state.buffers[key] = buffer
            buffers.append(buffer)
        state.buffer_list = (list(keys), buffers, now)
        return buffers

    # ----------------------------------------------------------------------------------------------------------
    # checkpoints and copies

    def state_dict(self) -> dict:
        """The base optimizer's state dict (its state, e.g. Adam's moments, and the shared groups) plus SAM's own:
        the counters, the options a resume must agree with, and a variant's running state."""
        if self._step.phase is not Phase.READY:
            raise RuntimeError(
                f"state_dict() called in the middle of a step (between first_step() and second_step(), phase "
                f"{self._step.phase.value}){': the weights are perturbed' if self.perturbed else ''}; save after "
                "second_step()"
            )
        state = self.base_optimizer.state_dict()
        state["sam"] = {
            "class": type(self).__name__,
            "base": type(self.base_optimizer).__name__,
            "shapes": [list(t.shape) for t in self._params()],
            "steps_taken": self._step.steps,
            "sam_steps": self._step.sam_steps,
            "passes": self._step.passes,
            "options": self._options(),
            "memory": self._memory_state(),
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict saved by the same class, around the same base optimizer, for parameters of the same
        shapes, with the same options; between steps. A mismatch raises, names it and the fix, and loads nothing."""
        if self._step.phase is not Phase.READY:
            raise RuntimeError(
                f"load_state_dict() called in the middle of a step (between first_step() and second_step(), phase "
                f"{self._step.phase.value}){': the weights are perturbed' if self.perturbed else ''}; finish the "
                "step with second_step() or abandon it with cancel_step() first, then load"
            )
        if "sam" not in state_dict:
            raise ValueError(
                "this state dict has no 'sam' entry: it was not saved by samkit.SAM.state_dict(); load a base "
                "optimizer's state with opt.base_optimizer.load_state_dict(...) instead"
            )
        saved = state_dict["sam"]
        saved_class = saved.get("class", "SAM")
        if saved_class != type(self).__name__:
            raise ValueError(
                f"this state dict was saved by samkit.{saved_class}, not {type(self).__name__}: build a "
                f"{saved_class} to resume it"
            )
        options = saved.get("options", {k: saved[k] for k in ("interval", "eps") if k in saved})
        mine = self._options()
        different = {k: (v, mine.get(k)) for k, v in options.items() if mine.get(k) != v}
        if different:
            name, (then, now) = next(iter(different.items()))
            raise ValueError(
                f"the checkpoint was saved with {name}={then!r}, this {type(self).__name__} has {name}={now!r}: "
                f"build it with {name}={then!r} to resume; to continue with other options on purpose, load the "
                "checkpoint first, then build a new optimizer and copy the base state with "
                "new.base_optimizer.load_state_dict(...)"
            )
        saved_base, base = saved.get("base"), type(self.base_optimizer).__name__
        if saved_base is not None and saved_base != base:
            raise ValueError(
                f"this state dict was saved by a {saved_class} around {saved_base}, this {type(self).__name__} wraps "
                f"{base}: its state ({saved_base}'s) would not fit; build the {type(self).__name__} with "
                f"base_optimizer={saved_base} to resume, or load only the model's weights to start {base} afresh"
            )
        self._check_shapes(saved.get("shapes"))
        base_state = {k: v for k, v in state_dict.items() if k != "sam"}
        self.base_optimizer.load_state_dict(base_state)
        self._link()  # load_state_dict replaced the base's group list and state
        for group in self.param_groups:
            for key in GROUP_OPTIONS:
                group.setdefault(key, self.defaults[key])
        self.cancel_step()
        self._step.steps = int(saved["steps_taken"])
        self._step.sam_steps = int(saved.get("sam_steps", 0))
        self._step.passes = float(saved.get("passes", 0.0))
        self._load_memory_state(dict(saved.get("memory", {})))

    def _check_shapes(self, shapes: Optional[list]) -> None:
        """Refuse a checkpoint saved for parameters of other shapes (its state, e.g. momenta, would not fit)."""
        if shapes is None:  # a checkpoint saved before the shapes were recorded
            return
        params = self._params()
        now = [list(t.shape) for t in params]
        if [list(s) for s in shapes] == now:
            return
        if len(shapes) != len(now):
            raise ValueError(
                f"this state dict was saved for {len(shapes)} parameters, this {type(self).__name__} has "
                f"{len(now)}: resume with the model the checkpoint was saved for, built the same way"
            )
        i = next(i for i, (a, b) in enumerate(zip(shapes, now)) if list(a) != b)
        raise ValueError(
            f"parameter {i} has shape {tuple(shapes[i])} in the state dict but {tuple(now[i])} here: resume with the "
            "model the checkpoint was saved for (same layers, same sizes, same order)"
        )

    def __getstate__(self) -> dict:
        # torch's Optimizer pickles only defaults/state/param_groups; a SAM needs all of its attributes. An
        # instance-level `step` (an LR scheduler's wrapper of the bound method) is left out, as torch does.
        return {k: v for k, v in self.__dict__.items() if k != "step"}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_stats", StepStatsRecorder())  # pickled before step stats existed

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_optimizer={self.base_optimizer!r}, {self._options()})"


def _refuse_swap_when_sharded(restore_by: str) -> None:
    if restore_by == "swap":
        raise ValueError(
            "restore_by='swap' cannot move FSDP2 (DTensor) parameters: fully_shard all-gathers each forward from "
            "its own sharded storage, not from param.data, so the perturbed pass would silently run at w instead of "
            "w + ε̂; use restore_by='copy' (the default)"
        )


def _loss_value(value: Any) -> Optional[Union[Tensor, float]]:
    """A closure's return value as the step's diagnostics take it: a scalar tensor or number, else None."""
    if isinstance(value, Tensor) and value.numel() == 1:
        return value
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _copied(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, list):
        return [_copied(v) for v in value]
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    return value


def finite_by_norms(tensors: Sequence[Tensor]) -> Optional[Tensor]:
    """A 0-dim bool tensor: whether every tensor's 2-norm is finite (None for no tensors), with no synchronisation.

    A NaN or inf entry makes the norm non-finite; fp16 / bf16 tensors are summed in float32, so their finite
    values never overflow it (float32 ones overflow it only above ~1e19: confirm with ``first_non_finite``). A
    2-norm, not max |x|: torch's 2-norm kernels are the fast ones."""
    low = [t for t in tensors if t.dtype in LOW_PRECISION]
    high = [t for t in tensors if t.dtype not in LOW_PRECISION]
    norms = list(torch._foreach_norm(high)) if high else []
    norms += list(torch._foreach_norm(low, dtype=torch.float32)) if low else []
    if not norms:
        return None
    device = norms[0].device
    if any(n.device != device for n in norms):  # tensors on several devices (model parallel)
        norms = [n.to(device) for n in norms]
    return torch.isfinite(torch.stack(norms)).all()


def first_non_finite(tensors: Sequence[Tensor]) -> Optional[int]:
    """The position of the first tensor holding an inf or NaN, None when all are finite (exact, one sync each)."""
    return next((i for i, t in enumerate(tensors) if not bool(torch.isfinite(t).all())), None)


def _found_inf(scaler: torch.amp.GradScaler, optimizer: Optimizer) -> bool:
    """Whether the gradients the scaler unscaled for this optimizer this step hold an inf or NaN."""
    found = scaler._per_optimizer_states[id(optimizer)].get("found_inf_per_device", {})
    return any(bool(v.item()) for v in found.values())


def _unscale_once(scaler: torch.amp.GradScaler, optimizer: Optimizer) -> None:
    """scaler.unscale_(optimizer) unless this step already did it (GradScaler refuses a second call)."""
    from torch.amp.grad_scaler import OptState

    if scaler.is_enabled() and scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY:
        scaler.unscale_(optimizer)
