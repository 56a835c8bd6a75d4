"""The step engine: no host reads on steady-state steps, shared counters, micro-batch
accumulation, float32 statistics under autocast, stale-curvature detection, robust inversion."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import curvkit
from curvkit.testing import count_host_reads
from tests.methods_under_test import build, build_with_period, method_names, tiny_model, train_step

D = torch.float64


@pytest.mark.parametrize("name", method_names())
def test_steady_state_steps_read_nothing_on_the_host(name):
    model = tiny_model()
    opt = build_with_period(name, model, 2)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    for _ in range(3):  # t = 0, 1, 2: inversions (early phase, then t % T2 == 0)
        train_step(model, opt, x, y)
    counted = 0
    for _ in range(4):
        if opt._inverse_due(opt.param_groups[0]):
            train_step(model, opt, x, y)
            continue
        with count_host_reads() as counts:
            train_step(model, opt, x, y)
        counted += 1
        assert counts.count == 0, (name, counts.where[:8])
    assert counted == 2


@pytest.mark.parametrize("name", method_names())
def test_inversion_steps_read_the_host_once(name):
    """A step that inverts reads the host once (CPU: one device): the state checks, the
    finiteness of every inverse and the health counters come back in one read."""
    model = tiny_model()
    opt = build_with_period(name, model, 2)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    for _ in range(3):
        train_step(model, opt, x, y)
    counted = 0
    for _ in range(4):
        if not opt._inverse_due(opt.param_groups[0]):
            train_step(model, opt, x, y)
            continue
        with count_host_reads() as counts:
            train_step(model, opt, x, y)
        counted += 1
        assert counts.count == 1, (name, counts.where)
    assert counted == 2


def _no_inversion_opt():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    return model, curvkit.TNT(model, lr=1e-2, invert_every=3, curvature_every=1)


def test_counters_are_shared_with_a_copy_of_the_attribute_dict():
    """Lightning's LightningOptimizer copies the optimizer's __dict__ and calls update_curvature
    on the copy, step on the original."""
    model, opt = _no_inversion_opt()
    wrapper = object.__new__(type(opt))
    wrapper.__dict__ = opt.__dict__.copy()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for _ in range(3):
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        wrapper.zero_grad()
        assert wrapper.update_curvature(out, loss="cross_entropy")
        loss.backward()
        opt.step()
    assert opt.step_count == wrapper.step_count == 3
    assert all(v == 0 for h in opt.health().values() for v in h.values())


def test_micro_batches_accumulate_to_the_whole_batch():
    torch.manual_seed(0)
    x = torch.randn(10, 6, dtype=D)
    t = torch.randn(10, 3, dtype=D)

    def det_loss(targets):
        return lambda out, gen=None: (torch.sin(out) * targets).sum() / out.shape[0]

    def make():
        torch.manual_seed(1)
        m = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
        return m, curvkit.TNT(m, lr=1e-2)

    whole_m, whole = make()
    out = whole_m(x)
    whole.update_curvature(out, loss=det_loss(t))
    split_m, split = make()
    for sl in (slice(0, 3), slice(3, 10)):
        assert split.update_curvature(split_m(x[sl]), loss=det_loss(t[sl]))
    for a, b in zip(whole.blocks, split.blocks):
        sa, sb = whole.block_state(a)["estimator"], split.block_state(b)["estimator"]
        for ga, gb in zip(sa["grams"], sb["grams"]):
            torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-14)


def test_statistics_are_float32_under_bf16_autocast():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    ref = copy.deepcopy(m)
    a, b = curvkit.TNT(m, seed=3), curvkit.TNT(ref, seed=3)
    x = torch.randn(32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
        a.update_curvature(out.float(), loss="cross_entropy")
    b.update_curvature(ref(x), loss="cross_entropy")
    for ba, bb in zip(a.blocks, b.blocks):
        for ga, gb in zip(a.block_state(ba)["estimator"]["grams"], b.block_state(bb)["estimator"]["grams"]):
            assert ga.dtype == torch.float32
            # forward in bf16 changes the evidence a little; statistics themselves are float32
            assert torch.linalg.matrix_norm(ga - gb) <= 0.1 * torch.linalg.matrix_norm(gb) + 1e-6


def test_stale_curvature_is_counted_and_warned_or_raises_when_strict():
    model, opt = _no_inversion_opt()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    train_step(model, opt, x, y)
    with pytest.warns(curvkit.CurvkitWarning, match="no new curvature evidence"):
        for _ in range(2):  # a loop that forgot update_curvature after the first step
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert sum(h["missing_statistics"] for h in opt.health().values()) == 2 * len(opt.blocks)
    strict = curvkit.TNT(model, lr=1e-2, strict=True)
    train_step(model, strict, x, y)
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="no new curvature evidence"):
        strict.step()


def test_one_failing_factor_does_not_send_its_batch_mates_to_float64():
    class FailsOnNaNBatch(curvkit.DampedEigen):
        def invert(self, matrices, *, damping, order):
            if matrices.shape[0] > 1:
                raise torch.linalg.LinAlgError("batch failed")
            if matrices.dtype == torch.float32 and float(matrices[0, 0, 0]) < 0:
                raise torch.linalg.LinAlgError("this one fails")
            return super().invert(matrices, damping=damping, order=order)

    torch.manual_seed(0)
    w1, w2 = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4, 3))
    opt = curvkit.compose([w1, w2], estimator="tensor_normal", inverter=FailsOnNaNBatch(), lr=1e-2, damping=0.1)
    g1 = torch.randn(4, 3)
    opt.update_curvature(grads=[g1, torch.randn(4, 3)])
    opt.block_state(0)["estimator"]["grams"][0][0, 0] = -1.0  # only block 0's first factor fails in float32
    w1.grad, w2.grad = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.warns(curvkit.CurvkitWarning, match="float64"):
        opt.step()
    health = opt.health()
    assert health["group0.param0"]["inverse_retry_float64"] == 1
    assert health["group0.param1"]["inverse_retry_float64"] == 0


def test_default_tnt_on_the_mnist_autoencoder_shapes_is_healthy():
    torch.manual_seed(0)
    sizes = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    opt = curvkit.TNT(model)
    x = torch.rand(16, 784)
    with warnings.catch_warnings():
        warnings.simplefilter("error", curvkit.CurvkitWarning)
        for _ in range(4):
            out = model(x)
            loss = nn.functional.binary_cross_entropy_with_logits(out, x, reduction="sum") / 16
            opt.zero_grad()
            opt.update_curvature(out, loss="bce_with_logits")
            loss.backward()
            opt.step()
    assert all(v == 0 for h in opt.health().values() for v in h.values())


def test_grouped_directions_equal_one_by_one():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 4, dtype=D)) for _ in range(3)] + [nn.Parameter(torch.randn(6, dtype=D)) for _ in range(2)]
    opt = curvkit.TNT(params, lr=0.1)
    opt.update_curvature(grads=[torch.randn_like(p) for p in params])
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    opt.step()
    for p, b, blk in zip(params, before, opt.blocks):
        inv = opt.block_state(blk)["inverses"]
        expected = curvkit.contractions.mode_products(p.grad, inv)
        torch.testing.assert_close(p.detach(), b - 0.1 * expected, rtol=1e-12, atol=1e-12)


def test_relative_damping_keeps_the_preconditioner_shape_at_every_evidence_scale():
    """Absolute damping: at small evidence scale damping dominates and a k-mode block moves
    about g / eps^k. Relative damping (eps times the factors' average eigenvalue c) is a fixed
    fraction of each factor's spectrum: scaling the evidence by s scales the Fisher estimate by
    s^2 and the direction exactly by 1/s^2, its shape unchanged."""

    def direction(order, scale, relative):
        shape = (4,) * order
        w = nn.Parameter(torch.zeros(shape, dtype=D))
        opt = curvkit.TNT([w], lr=1.0, momentum=0.0, damping=0.1, relative_damping=relative)
        torch.manual_seed(1)
        opt.update_curvature(grads=[scale * torch.randn(shape, dtype=D)])
        torch.manual_seed(2)
        w.grad = torch.randn(shape, dtype=D)
        opt.step()
        return -w.detach()

    for order in (1, 2, 3):
        small, big = direction(order, 1e-3, True), direction(order, 1e3, True)
        torch.testing.assert_close(small * 1e-6, big * 1e6, rtol=1e-9, atol=0)
        small, big = direction(order, 1e-3, False), direction(order, 1e3, False)
        assert not torch.allclose(small * 1e-6, big * 1e6, rtol=1e-3)
    # absolute damping where it dominates: |P| ~ |g| / eps^k grows with the block's order
    ratios = [float(direction(k, 1e-4, False).norm() / torch.randn((4,) * k, generator=torch.Generator().manual_seed(2), dtype=D).norm()) for k in (1, 2, 3)]
    assert ratios[2] > 50 * ratios[0]


def test_statistics_inside_autocast_are_computed_in_float32_exactly():
    """The same evidence fed inside and outside bf16 autocast gives bit-identical statistics
    (the mode Grams must not run as bf16 matmuls)."""
    torch.manual_seed(0)
    shapes = [(16, 12), (12,)]
    grads = [torch.randn(s) for s in shapes]
    a = curvkit.TNT([nn.Parameter(torch.zeros(s)) for s in shapes])
    b = curvkit.TNT([nn.Parameter(torch.zeros(s)) for s in shapes])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a.update_curvature(grads=grads)
    b.update_curvature(grads=grads)
    for ba, bb in zip(a.blocks, b.blocks):
        for ga, gb in zip(a.block_state(ba)["estimator"]["grams"], b.block_state(bb)["estimator"]["grams"]):
            assert ga.dtype == torch.float32 and torch.equal(ga, gb)


def test_the_finiteness_norms_reach_the_estimator_and_keep_its_statistics_exact():
    """The feed hands each block the squared norm its finiteness check computed (0 where the
    evidence is not finite); TNT's trace EMA uses it and matches the trace from the gradients."""
    from curvkit.interfaces import BlockEvidence

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    opt = curvkit.TNT(model, lr=0.1, invert_every=1)
    seen: list[list[BlockEvidence]] = []
    original = opt.estimator.update_group

    def spy(blocks, states, evidence, **kw):
        seen.append(list(evidence))
        return original(blocks, states, evidence, **kw)

    opt.estimator.update_group = spy
    x = torch.randn(8, 5)
    for t in range(2):
        before = [opt.block_state(i)["estimator"]["trace"].clone() for i in range(4)]
        out = model(x)
        opt.zero_grad()
        opt.update_curvature(out, loss="cross_entropy")
        if t == 1:  # non-finite sampled evidence for the first weight
            pending = opt._collector._pending
            pending[id(model[0].weight)][0, 0] = float("nan")
        nn.functional.cross_entropy(out, torch.zeros(8, dtype=torch.long)).backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()  # an inversion step: its one host read brings the count and the warning
        assert any("non-finite curvature evidence" in str(w.message) for w in caught) == (t == 1)
    first, second = seen
    for ev in first:
        (g,) = ev.gradients
        torch.testing.assert_close(ev.squared_norm, g.pow(2).sum(), rtol=1e-6, atol=0)
    assert second[0].squared_norm == 0 and not bool(second[0].valid)
    assert torch.equal(opt.block_state(0)["estimator"]["trace"], before[0])  # invalid: unchanged
    for i in (1, 2, 3):  # valid: EMA of ||g||^2 with the preset's decay
        state = opt.block_state(i)["estimator"]
        (g,) = second[i].gradients
        decay = opt.estimator.config.stat_decay
        torch.testing.assert_close(state["trace"], decay * before[i] + (1 - decay) * g.pow(2).sum())
    assert opt.health()[opt.blocks[0].name]["skipped_nonfinite_evidence"] == 1


def test_an_estimator_that_does_not_ask_for_squared_norms_gets_none():
    """The feed forms the squared norms only for an estimator whose EvidenceSpec asks (TNT's
    KL estimate does not read them)."""
    from curvkit.interfaces import BlockEvidence

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    opt = curvkit.TNT_KL(model, lr=0.1)
    assert not opt.evidence.squared_norms and curvkit.TNT(model).evidence.squared_norms
    seen: list[BlockEvidence] = []
    original = opt.estimator.update_group

    def spy(blocks, states, evidence, **kw):
        seen.extend(evidence)
        return original(blocks, states, evidence, **kw)

    opt.estimator.update_group = spy
    out = model(torch.randn(8, 5))
    opt.zero_grad()
    opt.update_curvature(out, loss="cross_entropy")
    nn.functional.cross_entropy(out, torch.zeros(8, dtype=torch.long)).backward()
    opt.step()
    assert len(seen) == 4 and all(ev.squared_norm is None and ev.gradients[0] is not None for ev in seen)


def test_kronecker_apply_group_equals_mode_products_for_every_dense_pattern():
    """The written-out CPU products of apply_group: vectors and matrices, modes left as
    identity (None), inverses in another dtype, and an eigenbasis operator (through apply)."""
    from curvkit.operators import EigenBasis

    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 4)), nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(3, 2)),
              nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(2, 5))]
    blocks = curvkit.TNT(params, lr=0.1).blocks
    dirs = [torch.randn(b.shape) for b in blocks]

    def spd(d, dtype=torch.float32):
        a = torch.randn(d, d, dtype=dtype)
        return a @ a.T + torch.eye(d, dtype=dtype)

    q, _ = torch.linalg.qr(torch.randn(2, 2, dtype=D))
    invs = [
        [spd(5), spd(4)],
        [spd(6, D)],  # float64 inverse of a float32 direction: cast to the direction's dtype
        [None, spd(2)],
        [spd(4, D), None],
        [EigenBasis(q, torch.rand(2, dtype=D) + 0.5, 0), spd(5)],
    ]
    got = curvkit.KroneckerMode().apply_group(blocks, [{}] * len(blocks), dirs, invs, gradients=dirs)
    for d, inv, g in zip(dirs, invs, got):
        cast = [v.to(d.dtype) if isinstance(v, torch.Tensor) else v for v in inv]
        assert g.dtype == d.dtype
        torch.testing.assert_close(g, curvkit.contractions.mode_products(d, cast), rtol=0, atol=0)


