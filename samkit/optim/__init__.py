"""The SAM family: one step protocol (protocol.py), SAM implementing it (sam.py), one file per variant."""

from samkit.optim.aesam import AESAM
from samkit.optim.esam import ESAM
from samkit.optim.fsam import FriendlySAM
from samkit.optim.gsam import GSAM
from samkit.optim.ksam import KSAM
from samkit.optim.late_sam import LateSAM
from samkit.optim.looksam import LookSAM
from samkit.optim.momentum_sam import MomentumSAM
from samkit.optim.protocol import Phase
from samkit.optim.rst import RandomSAM
from samkit.optim.sam import SAM
from samkit.optim.sam_on import SAMOn

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
]
