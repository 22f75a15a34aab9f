"""samkit: sharpness-aware training for PyTorch (the SAM family), flatness measurements, experiments."""

from samkit.batchnorm import frozen_running_stats
from samkit.optim import (
    AESAM,
    ESAM,
    GSAM,
    KSAM,
    SAM,
    FriendlySAM,
    LateSAM,
    LookSAM,
    MomentumSAM,
    Phase,
    RandomSAM,
    SAMOn,
)
from samkit.step import sam_step

__all__ = [
    "SAM",
    "GSAM",
    "SAMOn",
    "FriendlySAM",
    "LookSAM",
    "RandomSAM",
    "AESAM",
    "LateSAM",
    "MomentumSAM",
    "ESAM",
    "KSAM",
    "Phase",
    "sam_step",
    "frozen_running_stats",
]
__version__ = "0.1.0"
