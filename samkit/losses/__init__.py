"""One-pass losses with a trajectory term in place of SAM's second pass: MESA (an EMA of the weights as the
reference, one extra forward) and SAF (each example's logits of a few epochs ago, a memory N x delay x C)."""

from samkit.losses.kl import trajectory_kl
from samkit.losses.mesa import MESALoss
from samkit.losses.saf import IndexedDataset, SAFLoss

__all__ = ["MESALoss", "SAFLoss", "IndexedDataset", "trajectory_kl"]
