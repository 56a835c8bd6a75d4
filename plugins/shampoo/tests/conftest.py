import sys
from pathlib import Path

import pytest
import torch

# the dense references live next to the tests (import mode is importlib: no implicit path)
sys.path.insert(0, str(Path(__file__).parent))

# tiny models: one intra-op thread is faster and does not oversubscribe a shared CPU
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Every test gets fresh random inputs, reproducible per test name within a run."""
    torch.manual_seed(abs(hash(request.node.nodeid)) % (2**31))
    yield
