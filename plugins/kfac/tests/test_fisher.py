r"""KFAC's Fisher approximation where theory says it is exact.

For one linear layer :math:`z = W a + b` with a Gaussian likelihood :math:`y \sim N(z, I)` the
per-example Fisher is :math:`J_n^\top J_n` with :math:`J_n = \partial z_n / \partial \theta`, and
the Fisher :math:`F = E_n[J_n^\top J_n] = I \otimes E[\tilde a \tilde a^\top]` (row-major ``vec``
of ``[W b]``, :math:`\tilde a = (a, 1)`) is exactly a Kronecker product: KFAC's :math:`G \otimes A`
with :math:`G = E[\epsilon \epsilon^\top] = I` in expectation over the sampled targets.

The exact Fisher is built by brute force (one Jacobian per example, averaged); KFAC's factors come
from the optimizer's own sampled evidence, averaged exactly over many draws by ``warm_start``.
"""

import torch
from torch import nn

import curvkit_kfac


def _exact_fisher(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    W, b = layer.weight.detach(), layer.bias.detach()
    total = 0
    for n in range(x.shape[0]):
        def z(theta, a=x[n]):
            wb = theta.reshape(W.shape[0], W.shape[1] + 1)
            return wb[:, :-1] @ a + wb[:, -1]

        theta = torch.cat([W, b[:, None]], 1).reshape(-1)
        J = torch.autograd.functional.jacobian(z, theta)  # (out, out * (in + 1))
        total = total + J.T @ J  # Gaussian likelihood with identity covariance: F_n = J^T J
    return total / x.shape[0]


def test_kfac_equals_the_exact_fisher_of_a_linear_gaussian_model():
    layer = nn.Linear(4, 3).double()
    x = torch.randn(256, 4, dtype=torch.float64)
    exact = _exact_fisher(layer, x)
    opt = curvkit_kfac.KFAC(layer, seed=3)
    draws = 200  # 256 * 200 sampled targets: relative sampling error of G about 1e-2
    assert opt.warm_start([x] * draws, layer, loss="mse") == draws
    state = opt.block_state(0)["estimator"]
    kfac = torch.kron(state["G"], state["A"])
    rel = torch.linalg.norm(kfac - exact) / torch.linalg.norm(exact)
    assert rel < 0.05, f"KFAC Fisher differs from the exact Fisher by {float(rel):.3e} (relative)"
    # the A side is exact (no sampling), G is the identity up to sampling noise
    a = torch.cat([x, torch.ones(256, 1, dtype=x.dtype)], 1)
    torch.testing.assert_close(state["A"], a.T @ a / 256, rtol=1e-12, atol=1e-12)
    assert torch.linalg.norm(state["G"] - torch.eye(3, dtype=torch.float64)) < 0.05
