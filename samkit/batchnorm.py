"""BatchNorm and SAM: the pass at w + ε̂ must not update the running statistics.

A SAM step runs two forward passes in training mode. Left alone, BatchNorm layers would fold the statistics
of the perturbed pass into their running mean and variance (and count it in ``num_batches_tracked``), so
evaluation would use statistics of weights the model never takes. Inside ``frozen_running_stats`` BatchNorm
layers still normalise with the batch statistics (the gradient is the one of the training-mode loss) but
leave their buffers alone.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch.nn.modules.batchnorm import _BatchNorm


@contextmanager
def frozen_running_stats(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, BatchNorm layers in training mode do not update their running statistics.

    >>> bn = torch.nn.BatchNorm1d(2)
    >>> with frozen_running_stats(bn):
    ...     _ = bn(torch.randn(4, 2))
    >>> bn.num_batches_tracked.item()
    0
    """
    frozen = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for module in frozen:
        module.track_running_stats = False  # training-mode BN then normalises with batch stats, buffers untouched
    try:
        yield
    finally:
        for module in frozen:
            module.track_running_stats = True


def has_running_stats(model: torch.nn.Module) -> bool:
    """Whether a forward pass of ``model`` in its current mode would update BatchNorm running statistics."""
    return any(isinstance(m, _BatchNorm) and m.training and m.track_running_stats for m in model.modules())
