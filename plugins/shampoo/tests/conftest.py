import sys
import zlib
from pathlib import Path

import pytest
import torch

# the dense references live next to the tests (import mode is importlib: no implicit path)
sys.path.insert(0, str(Path(__file__).parent))

# tiny models: one intra-op thread is faster and does not oversubscribe a shared CPU
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Every test gets fresh random inputs, reproducible per test name (crc32: stable across runs,
    unlike the salted str hash)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
