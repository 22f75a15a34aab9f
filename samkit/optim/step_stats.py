"""What a step of the SAM family did, recorded from values the step computes anyway: ``optimizer.last_step_stats``.

After each completed step every optimizer of the family (and ``sam_step``, and the closure API) holds a
``StepStats``: plain Python floats, or None where the step had nothing to measure::

    step            the optimizer's step count after this step (1 for the first)
    sam             whether the step had a perturbed pass (False: a one-pass step of LookSAM, RST, AE-SAM, interval ...)
    lr              param group 0's learning rate, as the base step used it
    grad_norm       the norm the ascent divided by: ||g||_q (q = p / (p - 1), 2 for SAM), ||T g||_q for ASAM
    eps_norm        ||ε̂||_2, the Euclidean length of the ascent step (rho for SAM; rho ||T² g|| / ||T g|| for ASAM)
    loss            the clean loss L(w), when the step was told it
    perturbed_loss  L(w + ε̂), when the step was told it
    loss_rise       perturbed_loss - loss: how much the ascent raised the loss (SAM's sharpness estimate)
    cosine          cos(g, g_s) between the clean and the perturbed gradient (opt-in: it costs a copy of g)

With micro-batches (mSAM: one ascent per micro-batch) ``grad_norm`` and ``eps_norm`` are the means over the
step's ascents, weighted by each micro-batch's share, and ``cosine`` compares the summed clean and perturbed
gradients. ``grad_norm`` and ``eps_norm`` are None on one-pass steps and for ``sam_step(backend="vmap")``, whose
ascent happens outside the optimizer; under DDP they are each replica's own (its ascent uses its own gradient).

The hot path never waits for the device: the step keeps its 0-dim tensors (the ascent's norm, the losses) and
``last_step_stats`` turns them into floats on first read, in ONE device-to-host copy; later reads are free.
Recording is on by default and costs a few scalar operations a step (BENCHMARKS.md); switch it off, or the
cosine on, with ``optimizer.record_step_stats(False)`` / ``optimizer.record_step_stats(cosine=True)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

Number = Union[float, int, Tensor]


@dataclass(frozen=True)
class StepStats:
    """One completed step of a SAM-family optimizer (see the module docstring for each field)."""

    step: int
    sam: bool
    lr: Optional[float] = None
    grad_norm: Optional[float] = None
    eps_norm: Optional[float] = None
    loss: Optional[float] = None
    perturbed_loss: Optional[float] = None
    loss_rise: Optional[float] = None
    cosine: Optional[float] = None

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON-ready: floats, ints, bools and None)."""
        return dataclasses.asdict(self)


FIELDS = tuple(f.name for f in dataclasses.fields(StepStats))
MEASURES = FIELDS[2:]  # the numbers a logger plots (step and sam are the x axis and a flag)


