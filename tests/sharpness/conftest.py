"""The flatness tests run many tiny HVPs: one intra-op thread is several times faster for them on a shared
2-core machine (measured 2.4 ms vs 13 ms per HVP of the 31-parameter MLP); restored after each test module."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
