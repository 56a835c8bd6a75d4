"""Every shipped method with FSDP2 (``fully_shard``) parameters on 2 gloo ranks equals one process
on the global batch (float64, so "up to float rounding" is tight), and the replicas agree.

The sampled-target evidence is made reproducible across the two settings with a sampler callable
whose "samples" are fixed targets per rank and step (``loss=fixed(t)``): the reference process
uses the concatenation of the ranks' targets, so TNT, TNT_KL and KFAC are compared exactly, not
only statistically. One launch runs every method (one fork of the ranks, bounded in time).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_distributed_core import launch, main  # noqa: E402

HERE = Path(__file__).resolve()
METHODS = ["TNT", "TNT-empirical", "KFAC", "Shampoo", "SOAP", "Muon", "KL_Shampoo", "TNT_KL"]
STEPS = 5
BATCH = 4


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m)
    fully_shard(model)
    return model


def build(name: str, model: nn.Module, **kw):
    import curvkit

    if name in ("TNT", "TNT-empirical"):
        ev = "empirical" if name == "TNT-empirical" else "sampled"
        return curvkit.TNT(model.parameters(), model=model, lr=1e-2, invert_every=2, evidence=ev, **kw)
    method = curvkit.get("method", name)
    if name == "SOAP":
        return method(model.parameters(), model=model, lr=1e-2, precondition_frequency=2, **kw)
    if name == "Muon":  # float64 Newton-Schulz iterations, so the comparison is tight
        return method(model.parameters(), model=model, lr=1e-2, iteration_dtype="float64", **kw)
    return method(model.parameters(), model=model, lr=1e-2, invert_every=2, **kw)


def data(rank: int, step: int, n: int = BATCH):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)


def fixed(targets: torch.Tensor):
    """A sampler callable whose 'sampled' targets are ``targets`` (reproducible evidence)."""

    def sampler(outputs, generator):
        return F.cross_entropy(outputs, targets)

    return sampler


def train_step(opt, model, x, y, t, *, scale: float = 1.0) -> None:
    out = model(x)
    opt.zero_grad()
    opt.update_curvature(out, loss=fixed(t))  # a no-op for minibatch-evidence methods
    (F.cross_entropy(out, y) * scale).backward()
    opt.step()


def statistics(opt) -> list[torch.Tensor]:
    from curvkit._tree import tensors_in

    return [t.clone() for bi in range(len(opt.blocks)) for t in tensors_in(opt.block_state(bi)["estimator"])
            if t.is_floating_point()]


def reference(name: str, steps: int = STEPS, world: int = 2, *, perturb: float = 0.0) -> dict:
    """One process, no process group, on the global batch of every step (inputs scaled by
    ``1 + perturb``, to measure how much a method amplifies rounding)."""
    model = make_model()
    opt = build(name, model)
    rows = count_inversions(opt)
    for step in range(steps):
        xs, ys, ts = zip(*(data(r, step) for r in range(world)))
        train_step(opt, model, torch.cat(xs) * (1 + perturb), torch.cat(ys), torch.cat(ts))
    return {"params": [p.detach().clone() for p in model.parameters()], "stats": statistics(opt),
            "inverted": rows["n"]}


def count_inversions(opt) -> dict:
    """Count the factors the optimizer's inverter is given (``rows["n"]``)."""
    rows = {"n": 0}
    real = opt.inverter.invert

    def counting(matrices, **kw):
        rows["n"] += matrices.shape[0]
        return real(matrices, **kw)

    opt.inverter.invert = counting
    return rows


# ----------------------------------------------------------------------------- scenarios (ranks)
def scenario_methods(rank: int, world: int, *names: str) -> dict:
    from torch.distributed.tensor import DTensor

    from curvkit.distributed import full_tensors

    out: dict = {}
    for name in names or METHODS:
        model = shard(make_model())
        opt = build(name, model)
        rows = count_inversions(opt)
        for step in range(STEPS):
            x, y, t = data(rank, step)
            train_step(opt, model, x, y, t)
        params = list(model.parameters())
        out[name] = {
            "dtensor": all(isinstance(p, DTensor) for p in params),
            "local_rows": [p.to_local().shape[0] for p in params],
            "params": [t.clone() for t in full_tensors([p.detach() for p in params])],
            "stats": statistics(opt),
            "inverted": rows["n"],
            "plain_state": not any(isinstance(t, DTensor) for st in opt.state.values() for t in _tensors(st)),
            "health": opt.health(),
        }
    return out


def _tensors(state):
    from curvkit._tree import tensors_in

    return list(tensors_in(state))


def scenario_uneven(rank: int, world: int) -> dict:
    """TNT with batch sizes 6 and 2: the sampled gradient is weighted by batch size."""
    from curvkit.distributed import full_tensors

    model = shard(make_model())
    opt = build("TNT", model)
    sizes = [6, 2]
    for step in range(3):
        x, y, t = data(rank, step, sizes[rank])
        # the user's loss as the global batch's mean: FSDP2 averages the ranks' gradients
        train_step(opt, model, x, y, t, scale=sizes[rank] * world / sum(sizes))
    return {"params": full_tensors([p.detach() for p in model.parameters()]), "stats": statistics(opt)}


