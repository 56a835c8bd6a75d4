import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Every test gets fresh random inputs, reproducible per test name."""
    torch.manual_seed(abs(hash(request.node.nodeid)) % (2**31))
    yield
