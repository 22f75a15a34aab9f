"""``sam_step``: one complete step of any SAM-family optimizer (micro-batches, AMP, DDP, BatchNorm, clipping).

    api.py         sam_step itself: argument checks, precision, the final base step
    loop.py        the loop backend (any model, DDP, BatchNorm)
    vectorized.py  the vmap backend (torch.func, all micro-batches at once)
    selective.py   the loop for optimizers that select examples (ESAM, K-SAM), and select_examples for hand loops
    common.py      what both backends share
"""

from samkit.step.api import BACKENDS, PERTURBATIONS, sam_step
from samkit.step.common import split_batch
from samkit.step.selective import select_examples

__all__ = ["sam_step", "select_examples", "split_batch", "BACKENDS", "PERTURBATIONS"]
