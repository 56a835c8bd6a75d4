"""The block plan's ``preconditioning`` column: each preconditioner's one-line ``describe``."""

import torch
from torch import nn

import curvkit
from curvkit.blocks import BlockPlan, describe_kronecker
from curvkit.testing import make_block


def test_kronecker_descriptions_name_factored_and_identity_modes():
    assert describe_kronecker(make_block((64, 33))) == "Kronecker 2 modes: 64x64, 33x33"
    assert describe_kronecker(make_block((5,))) == "Kronecker 1 mode: 5x5"
    assert describe_kronecker(make_block((10, 300), factored=(True, False))) == (
        "Kronecker 1 of 2 modes: 10x10, identity (300)"
    )
    assert describe_kronecker(make_block((4, 3), factored=(False, False))) == "momentum (unfactored)"


def test_block_plan_has_a_preconditioning_column_from_the_preconditioner():
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3000))
    opt = curvkit.TNT(model.named_parameters(), max_factor_dim=1000)
    rows = opt.block_plan().rows()
    assert [r["preconditioning"] for r in rows] == [
        "Kronecker 2 modes: 4x4, 6x6", "Kronecker 1 mode: 4x4",
        "Kronecker 1 of 2 modes: identity (3000), 4x4", "momentum (unfactored)",
    ]
    text = str(opt.block_plan())
    assert text.splitlines()[0].split()[-1] == "preconditioning"
    assert all(line == line.rstrip() for line in text.splitlines())
    soap = curvkit.SOAP(model.parameters())
    assert soap.block_plan().rows()[0]["preconditioning"] == "Adam in the eigenbasis of 2 of 2 modes (SOAP)"
    muon = curvkit.Muon(model.parameters())
    assert muon.block_plan().rows()[1]["preconditioning"] == "unmodelled: AdamW (no curvature model)"
    # without descriptions (a BlockPlan built by hand) the column is absent
    assert "preconditioning" not in BlockPlan(opt.blocks).rows()[0]


def test_identity_and_default_descriptions():
    p = [nn.Parameter(torch.zeros(3, 2))]
    opt = curvkit.compose(p, estimator="tensor_normal", preconditioner="identity", inverter="identity")
    assert opt.block_plan().rows()[0]["preconditioning"] == "momentum (no curvature)"

    class Mine(curvkit.KroneckerMode):
        describe = curvkit.Preconditioner.describe  # the base class's default: the registered name

    assert Mine().describe(opt.blocks[0]) == "kronecker_mode"


def test_a_kronecker_mode_subclass_keeps_its_apply_for_every_block():
    """apply_group's shortcut for dense blocks must not bypass a subclass's apply()."""
    calls = []

    class Halved(curvkit.KroneckerMode):
        def apply(self, block, state, direction, inverses, *, gradient):
            calls.append(block.name)
            return 0.5 * super().apply(block, state, direction, inverses, gradient=gradient)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    plain = curvkit.compose(model.parameters(), estimator="tensor_normal", preconditioner="kronecker_mode",
                            inverter="damped_eigen", lr=0.1)
    blocks = plain.blocks
    dirs = [torch.randn(b.shape) for b in blocks]
    invs = [[torch.eye(d) * 2.0 for d in b.shape] for b in blocks]
    base = curvkit.KroneckerMode().apply_group(blocks, [{}] * len(blocks), dirs, invs, gradients=dirs)
    mine = Halved().apply_group(blocks, [{}] * len(blocks), dirs, invs, gradients=dirs)
    assert sorted(calls) == sorted(b.name for b in blocks)
    for a, b in zip(base, mine):
        torch.testing.assert_close(b, 0.5 * a)