def _bits_of(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a floating tensor (so that -0.0, +0.0 and NaN payloads compare exactly)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _awkward(shape, dtype, gen):
    """Random entries with the values a mask must carry through or drop: NaN, both infinities, -0.0."""
    t = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    flat = t.view(-1)
    flat[0], flat[1], flat[2], flat[3] = float("nan"), float("inf"), float("-inf"), -0.0
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_zero_unless_is_where_bit_for_bit(dtype):
    from curvkit.engine import finite

    gen = torch.Generator().manual_seed(0)
    big = finite._BITWISE_MIN
    tensors = [
        _awkward((big,), dtype, gen),
        _awkward((80, 70), dtype, gen),  # a matrix
        _awkward((70, 80), dtype, gen).T,  # not contiguous
        _awkward((big - 1,), dtype, gen),
        _awkward((5, 3), dtype, gen),
    ]
    before = [t.clone() for t in tensors]
    for pattern in ([True, False, True, False, True], [False, True, False, True, False], [True] * 5, [False] * 5):
        flags = torch.tensor(pattern)
        out = finite.zero_unless(flags, tensors)
        for o, t, ok in zip(out, tensors, pattern):
            ref = torch.where(torch.tensor(ok), t, torch.zeros((), dtype=dtype))
            assert o.dtype == dtype and o.shape == t.shape
            assert torch.equal(_bits_of(o.contiguous()), _bits_of(ref.contiguous()))  # -0.0 kept, NaN bits kept, +0.0 dropped
        assert finite.zero_unless(flags, tensors, flag_list=flags.unbind(0))[1].data_ptr() != tensors[1].data_ptr()
    for t, b in zip(tensors, before):
        assert torch.equal(_bits_of(t.contiguous()), _bits_of(b.contiguous()))  # inputs untouched


def test_zero_unless_mixes_widths_and_non_floating_tensors_in_one_call():
    """One call over float32, float64, float16, bfloat16 and int64 tensors: each width takes its
    own integer product, the integer tensor torch.where; every result is where's, bit for bit."""
    from curvkit.engine import finite

    gen = torch.Generator().manual_seed(2)
    tensors = [
        _awkward((70,), torch.float32, gen), _awkward((6, 5), torch.float64, gen), _awkward((9,), torch.float16, gen),
        _awkward((5000,), torch.bfloat16, gen), torch.arange(7), _awkward((8, 3), torch.float32, gen)[:, 1],
    ]
    for pattern in ([True, False, True, False, True, False], [False, True, False, True, False, True]):
        flags = torch.tensor(pattern)
        for o, t, ok in zip(finite.zero_unless(flags, tensors), tensors, pattern):
            ref = torch.where(torch.tensor(ok), t, torch.zeros((), dtype=t.dtype))
            assert o.dtype == t.dtype and o.shape == t.shape
            if t.is_floating_point():
                assert torch.equal(_bits_of(o.contiguous()), _bits_of(ref.contiguous()))
            else:
                assert torch.equal(o, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_select_is_where_bit_for_bit(dtype):
    from curvkit.engine import finite

    gen = torch.Generator().manual_seed(1)
    n = finite._BITWISE_MIN + 3
    yes, no = _awkward((n,), dtype, gen), _awkward((n,), dtype, gen).flip(0)
    small_yes, small_no = _awkward((9,), dtype, gen), _awkward((9,), dtype, gen)
    for ok in (torch.tensor(True), torch.tensor(False)):
        for a, b in ((yes, no), (yes, 0.0), (yes, -0.0), (small_yes, small_no), (small_yes, 0.0)):
            ref = torch.where(ok, a, b)
            got = finite.select(ok, a, b)
            assert torch.equal(_bits_of(got), _bits_of(ref.to(dtype)))
    rows = torch.tensor([True, False])  # a condition with dimensions is torch.where itself
    m = _awkward((2, n), dtype, gen)
    assert torch.equal(_bits_of(finite.select(rows[:, None], m, 0.0)), _bits_of(torch.where(rows[:, None], m, 0.0)))


@pytest.mark.parametrize("n", [9, 5000])
def test_zero_unless_in_place_keeps_or_zeroes_the_same_tensor(n):
    from curvkit.engine import finite

    gen = torch.Generator().manual_seed(n)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        t = _awkward((n,), dtype, gen)
        for ok in (torch.tensor(True), torch.tensor(False)):
            ref = torch.where(ok, t, torch.zeros((), dtype=dtype))
            work = t.clone()
            assert finite.zero_unless_(ok, work) is work
            assert torch.equal(_bits_of(work), _bits_of(ref))


def test_stack_flags_gives_back_the_vector_its_flags_came_from_and_stacks_anything_else():
    """Flags unbound from one vector and gathered again in order are that vector (no copy); any
    other list (a subset, another order, flags of two vectors, a view's entries, fresh 0-d
    tensors) is torch.stack's result, with torch.stack's values."""
    from curvkit.engine import finite

    ok = torch.tensor([True, False, True, True])
    other = torch.tensor([False, True])
    parts = ok.unbind(0)
    assert finite.stack_flags(list(parts)) is ok
    cases = [
        [parts[0], parts[2], parts[3]],  # a subset
        [parts[1], parts[0], parts[2], parts[3]],  # another order
        [parts[0], parts[1], *other.unbind(0)],  # two vectors
        list(torch.tensor([True, True, False, False, True])[1:].unbind(0)),  # the entries of a view
        [torch.tensor(True), torch.tensor(False)],  # no common base
    ]
    for flags in cases:
        got = finite.stack_flags(flags)
        assert got is not ok and torch.equal(got, torch.stack(flags))


def test_zero_each_unless_masks_owned_tensors_in_place_and_leaves_shared_ones_alone():
    """The in-place form gives where's bits in the same tensors; a non-contiguous tensor (entries
    may share memory) and a second listing of one tensor (another block's flag) get where's result
    in a new tensor instead, and the tensor itself keeps the bits the earlier listing gave it."""
    from curvkit.engine import finite

    gen = torch.Generator().manual_seed(3)
    for pattern in ([True, False, True, False, True, False], [False, True, False, True, False, True]):
        shared = _awkward((40,), torch.float32, gen)
        tensors = [
            _awkward((70,), torch.float32, gen), _awkward((6, 5), torch.float64, gen),
            _awkward((5000,), torch.bfloat16, gen), _awkward((7, 8), torch.float32, gen).T,
            shared, shared,
        ]
        originals = [t.clone() for t in tensors]
        flags = torch.tensor(pattern)
        out = finite.zero_each_unless_(flags, tensors)
        for i, (o, t, orig, ok) in enumerate(zip(out, tensors, originals, pattern)):
            ref = torch.where(torch.tensor(ok), orig, torch.zeros((), dtype=orig.dtype))
            assert torch.equal(_bits_of(o.contiguous()), _bits_of(ref.contiguous())), i
            if i in (0, 1, 2, 4):  # owned, contiguous, first listing: masked in place
                assert o is t
            else:  # not contiguous, or listed before: a new tensor
                assert o is not t
        assert torch.equal(_bits_of(tensors[3].contiguous()), _bits_of(originals[3].contiguous()))  # untouched
        first = torch.where(torch.tensor(pattern[4]), originals[4], 0.0)  # what the first listing left
        assert torch.equal(_bits_of(shared), _bits_of(first))


def test_sampled_evidence_is_masked_in_place_but_a_callers_gradients_are_not():
    """The collector's own sampled gradients are masked in place; gradients a caller hands to
    ``update_curvature(grads=...)`` (or ``p.grad``, for the empirical Fisher) are never modified,
    non-finite or not, and the non-finite evidence is skipped either way."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = curvkit.TNT(model.parameters(), model=model, lr=0.01)
    x = torch.randn(8, 4)
    grads = [torch.randn_like(p) for p in model.parameters()]
    grads[2][0, 0] = float("nan")
    kept = [g.clone() for g in grads]
    opt.zero_grad()
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.update_curvature(grads=grads)
    opt.step()
    for g, k in zip(grads, kept):
        assert torch.equal(_bits_of(g), _bits_of(k))
    assert opt.health()["2.weight"]["skipped_nonfinite_evidence"] == 1
    emp = curvkit.TNT(model.parameters(), model=model, lr=0.01, evidence="empirical")
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    model[0].weight.grad[0, 0] = float("inf")
    before = [p.grad.clone() for p in model.parameters()]
    emp.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(_bits_of(p.grad), _bits_of(b))
    assert emp.health()["0.weight"]["skipped_nonfinite_evidence"] == 1


def test_scalar_tensors_are_cached_exact_and_bounded():
    from curvkit.engine import finite

    a = finite.scalar_tensor(0.1, D, torch.device("cpu"))
    assert a.dtype == D and a.item() == 0.1  # not rounded through float32
    assert finite.scalar_tensor(0.1, D, torch.device("cpu")) is a
    assert finite.scalar_tensor(0.1, torch.float32, torch.device("cpu")) is not a
    neg = finite.scalar_tensor(-0.0, torch.float32, torch.device("cpu"))
    assert torch.signbit(neg) and not torch.signbit(finite.scalar_tensor(0.0, torch.float32, torch.device("cpu")))
    for k in range(2 * finite._MAX_SCALARS):  # a schedule's many values do not grow the cache without bound
        finite.scalar_tensor(1.0 + k * 1e-6, torch.float32, torch.device("cpu"))
    assert len(finite._SCALARS) <= finite._MAX_SCALARS


def test_several_device_counters_count_as_one_by_one():
    from curvkit.engine.health import DEVICE_COUNTERS, HealthMonitor

    together, single = HealthMonitor(), HealthMonitor()
    for h in (together, single):
        h.add_blocks(["a", "b", "c"])
    ids = torch.tensor([0, 2])
    failed = torch.tensor([[True, False], [True, True]])
    for names in (("skipped_nonfinite_grad", "skipped_nonfinite_direction"),  # evenly spaced columns
                  ("skipped_nonfinite_direction", "skipped_nonfinite_grad"),  # any order
                  ("skipped_nonfinite_evidence", "skipped_nonfinite_grad")):
        together.count_device(names, ids, failed)
        for j, name in enumerate(names):
            single.count_device(name, ids, failed[:, j])
    assert together.totals() == single.totals()
    assert {c: together.totals()[2][c] for c in DEVICE_COUNTERS} == {
        "skipped_nonfinite_grad": 3, "skipped_nonfinite_evidence": 1, "skipped_nonfinite_direction": 2}
