from samkit.optim.sam import SAM

__all__ = ["SAM"]
