"""samkit: sharpness-aware training for PyTorch (SAM, ASAM, mSAM), flatness measurements, experiments."""

from samkit.batchnorm import frozen_running_stats
from samkit.optim import SAM
from samkit.step import sam_step

__all__ = ["SAM", "sam_step", "frozen_running_stats"]
__version__ = "0.1.0"
