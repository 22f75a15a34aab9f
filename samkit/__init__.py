"""samkit: sharpness-aware training for PyTorch."""

from samkit.optim import SAM

__all__ = ["SAM"]
__version__ = "0.1.0"
