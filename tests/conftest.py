"""Test-session settings: one intra-op thread (small tensors; CI and developer machines have 2 shared cores)."""

import torch

torch.set_num_threads(1)
