import zlib

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Every test gets fresh random inputs, reproducible per test name."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))  # stable across runs
    yield


# The suite's models are tiny: one intra-op thread is faster for them and avoids oversubscribing
# the CPU when other processes (a parallel build, a benchmark) share the machine.
torch.set_num_threads(1)