MICRO = [[3, 5], [4, 2]]  # micro-batch sizes of rank 0 and rank 1


def micro_data(rank: int, step: int, k: int):
    return data(10 * rank + k, step, MICRO[rank][k])


def scenario_accumulate(rank: int, world: int) -> dict:
    """TNT with two micro-batches of different sizes per rank and step (gradient accumulation)."""
    from curvkit.distributed import full_tensors

    model = shard(make_model())
    opt = build("TNT", model)
    total = sum(map(sum, MICRO))
    for step in range(3):
        opt.zero_grad()
        for k in range(2):
            x, y, t = micro_data(rank, step, k)
            out = model(x)
            opt.update_curvature(out, loss=fixed(t))
            # the global batch's mean loss, as FSDP2 averages the ranks' accumulated gradients
            (F.cross_entropy(out, y, reduction="sum") * world / total).backward()
        opt.step()
    return {"params": full_tensors([p.detach() for p in model.parameters()]), "stats": statistics(opt)}


def scenario_outside(rank: int, world: int) -> dict:
    """TNT on the first layer only (model= given): the sampled backward leaves the gradients of
    the other parameters, and the ones accumulated before it, as the true backward makes them."""
    import curvkit
    from curvkit.distributed import full_tensors

    model = shard(make_model())
    first = list(model[0].parameters())
    opt = curvkit.TNT(first, model=model, lr=1e-2, invert_every=2)
    x, y, t = data(rank, 0)
    out = model(x)
    opt.zero_grad()
    model.zero_grad()
    opt.update_curvature(out, loss=fixed(t))
    F.cross_entropy(out, y).backward()
    return {"grads": full_tensors([p.grad for p in model.parameters()])}


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__")


def scenario_host_reads(rank: int, world: int) -> dict:
    """Host reads inside update_curvature and step on steps without an inversion, FSDP2's own
    backward and collectives included."""
    import traceback

    out: dict = {}
    for name in ("TNT", "TNT-empirical", "KFAC", "Shampoo"):
        model = shard(make_model())
        opt = build(name, model)  # invert_every=2: t = 3, 5, 7 invert nothing
        calls = {"on": False, "where": []}
        originals = {n: getattr(torch.Tensor, n) for n in HOST_READS}

        def wrap(n):
            def f(self, *a, _orig=originals[n], **k):
                if calls["on"]:
                    calls["where"].append((n, traceback.format_stack(limit=6)[0].strip()))
                return _orig(self, *a, **k)
            return f

        for n in HOST_READS:
            setattr(torch.Tensor, n, wrap(n))
        try:
            for step in range(8):
                x, y, t = data(rank, step)
                o = model(x)
                opt.zero_grad()
                calls["on"] = step >= 3 and step % 2 == 1
                opt.update_curvature(o, loss=fixed(t))
                calls["on"] = False
                F.cross_entropy(o, y).backward()
                calls["on"] = step >= 3 and step % 2 == 1
                opt.step()
                calls["on"] = False
        finally:
            for n, f in originals.items():
                setattr(torch.Tensor, n, f)
        out[name] = calls["where"]
    return out