class StepStatsRecorder:
    """Collects one step's raw values (tensors stay on the device) and builds its ``StepStats`` when read.

    The optimizer calls ``start``, ``ascent``, ``keep_clean``, ``losses``, ``before_descent``, ``end`` and
    ``discard`` at the points of its step protocol; each returns at once when recording is off."""

    def __init__(self) -> None:
        self.enabled = True
        self.cosine = False
        self._pending: dict[str, Any] = {}
        self._clean: Optional[list[Optional[Tensor]]] = None  # the step's clean gradient, kept for the cosine
        self._spare: list[Tensor] = []  # the storage of that copy, reused
        self._raw: Optional[dict[str, Any]] = None  # the last completed step, not yet turned into floats
        self._last: Optional[StepStats] = None

    def configure(self, enabled: bool, cosine: bool) -> None:
        self.enabled, self.cosine = enabled, cosine
        if not enabled:
            self.clear()
        if not cosine:
            self._spare = []  # the copy's storage goes with the cosine

    # ------------------------------------------------------------------------------------------------ the step

    def ascent(self, record: dict[str, Tensor], weight: float) -> None:
        """One ascent of this step (several under mSAM): its gradient norm and ||ε̂||, weighted by its share."""
        if not self.enabled or "grad_norm" not in record:
            return
        self._pending.setdefault("ascents", []).append((float(weight), record["grad_norm"], record["eps_norm"]))

    def keep_clean(self, gradients: Sequence[Optional[Tensor]], weight: float) -> None:
        """Keep Σ_j weight_j g_j for the cosine (a copy: the loop may reuse or zero the gradients in place)."""
        if not (self.enabled and self.cosine):
            return
        present = [g.detach() for g in gradients if g is not None]
        if not present:
            return
        if self._clean is None:
            copies = self._buffers(present)
            torch._foreach_copy_(copies, present)
            if weight != 1.0:
                torch._foreach_mul_(copies, float(weight))
            kept = iter(copies)
            self._clean = [None if g is None else next(kept) for g in gradients]
            return
        pairs = [(c, g) for c, g in zip(self._clean, gradients) if c is not None and g is not None]
        if pairs:
            torch._foreach_add_([c for c, _ in pairs], [g.detach() for _, g in pairs], alpha=float(weight))

    def _buffers(self, like: list[Tensor]) -> list[Tensor]:
        """Storage for the copy of g, reused from step to step (a fresh one each step page-faults on CPU)."""
        spare = self._spare
        if len(spare) != len(like) or any(
            (b.shape, b.dtype, b.device) != (t.shape, t.dtype, t.device) for b, t in zip(spare, like)
        ):
            spare = self._spare = [torch.empty_like(t, memory_format=torch.preserve_format) for t in like]
        return spare

    def losses(self, loss: Optional[Number], perturbed_loss: Optional[Number]) -> None:
        if not self.enabled:
            return
        if loss is not None:
            self._pending["loss"] = _detached(loss)
        if perturbed_loss is not None:
            self._pending["perturbed_loss"] = _detached(perturbed_loss)

    def before_descent(self, sam: bool, params: Sequence[Tensor], clean: Optional[Sequence[Optional[Tensor]]], lr):
        """Right before the variant forms the descent gradient: .grad holds g_s (g on a one-pass step). Takes the
        cosine from ``clean`` (the variant's own kept g, else the copy of ``keep_clean``) and the learning rate."""
        if not self.enabled:
            return
        self._pending["lr"] = lr.detach().clone() if isinstance(lr, Tensor) else lr
        if not (self.cosine and sam):
            return
        kept = self._clean if self._clean is not None else clean
        if kept is None:
            return
        pairs = [(g, t.grad) for g, t in zip(kept, params) if g is not None and t.grad is not None]
        if pairs:
            self._pending["cosine"] = _cosine([g for g, _ in pairs], [s for _, s in pairs], own=kept is self._clean)

    def end(self, step: int, sam: bool) -> None:
        """The step is complete: its raw values become the last step's (turned into floats when read)."""
        self._clean = None
        if not self.enabled:
            self._pending = {}
            return
        self._raw = {**self._pending, "step": step, "sam": sam}
        self._pending = {}
        self._last = None

    def discard(self) -> None:
        """The step was abandoned (``cancel_step``): forget what it recorded."""
        self._pending = {}
        self._clean = None

    # ------------------------------------------------------------------------------------------------ reading

    def last(self) -> Optional[StepStats]:
        if self._last is None and self._raw is not None:
            self._last = _build(self._raw)
            self._raw = None  # the tensors can go
        return self._last

    def clear(self) -> None:
        self.discard()
        self._raw, self._last, self._spare = None, None, []

    def __getstate__(self) -> dict[str, Any]:
        # a pickled or deep-copied optimizer keeps its settings and its last stats as floats, not device tensors
        return {"enabled": self.enabled, "cosine": self.cosine, "last": self.last()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]
        self.enabled, self.cosine, self._last = state["enabled"], state["cosine"], state["last"]


