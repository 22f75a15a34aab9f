"""BatchNorm and SAM: the pass at w + ε̂ must not update the running statistics.

A SAM step runs two forward passes in training mode. Left alone, BatchNorm layers would fold the statistics
of the perturbed pass into their running mean and variance (and count it in ``num_batches_tracked``), so
evaluation would use statistics of weights the model never takes. Inside ``frozen_running_stats`` BatchNorm
layers still normalise with the batch statistics (the gradient is the one of the training-mode loss) but
leave their buffers alone. InstanceNorm layers with ``track_running_stats=True`` update their buffers whatever
that flag says during training, so theirs are saved before the block and copied back after it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase


@contextmanager
def frozen_running_stats(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, BatchNorm (and InstanceNorm) layers in training mode do not update their running statistics.

    >>> bn = torch.nn.BatchNorm1d(2)
    >>> with frozen_running_stats(bn):
    ...     _ = bn(torch.randn(4, 2))
    >>> bn.num_batches_tracked.item()
    0
    """
    tracking = _tracking_layers(model)
    frozen = [m for m in tracking if isinstance(m, _BatchNorm)]
    saved = [
        (buffer, buffer.clone())
        for m in tracking
        if not isinstance(m, _BatchNorm)
        for buffer in (m.running_mean, m.running_var, m.num_batches_tracked)
        if buffer is not None
    ]
    for module in frozen:
        module.track_running_stats = False  # training-mode BN then normalises with batch stats, buffers untouched
    try:
        yield
    finally:
        for module in frozen:
            module.track_running_stats = True
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def has_running_stats(model: torch.nn.Module) -> bool:
    """Whether a forward pass of ``model`` in its current mode would update BatchNorm (or InstanceNorm) statistics."""
    return bool(_tracking_layers(model))


def _tracking_layers(model: torch.nn.Module) -> list[_NormBase]:
    return [m for m in model.modules() if isinstance(m, _NormBase) and m.training and m.track_running_stats]
