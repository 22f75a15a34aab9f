"""One intra-op thread for these tests: their tensors are tiny, and on a shared 2-core machine OpenMP's
spinning threads made a batch-of-2 ResNet-56 forward 100x slower (1.9 s vs 0.014 s). Restored after."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