def scenario_ddp_soap(rank: int, world: int) -> dict:
    """SOAP under DDP: the eigenbases are divided between the ranks there too."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    ddp = DDP(model)
    opt = build("SOAP", model)
    rows = count_inversions(opt)
    for step in range(STEPS):
        x, y, t = data(rank, step)
        train_step(opt, ddp, x, y, t)
    return {"params": [p.detach().clone() for p in model.parameters()], "inverted": rows["n"]}


def scenario_kbfgs(rank: int, world: int) -> dict:
    import curvkit

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    out = {"error": "", "tp_error": ""}
    model = shard(make_model())
    try:
        curvkit.get("method", "KBFGS")(model, lr=0.1)
    except ValueError as exc:
        out["error"] = str(exc)
    # a tensor-parallel layout (Shard(1)) is refused, naming the parameter
    mesh = init_device_mesh("cpu", (world,))
    weight = nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
    try:
        curvkit.TNT([("tp.weight", weight)], lr=0.1)
    except ValueError as exc:
        out["tp_error"] = str(exc)
    return out


SCENARIOS = {"methods": scenario_methods, "uneven": scenario_uneven, "kbfgs": scenario_kbfgs,
             "accumulate": scenario_accumulate, "outside": scenario_outside, "host_reads": scenario_host_reads,
             "ddp_soap": scenario_ddp_soap}


# ----------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return launch(HERE, "methods", 2, tmp_path_factory.mktemp("fsdp"), timeout=240.0)


@pytest.mark.parametrize("name", METHODS)
def test_method_under_fully_shard_equals_one_process_on_the_global_batch(runs, name):
    want = reference(name)
    if name == "SOAP":
        # SOAP's Adam runs in the factors' eigenbasis, which is not unique where eigenvalues repeat
        # (the early factors are low rank), so SOAP amplifies rounding: scaling one process's inputs
        # by 1 + 1e-13 moves its parameters by up to ~1e-2 after 5 steps (and then its statistics).
        # Its parameters and statistics are compared within 10x that measured sensitivity, per tensor.
        moved = reference(name, perturb=1e-13)
        bounds = {key: [10 * (a - b).abs().max().item() + 1e-8 for a, b in zip(moved[key], want[key])]
                  for key in ("params", "stats")}
    for r, res in enumerate(runs):
        got = res[name]
        assert got["dtensor"]
        assert got["plain_state"]  # factors, inverses and momentum are plain replicated tensors
        assert not any(v for counters in got["health"].values() for v in counters.values()), got["health"]
        assert len(got["stats"]) == len(want["stats"])
        for key in ("params", "stats"):
            for i, (a, b) in enumerate(zip(got[key], want[key])):
                if name == "SOAP":
                    torch.testing.assert_close(a, b, rtol=0, atol=bounds[key][i])
                else:
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    # the replicas' full parameters and statistics are identical, bit for bit
    for a, b in zip(runs[0][name]["params"], runs[1][name]["params"]):
        assert torch.equal(a, b)
    for a, b in zip(runs[0][name]["stats"], runs[1][name]["stats"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["TNT", "KFAC", "Shampoo", "TNT_KL", "SOAP"])
def test_inverse_work_is_divided_between_the_ranks(runs, name):
    rows = [res[name]["inverted"] for res in runs]
    # every factor is inverted by exactly one rank: the ranks together invert what one process does
    assert 0 < min(rows) and sum(rows) == reference(name)["inverted"], rows


def test_soap_under_ddp_divides_its_eigenbases_and_keeps_identical_replicas(tmp_path):
    results = launch(HERE, "ddp_soap", 2, tmp_path)
    for a, b in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(a, b)
    rows = [r["inverted"] for r in results]
    assert 0 < min(rows) and sum(rows) == reference("SOAP")["inverted"], rows


@pytest.mark.parametrize("name", ["TNT", "KFAC"])
def test_four_ranks_with_an_empty_shard(tmp_path, name):
    """4 ranks: the 3-row bias of the last layer leaves rank 3 without rows of it."""
    results = launch(HERE, "methods", 4, tmp_path, name)
    assert [res[name]["local_rows"][-1] for res in results] == [1, 1, 1, 0]
    want = reference(name, world=4)
    for res in results:
        for key in ("params", "stats"):
            for a, b in zip(res[name][key], want[key]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert sum(res[name]["inverted"] for res in results) == want["inverted"]


def test_sampled_gradient_is_weighted_by_batch_size(tmp_path):
    results = launch(HERE, "uneven", 2, tmp_path)
    model = make_model()
    opt = build("TNT", model)
    for step in range(3):
        xs, ys, ts = zip(*(data(r, step, n) for r, n in enumerate([6, 2])))
        train_step(opt, model, torch.cat(xs), torch.cat(ys), torch.cat(ts))
    want = {"params": [p.detach() for p in model.parameters()], "stats": statistics(opt)}
    for res in results:
        for key in ("params", "stats"):
            for a, b in zip(res[key], want[key]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_micro_batches_under_fully_shard_equal_the_global_batch(tmp_path):
    results = launch(HERE, "accumulate", 2, tmp_path)
    model = make_model()
    opt = build("TNT", model)
    for step in range(3):
        xs, ys, ts = zip(*(micro_data(r, step, k) for r in range(2) for k in range(2)))
        train_step(opt, model, torch.cat(xs), torch.cat(ys), torch.cat(ts))
    want = {"params": [p.detach() for p in model.parameters()], "stats": statistics(opt)}
    for res in results:
        for key in ("params", "stats"):
            for a, b in zip(res[key], want[key]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_sampled_backward_leaves_the_true_gradients(tmp_path):
    results = launch(HERE, "outside", 2, tmp_path)
    model = make_model()
    xs, ys, _ = zip(*(data(r, 0) for r in range(2)))
    F.cross_entropy(model(torch.cat(xs)), torch.cat(ys)).backward()
    for res in results:
        for g, p in zip(res["grads"], model.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=1e-12)


def test_steady_state_steps_read_nothing_on_the_host_under_fully_shard(tmp_path):
    results = launch(HERE, "host_reads", 2, tmp_path)
    for res in results:
        assert res == {name: [] for name in ("TNT", "TNT-empirical", "KFAC", "Shampoo")}, res


def test_kbfgs_and_tensor_parallel_layouts_are_refused(tmp_path):
    results = launch(HERE, "kbfgs", 2, tmp_path)
    assert all("not linear" in r["error"] and "distributed=False" in r["error"] for r in results)
    assert all("'tp.weight'" in r["tp_error"] and "Shard(dim=1)" in r["tp_error"] and "fully_shard" in r["tp_error"]
               for r in results), results


if __name__ == "__main__":
    main(SCENARIOS)
