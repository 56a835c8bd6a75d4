"""The direction computation compiles with torch.compile into one graph (fullgraph=True)."""

import pytest
import torch

import curvkit
from curvkit.blocks import default_block


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 5), (7,)])
def test_kronecker_direction_compiles_without_graph_breaks(shape):
    pre = curvkit.KroneckerMode()
    block = default_block("w", torch.nn.Parameter(torch.zeros(shape)), 0, max_factor_dim=None)
    m = torch.randn(block.shape)
    invs = [torch.randn(d, d) for d in block.shape]
    if len(invs) == 3:
        invs[1] = None  # an identity mode
    torch._dynamo.reset()
    compiled = torch.compile(lambda m, invs: pre.apply(block, {}, m, invs, gradient=m), fullgraph=True)
    torch.testing.assert_close(compiled(m, invs), pre.apply(block, {}, m, invs, gradient=m))