def _detached(value: Number) -> Number:
    return value.detach() if isinstance(value, Tensor) else value


def _cosine(clean: list[Tensor], perturbed: list[Tensor], *, own: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(g·g_s, ||g||, ||g_s||) as 0-dim tensors; the division waits for the read. ``own``: ``clean`` may be
    overwritten (it is the recorder's copy), which spares a product buffer."""
    norms = torch._foreach_norm(clean), torch._foreach_norm(perturbed)
    if own:
        torch._foreach_mul_(clean, perturbed)
        products = clean
    else:
        products = list(torch._foreach_mul(clean, perturbed))
    device = products[0].device
    dot = _stacked([p.sum(dtype=_wide(p)) for p in products], device).sum()
    clean_norm, perturbed_norm = (torch.linalg.vector_norm(_stacked(list(ns), device)) for ns in norms)
    return dot, clean_norm, perturbed_norm


def _stacked(scalars: list[Tensor], device: torch.device) -> Tensor:
    """0-dim tensors stacked in float64 on ``device``: one cast for the lot when they share dtype and device."""
    if all(t.dtype == scalars[0].dtype and t.device == device for t in scalars):
        return torch.stack(scalars).to(torch.float64)
    return torch.stack([t.to(device, torch.float64) for t in scalars])


def _wide(t: Tensor) -> torch.dtype:
    """float32 for half-precision tensors (their sums lose too much), the tensor's own dtype otherwise."""
    return torch.promote_types(t.dtype, torch.float32)


def _build(raw: dict[str, Any]) -> StepStats:
    """Turn the raw values into floats with one copy from the device (per device, if several)."""
    keys, tensors = [], []

    def collect(key: str, value: Any) -> None:
        if isinstance(value, Tensor):
            keys.append(key)
            tensors.append(value.detach().reshape(()).to(torch.float64))

    for key in ("lr", "loss", "perturbed_loss"):
        collect(key, raw.get(key))
    for j, (_, grad_norm, eps_norm) in enumerate(raw.get("ascents", ())):
        collect(f"grad_norm/{j}", grad_norm)
        collect(f"eps_norm/{j}", eps_norm)
    for name, value in zip(("dot", "clean_norm", "perturbed_norm"), raw.get("cosine", ())):
        collect(f"cosine/{name}", value)
    values: dict[str, float] = {}
    by_device: dict[torch.device, list[int]] = {}
    for index, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(index)
    for indices in by_device.values():
        for index, value in zip(indices, torch.stack([tensors[i] for i in indices]).tolist()):
            values[keys[index]] = value

    def number(key: str) -> Optional[float]:
        if key in values:
            return values[key]
        value = raw.get(key)
        return None if value is None else float(value)

    ascents = raw.get("ascents", ())
    grad_norm = eps_norm = None
    if ascents:
        total = sum(w for w, _, _ in ascents) or 1.0
        grad_norm = sum(w * values[f"grad_norm/{j}"] for j, (w, _, _) in enumerate(ascents)) / total
        eps_norm = sum(w * values[f"eps_norm/{j}"] for j, (w, _, _) in enumerate(ascents)) / total
    loss, perturbed = number("loss"), number("perturbed_loss")
    cosine = None
    if "cosine" in raw:
        dot, a, b = values["cosine/dot"], values["cosine/clean_norm"], values["cosine/perturbed_norm"]
        cosine = dot / (a * b) if a > 0 and b > 0 else None
    return StepStats(
        step=int(raw["step"]),
        sam=bool(raw["sam"]),
        lr=number("lr"),
        grad_norm=grad_norm,
        eps_norm=eps_norm,
        loss=loss,
        perturbed_loss=perturbed,
        loss_rise=perturbed - loss if raw["sam"] and loss is not None and perturbed is not None else None,
        cosine=cosine,
    )
