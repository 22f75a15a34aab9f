"""The SAM family: one step protocol (protocol.py), SAM implementing it (sam.py), one file per variant."""

from samkit.optim.fsam import FriendlySAM
from samkit.optim.looksam import LookSAM
from samkit.optim.protocol import Phase
from samkit.optim.sam import SAM

__all__ = ["SAM", "FriendlySAM", "LookSAM", "Phase"]
