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
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from samkit.optim.perturbation import PerturbationGroup, perturbation

_SAM_OPTIONS = ("rho", "p", "adaptive", "eta")
RESTORE_BY = ("copy", "swap")


def _check_group_options(group: dict) -> None:
    rho, p, eta = group["rho"], group["p"], group["eta"]
    if not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho < 0:
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
    if not isinstance(p, (int, float)) or math.isnan(p) or p <= 1:
        raise ValueError(f"p must be > 1 (2 for SAM, float('inf') for the sign variant), got {p!r}")
    if not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    if not isinstance(group["adaptive"], bool):
        raise ValueError(f"adaptive must be True or False, got {group['adaptive']!r}")


class SAM(Optimizer):
    """Sharpness-Aware Minimization around any ``torch.optim`` optimizer.

    Args:
        params: parameters or param-group dicts (a group may carry its own ``rho``, ``p``, ``adaptive``, ``eta``).
        base_optimizer: an Optimizer class (built here over the same param groups with ``base_kwargs``) or an
            already built instance over exactly these parameters.
        rho: radius of the neighbourhood (paper default 0.05; ASAM uses 0.5 to 1.0).
        p: the norm of the ρ-ball: 2 (default), ``float("inf")``, or any p > 1.
        adaptive: ASAM's scale-invariant ball, T = |w| + eta.
        eta: ASAM's offset (0 is the common definition; the ASAM authors use 0.01 on weights only, see README).
        eps: stabiliser added to the norm (outside it, as the common implementation does).
        interval: only every ``interval``-th step perturbs; the others are plain base steps.
        foreach: use ``torch._foreach_*`` kernels (default) or the plain per-tensor loop.
        restore_by: how the weights leave and come back to w, both bit-exact. ``"copy"`` (default) perturbs each
            parameter in its own memory and copies the saved w back: storage never changes, safe for anything.
            ``"swap"`` computes w + ε̂ in a second buffer and swaps it in with ``param.data = ...``, then swaps w
            back: no copies, about half the memory traffic of the ascent and restore (BENCHMARKS.md). Use it only
            when the model reads its parameters through the Parameter objects: NOT with FSDP or other
            flat-parameter wrappers, nor with tensors that view a parameter's storage, which would keep seeing w
            during the perturbed pass.

    Example (the two-step API)::

        >>> model = torch.nn.Linear(3, 1)
        >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> torch.nn.functional.mse_loss(model(x), y).backward()
        >>> opt.first_step(zero_grad=True)
        >>> torch.nn.functional.mse_loss(model(x), y).backward()
        >>> opt.second_step(zero_grad=True)
    """

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
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an integer >= 1 (1 = SAM on every step), got {interval!r}")
        if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        if restore_by not in RESTORE_BY:
            raise ValueError(f"restore_by must be one of {RESTORE_BY}, got {restore_by!r}")
        defaults = dict(rho=rho, p=p, adaptive=adaptive, eta=eta)
        _check_group_options(defaults)
        self.eps = float(eps)
        self.interval = interval
        self.foreach = True if foreach is None else bool(foreach)
        self.restore_by = restore_by
        self._steps_taken = 0  # SAM's own counter: decides which steps perturb when interval > 1
        self._saved: dict[Tensor, Tensor] = {}  # w before the ascent, keyed by parameter
        self._saved_list: tuple[list, list, list] = ([], [], [])  # last step's (params, buffers, shapes)
        self._perturbed: list[Tensor] = []  # parameters currently at w + ε̂
        self._perturbed_saved: list[Tensor] = []  # and their saved w, in the same order
        self._awaiting_second_step = False
        self._ascent_open = False  # first_step() ran and no restore()/second_step() has followed yet
        self._skipped_grads: list[tuple[Tensor, Tensor]] = []  # clean gradients kept on a step interval skips

        if isinstance(base_optimizer, Optimizer):
            if base_kwargs:
                raise TypeError(
                    f"options {sorted(base_kwargs)} were given for the base optimizer, but base_optimizer is an "
                    f"already built {type(base_optimizer).__name__}: pass them to its constructor instead"
                )
            super().__init__(params, defaults)
            self._adopt(base_optimizer)
            self.base_optimizer = base_optimizer
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
            super().__init__(params, defaults)
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        else:
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD) or an instance "
                f"built over the same parameters, got {base_optimizer!r}"
            )
        self._link()

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
                for key in _SAM_OPTIONS:
                    base_group[key] = sam_group[key]
        elif len(self.param_groups) == 1:
            for base_group in base.param_groups:
                for key in _SAM_OPTIONS:
                    base_group.setdefault(key, self.defaults[key])
                _check_group_options(base_group)
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
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        _check_group_options(param_group)
        base = self.__dict__.get("base_optimizer")
        if base is None:  # during Optimizer.__init__
            super().add_param_group(param_group)
        else:
            base.add_param_group(param_group)

    # ----------------------------------------------------------------------------------------------------------
    # the step

    @property
    def is_sam_step(self) -> bool:
        """Whether the current step perturbs (False on the steps that ``interval`` skips).

        A hand-written loop can skip its second forward-backward when this is False.
        """
        return self._steps_taken % self.interval == 0

    @property
    def perturbed(self) -> bool:
        """Whether the weights currently sit at w + ε̂ (between first_step and restore/second_step)."""
        return bool(self._perturbed)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, grads: Optional[Sequence[Optional[Tensor]]] = None) -> None:
        """Save w and move to w + ε̂, computed from ``p.grad`` (or from ``grads``).

        ``grads``, if given, lists one gradient (or None) per parameter in param-group order, e.g. the output of
        ``torch.autograd.grad``; ``p.grad`` is then left alone (that is how mSAM accumulates perturbed gradients).
        On a step that ``interval`` skips, nothing moves and the clean gradients are kept for ``second_step``:
        with ``zero_grad=True`` they are set aside, so a loop that runs its second pass anyway hands the base
        optimizer the gradient at w once, not twice, and a loop that skips it (see ``is_sam_step``) gets them back.
        """
        if self._ascent_open:
            raise RuntimeError(
                "first_step() called twice without second_step() (or restore()) in between"
                + (": the weights are already perturbed" if self._perturbed else "")
            )
        self._awaiting_second_step = True
        if not self.is_sam_step:
            if zero_grad:
                params = [t for group in self.param_groups for t in group["params"]]
                self._skipped_grads = [(t, t.grad) for t in params if t.grad is not None]
                self.zero_grad()
            self._ascent_open = True
            return
        groups = self._perturbation_groups(grads)
        params = [t for g in groups for t in g.params]
        saved = self._saved_buffers(params)
        if self.restore_by == "swap":
            saved = self._swap_in(groups, params, saved)  # now the original storages, swapped back on restore
        elif self.foreach and params:
            # save w, let ε̂ be computed in the weights' own memory (no temporary), then w = ε̂ + saved
            torch._foreach_copy_(saved, params)
            try:
                _, norm = perturbation(
                    groups, eps=self.eps, foreach=True, out=[g.params for g in groups], check_out=False
                )
                finite = bool(torch.isfinite(norm))
            except BaseException:
                torch._foreach_copy_(params, saved)  # the weights may hold part of ε̂: put w back
                raise
            if not finite:
                torch._foreach_copy_(params, saved)
                self._raise_non_finite(norm)
            torch._foreach_add_(params, saved)  # ε̂ + w: IEEE addition commutes, so bit-exact with w + ε̂
        else:  # the per-tensor reference path
            epsilons, norm = perturbation(groups, eps=self.eps, foreach=False)
            if norm is not None and not bool(torch.isfinite(norm)):
                self._raise_non_finite(norm)
            for buffer, t, e in zip(saved, params, (e for eg in epsilons for e in eg)):
                buffer.copy_(t)
                t.add_(e)
        self._perturbed, self._perturbed_saved = params, saved
        self._ascent_open = True
        if zero_grad:
            self.zero_grad()

    def _swap_in(self, groups: list[PerturbationGroup], params: list[Tensor], buffers: list[Tensor]) -> list[Tensor]:
        """restore_by="swap": buffer = ε̂ + w (bit-exact with w + ε̂), then each parameter's data becomes its buffer.

        Returns the parameters' original data, which ``restore`` swaps back in."""
        nested, start = [], 0
        for group in groups:
            nested.append(buffers[start : start + len(group.params)])
            start += len(group.params)
        _, norm = perturbation(groups, eps=self.eps, foreach=self.foreach, out=nested, check_out=False)
        if norm is not None and not bool(torch.isfinite(norm)):
            self._raise_non_finite(norm)  # the weights were never touched
        if self.foreach and params:
            torch._foreach_add_(buffers, params)
        else:
            for buffer, t in zip(buffers, params):
                buffer.add_(t)
        originals = [t.data for t in params]
        for t, buffer in zip(params, buffers):
            t.data = buffer
        return originals

    def _raise_non_finite(self, norm: Tensor) -> None:
        self._awaiting_second_step = False
        raise FloatingPointError(
            f"the gradient norm in first_step is {norm.item()}: SAM will not write non-finite values into the "
            "weights. Under mixed precision, unscale the gradients first or use samkit.sam_step(..., "
            "scaler=GradScaler()), which skips such steps"
        )

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the saved weights (bit-exact) without stepping. A no-op when nothing is perturbed."""
        params, saved = self._perturbed, self._perturbed_saved
        self._perturbed, self._perturbed_saved = [], []
        self._ascent_open = False
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

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, scaler: Optional[torch.amp.GradScaler] = None) -> None:
        """Restore w and run the base optimizer with the gradient taken at w + ε̂.

        With a ``scaler``, the base step goes through ``scaler.step`` (skipped when the gradients overflowed);
        the caller still calls ``scaler.update()`` once per step.
        """
        if not self._awaiting_second_step:
            raise RuntimeError("second_step() called without first_step(): call first_step() after the first backward")
        self.restore()
        skipped, self._skipped_grads = self._skipped_grads, []
        if all(t.grad is None for t, _ in skipped):  # a skipped step whose loop ran no second pass
            for t, g in skipped:
                t.grad = g
        if scaler is None:
            self.base_optimizer.step()
        else:
            scaler.step(self.base_optimizer)
        self._awaiting_second_step = False
        self._steps_taken += 1
        self._opt_called = True  # what an LR scheduler attached to this optimizer checks for
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def cancel_step(self) -> None:
        """Abandon the current step: restore the weights and forget the pending first_step (e.g. on an overflow)."""
        self.restore()
        self._skipped_grads = []
        self._awaiting_second_step = False

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """One SAM step with a standard closure (zero grads, forward, backward, return the loss).

        The closure runs twice (once on steps that ``interval`` skips); returns the loss of the first call.
        """
        if closure is None:
            raise ValueError(
                "SAM.step() needs a closure that zeroes the gradients, runs forward and backward and returns the "
                "loss; or use first_step()/second_step() with your own two passes"
            )
        closure = torch.enable_grad()(closure)
        loss = closure()
        sam = self.is_sam_step
        self.first_step(zero_grad=True)
        if sam:
            try:
                closure()
            except BaseException:
                self.cancel_step()  # never leave the weights at w + ε̂
                raise
        self.second_step()
        return loss

    # ----------------------------------------------------------------------------------------------------------
    # helpers

    def _perturbation_groups(self, grads: Optional[Sequence[Optional[Tensor]]]) -> list[PerturbationGroup]:
        if grads is not None:
            expected = sum(len(g["params"]) for g in self.param_groups)
            if len(grads) != expected:
                raise ValueError(
                    f"grads has {len(grads)} entries but the optimizer has {expected} parameters: give one gradient "
                    "(or None) per parameter, in param-group order"
                )
        position = 0
        groups = []
        for group in self.param_groups:
            members = group["params"]
            if grads is None:
                pairs = [(t, t.grad) for t in members]
            else:
                pairs = list(zip(members, grads[position : position + len(members)]))
            position += len(members)
            pairs = [(t, g) for t, g in pairs if g is not None]
            sparse = next((t for t, g in pairs if g.is_sparse), None)
            if sparse is not None:
                raise RuntimeError(
                    f"SAM does not support sparse gradients (parameter of shape {tuple(sparse.shape)}); use dense "
                    "gradients, e.g. nn.Embedding(..., sparse=False)"
                )
            groups.append(
                PerturbationGroup(
                    [t for t, _ in pairs],
                    [g for _, g in pairs],
                    rho=group["rho"],
                    p=group["p"],
                    adaptive=group["adaptive"],
                    eta=group["eta"],
                )
            )
        return groups

    def _saved_buffers(self, params: list[Tensor]) -> list[Tensor]:
        """The buffers that hold w during the ascent, one per parameter, reused from step to step."""
        cached_params, cached_buffers, signature = self._saved_list
        now = [(t.shape, t.dtype, t.device) for t in params]
        same_params = len(cached_params) == len(params) and all(a is b for a, b in zip(cached_params, params))
        if same_params and now == signature:
            return cached_buffers  # the common case: the same parameters as last step, shapes unchanged
        buffers = []
        for t in params:
            buffer = self._saved.get(t)
            if buffer is None or buffer.shape != t.shape or buffer.dtype != t.dtype or buffer.device != t.device:
                buffer = torch.empty_like(t, memory_format=torch.preserve_format)
                self._saved[t] = buffer
            buffers.append(buffer)
        self._saved_list = (list(params), buffers, now)
        return buffers

    # ----------------------------------------------------------------------------------------------------------
    # checkpoints

    def state_dict(self) -> dict:
        """The base optimizer's state dict (its state, e.g. Adam's moments, and the shared groups) plus SAM's own."""
        if self._perturbed:
            raise RuntimeError(
                "state_dict() called between first_step() and second_step(): the weights are perturbed; save "
                "after second_step()"
            )
        state = self.base_optimizer.state_dict()
        state["sam"] = {"steps_taken": self._steps_taken, "interval": self.interval, "eps": self.eps}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        if "sam" not in state_dict:
            raise ValueError(
                "this state dict has no 'sam' entry: it was not saved by samkit.SAM.state_dict(); load a base "
                "optimizer's state with opt.base_optimizer.load_state_dict(...) instead"
            )
        state_dict = dict(state_dict)
        sam_state = state_dict.pop("sam")
        self.base_optimizer.load_state_dict(state_dict)
        self._link()  # load_state_dict replaced the base's group list and state
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self._steps_taken = int(sam_state["steps_taken"])

    def __repr__(self) -> str:
        return f"SAM(base_optimizer={self.base_optimizer!r}, interval={self.interval}, eps={self.eps})"
