"""The ``data`` argument of every flatness measurement, and the loss over it.

``data`` is one ``(inputs, targets)`` batch or an iterable of such batches. With several batches the
measured function is the mean loss over all examples:

    L(w) = Σ_b |B_b| · loss_fn(model(x_b), y_b) / Σ_b |B_b|

which is the mean of the per-example losses when ``loss_fn`` averages over its batch (``reduction="mean"``,
the default of torch's losses), and the plain mean of batch losses when the batches have equal sizes.
|B_b| is the length of the targets (of the inputs when the targets are not a tensor).

A one-shot iterator (a generator) is read into a list once, since every measurement passes over the data
many times (``flatness_report`` does this once for its four measurements); a re-iterable (a list, a
DataLoader) is iterated again on each pass and must yield the same examples every time: random
augmentation is not allowed. A shuffling DataLoader gives the same Hessian in eval mode, but m-sharpness
depends on which examples share a micro-batch, and train mode (BatchNorm batch statistics, a dropout
mask seeded per batch index) on which share a batch: pass a fixed order for reproducible numbers.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn


def _is_batch(data: Any) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor)


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, Tensor) else value


def batch_size(inputs: Any, targets: Any) -> int:
    for value in (targets, inputs):
        if isinstance(value, Tensor) and value.dim() >= 1:
            return value.shape[0]
    return 1


class Batches:
    """Re-iterable view of ``data`` yielding ``(index, inputs, targets, size)`` on ``device``."""

    def __init__(self, data: Any, device: torch.device):
        if data is None:
            raise ValueError("data is None; pass an (inputs, targets) tuple or an iterable of such batches")
        if _is_batch(data):
            self._source: Iterable = [tuple(data)]
        elif isinstance(data, Iterator):
            self._source = list(data)
        elif isinstance(data, Iterable) and not isinstance(data, (Tensor, str, bytes)):
            self._source = data
        else:
            raise TypeError(
                f"data must be an (inputs, targets) tuple or an iterable of such batches, got {type(data).__name__}"
            )
        self.device = device

    def __iter__(self) -> Iterator[tuple[int, Any, Any, int]]:
        count = 0
        for index, batch in enumerate(self._source):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError(
                    f"batch {index} of data must be an (inputs, targets) pair, got {type(batch).__name__}"
                    + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
                )
            inputs, targets = batch
            size = batch_size(inputs, targets)
            if size == 0:
                raise ValueError(f"batch {index} of data is empty (0 examples); drop empty batches")
            count += 1
            yield index, _to(inputs, self.device), _to(targets, self.device), size
        if count == 0:
            raise ValueError("data is empty: it yielded no batches; pass at least one (inputs, targets) batch")


def reusable(data: Any) -> Any:
    """``data`` itself, or a list of its batches when it is a one-shot iterator (for several measurements)."""
    return list(data) if isinstance(data, Iterator) and not _is_batch(data) else data


def batch_loss(model: nn.Module, loss_fn: Callable, inputs: Any, targets: Any, *, index: int) -> Tensor:
    """``loss_fn(model(inputs), targets)``, checked to be a scalar tensor (not yet checked to be finite)."""
    loss = loss_fn(model(inputs), targets)
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} on batch {index}")
    if loss.numel() != 1 or loss.dim() > 1:
        raise ValueError(
            f"loss_fn must return a scalar, got a tensor of shape {tuple(loss.shape)} on batch {index}; "
            "use a reduction such as reduction='mean'"
        )
    return loss.reshape(())


def check_finite(value: float, *, where: str) -> float:
    if not math.isfinite(value):
        raise ValueError(
            f"the loss is not finite ({value}) {where}; check the weights (a diverged model) and the data "
            "(NaN or Inf inputs)"
        )
    return value


def split_micro_batches(inputs: Any, targets: Any, size: int) -> Sequence[tuple[Tensor, Tensor]]:
    """Consecutive micro-batches of exactly ``size`` examples; a shorter remainder is left out."""
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise TypeError(
            "m-sharpness splits batches into micro-batches, so inputs and targets must be tensors; got "
            f"{type(inputs).__name__} and {type(targets).__name__}"
        )
    full = inputs.shape[0] // size
    return [(inputs[i * size : (i + 1) * size], targets[i * size : (i + 1) * size]) for i in range(full)]
