"""FSDP2 (``fully_shard``) and DCP on torch 2.13, CPU/gloo, 2 ranks: the findings the
*Run distributed* page states, checked, and the recipes the engine adopted
(:mod:`curvkit.engine.sharding`; the optimizer itself is tested in ``tests/test_fsdp_*.py``).

* (a) after ``loss.backward()`` every ``p.grad`` is a DTensor sharded on dim 0 holding this
  rank's rows of the *rank-averaged* gradient;
* (b) ``torch.autograd.grad(sampled_loss, params)`` fails (FSDP2 runs the forward on unsharded
  copies, so the sharded parameters are not in the graph); the working recipe is a sampled
  ``backward(retain_graph=True)`` into ``.grad`` (reduce-scattered, rank-averaged), stashed,
  then the true backward; doing the sampled backward without gradient sync leaves ``.grad``
  empty and leaks the sampled gradient into the next backward;
* (c) module forward hooks see plain, unsharded activations of the local batch, and tensor hooks
  on layer outputs fire in both backwards with plain tensors;
* (d) an optimizer whose ``state[p]`` holds ``d x d`` factors (plain, replicated tensors), a
  parameter-shaped momentum (a DTensor like ``p``) and plain ints is saved by DCP from 2 ranks,
  loaded by 1 process without a process group, saved again and loaded back on 2 ranks.

References are computed on an unsharded copy of the model from the all-gathered batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_distributed_core import launch, main  # noqa: E402

HERE = Path(__file__).resolve()
BATCH, D_IN, D_HID, D_OUT = 4, 5, 7, 3


def make_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, D_OUT))


def rank_batch(rank: int, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(BATCH, D_IN, generator=g), torch.randn(BATCH, D_OUT, generator=g)


class ToyCurvature(torch.optim.Optimizer):
    r"""A minimal curvature optimizer with the state layout of the engine: ``state[p]`` holds a
    ``d0 x d0`` factor :math:`F \leftarrow 0.9 F + 0.1\, G G^\top` of the full gradient (a plain
    tensor, identical on all ranks), a momentum shaped like ``p`` (a DTensor under FSDP2), and
    ints. The step is :math:`p \leftarrow p - \text{lr}\,(F + I)^{-1} m`, computed on full
    tensors and applied to this rank's shard with :func:`curvkit.distributed.local_like`.
    State is created eagerly, so DCP's ``get_optimizer_state_dict`` does not run a step."""

    def __init__(self, params, lr: float = 0.1, *, eager: bool = True) -> None:
        super().__init__(params, {"lr": lr})
        if eager:
            for group in self.param_groups:
                for p in group["params"]:
                    self._init(p)

    def _init(self, p: torch.Tensor) -> None:
        d0 = p.shape[0]
        self.state[p] = {"step": 0, "inverse_version": 0, "factor": torch.eye(d0), "momentum": torch.zeros_like(p)}

    @torch.no_grad()
    def step(self, closure=None):
        from curvkit.distributed import full_tensor, local_like

        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p not in self.state:
                    self._init(p)
                st = self.state[p]
                g = full_tensor(p.grad)
                gm = g.reshape(g.shape[0], -1)
                st["factor"].mul_(0.9).add_(gm @ gm.T, alpha=0.1)
                st["momentum"].mul_(0.9).add_(p.grad)
                m = full_tensor(st["momentum"]).reshape(g.shape[0], -1)
                direction = torch.linalg.solve(st["factor"] + torch.eye(g.shape[0]), m).reshape(g.shape)
                p.add_(local_like(direction, p), alpha=-group["lr"])
                st["step"] += 1
                st["inverse_version"] = st["step"] // 2
        return None


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Parameters and optimizer state as full plain tensors keyed by name (collective under FSDP2)."""
    from curvkit.distributed import full_tensor

    out = {}
    for name, p in model.named_parameters():
        st = opt.state[p]
        out[name] = {
            "param": full_tensor(p.detach()).clone(),
            "factor": st["factor"].clone(),
            "momentum": full_tensor(st["momentum"]).clone(),
            "step": st["step"],
            "inverse_version": st["inverse_version"],
        }
    return out


def train(model: nn.Module, opt: torch.optim.Optimizer, rank: int, world: int, steps: range) -> None:
    for step in steps:
        x, y = rank_batch(rank, step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


# ----------------------------------------------------------------------------- scenarios (ranks)
def scenario_fsdp(rank: int, world: int, ckpt: str) -> dict:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    from curvkit.distributed import full_tensor

    res: dict = {}
    model = make_mlp()
    ref = make_mlp()
    seen_fwd: list = []
    seen_out_grad: list = []

    def fwd_hook(module, inputs, output):
        seen_fwd.append((type(inputs[0]).__name__, tuple(inputs[0].shape), type(output).__name__,
                         tuple(output.shape), type(module.weight).__name__, tuple(module.weight.shape)))
        output.register_hook(lambda g: seen_out_grad.append((type(g).__name__, tuple(g.shape))))

    for m in model:
        if isinstance(m, nn.Linear):
            m.register_forward_hook(fwd_hook)
            fully_shard(m)
    fully_shard(model)
    params = list(model.parameters())
    res["param_layout"] = [(type(p).__name__, tuple(p.placements), tuple(p.to_local().shape)) for p in params]

    # the global batch, for the reference on the unsharded copy
    x, y = rank_batch(rank)
    xs = [torch.empty_like(x) for _ in range(world)]
    ys = [torch.empty_like(y) for _ in range(world)]
    dist.all_gather(xs, x)
    dist.all_gather(ys, y)
    noise_r = torch.randn(BATCH, D_OUT, generator=torch.Generator().manual_seed(50 + rank))
    noises = [torch.empty_like(noise_r) for _ in range(world)]
    dist.all_gather(noises, noise_r)

    def sampled(out, noise):  # a stand-in for the sampled-target loss: linear in the outputs
        return (out * noise).sum() / out.shape[0]

    ref_true = torch.autograd.grad(
        sum(nn.functional.mse_loss(ref(a), b) for a, b in zip(xs, ys)) / world, list(ref.parameters()))
    ref_sampled = torch.autograd.grad(
        sum(sampled(ref(a), n) for a, n in zip(xs, noises)) / world, list(ref.parameters()))

    # (b) autograd.grad with respect to the sharded parameters
    out = model(x)
    try:
        torch.autograd.grad(sampled(out, noise_r), params, retain_graph=True)
        res["autograd_grad_params"] = "ok"
    except RuntimeError as exc:
        res["autograd_grad_params"] = str(exc)
    # ... with respect to the layer outputs (plain tensors) it works
    g_out = torch.autograd.grad(sampled(out, noise_r), [out], retain_graph=True)[0]
    res["autograd_grad_outputs"] = type(g_out).__name__
    seen_out_grad.clear()
    # (b) the recipe: sampled backward into .grad, stash, then the true backward
    sampled(out, noise_r).backward(retain_graph=True)
    stash = [p.grad for p in params]
    for p in params:
        p.grad = None
    nn.functional.mse_loss(out, y).backward()
    # (a) what p.grad is
    res["grad_layout"] = [(type(p.grad).__name__, tuple(p.grad.placements), tuple(p.grad.to_local().shape))
                          for p in params]
    res["sampled_layout"] = [(type(s).__name__, tuple(s.placements)) for s in stash]
    res["true_err"] = max((full_tensor(p.grad) - r).abs().max().item() for p, r in zip(params, ref_true))
    res["sampled_err"] = max((full_tensor(s) - r).abs().max().item() for s, r in zip(stash, ref_sampled))
    res["fwd_hooks"] = list(seen_fwd)
    res["out_grad_hooks"] = list(seen_out_grad)

    # (b) the sampled backward without gradient sync: .grad stays empty, the next backward is wrong
    for p in params:
        p.grad = None
    out = model(x)
    model.set_requires_gradient_sync(False)
    sampled(out, noise_r).backward(retain_graph=True)
    res["nosync_grad_is_none"] = all(p.grad is None for p in params)
    model.set_requires_gradient_sync(True)
    nn.functional.mse_loss(out, y).backward()
    res["nosync_true_err"] = max((full_tensor(p.grad) - r).abs().max().item() for p, r in zip(params, ref_true))

    # (d) train a few steps with the toy curvature optimizer, compare with one process on the
    # global batch, save with DCP
    model2 = make_mlp()
    for m in model2:
        if isinstance(m, nn.Linear):
            fully_shard(m)
    fully_shard(model2)
    opt = ToyCurvature(model2.parameters())
    train(model2, opt, rank, world, range(3))
    res["momentum_layout"] = [(type(opt.state[p]["momentum"]).__name__, isinstance(opt.state[p]["factor"], DTensor))
                              for p in model2.parameters()]
    res["trained"] = full_state(model2, opt)
    dcp.save({"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt)},
             checkpoint_id=str(Path(ckpt) / "two"))
    res["shard0"] = all(p.placements == (Shard(0),) for p in model2.parameters())
    return res


def scenario_single_load(rank: int, world: int, ckpt: str) -> dict:
    """One process, no process group: load the 2-rank checkpoint, step, save again."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
    )

    assert not dist.is_initialized()
    model = make_mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(123.0)  # nothing of the fresh model may survive the load
    opt = ToyCurvature(model.parameters())
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=str(Path(ckpt) / "two"))
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    res = {"loaded": full_state(model, opt)}
    # one more step on the global batch of step 3 (both ranks' examples, mean loss)
    xs, ys = zip(*(rank_batch(r, 3) for r in range(2)))
    opt.zero_grad()
    nn.functional.mse_loss(model(torch.cat(xs)), torch.cat(ys)).backward()
    opt.step()
    res["stepped"] = full_state(model, opt)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=str(Path(ckpt) / "one"))
    # the unsharded reference of the 2-rank training: 3 steps on the global batches
    ref = make_mlp()
    ref_opt = ToyCurvature(ref.parameters())
    for step in range(3):
        xs, ys = zip(*(rank_batch(r, step) for r in range(2)))
        ref_opt.zero_grad()
        nn.functional.mse_loss(ref(torch.cat(xs)), torch.cat(ys)).backward()
        ref_opt.step()
    res["reference"] = full_state(ref, ref_opt)
    # DCP's helpers run opt.step() (zero grads, lr 0) on an optimizer whose state is empty
    lazy_model = make_mlp()
    lazy = ToyCurvature(lazy_model.parameters(), eager=False)
    get_optimizer_state_dict(lazy_model, lazy)
    res["lazy_steps"] = [lazy.state[p]["step"] for p in lazy_model.parameters()]
    return res


def scenario_reload(rank: int, world: int, ckpt: str) -> dict:
    """Two ranks under FSDP2 load the one-process checkpoint (resharding)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    model = make_mlp()
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m)
    fully_shard(model)
    opt = ToyCurvature(model.parameters())
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=str(Path(ckpt) / "one"))
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    res = {"loaded": full_state(model, opt),
           "local_momentum": [tuple(opt.state[p]["momentum"].to_local().shape) for p in model.parameters()]}
    train(model, opt, rank, world, range(4, 5))
    res["continued"] = full_state(model, opt)
    return res


SCENARIOS = {"fsdp": scenario_fsdp, "reload": scenario_reload, "single_load": scenario_single_load}


# ----------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt")
    out = tmp_path_factory.mktemp("out")
    fsdp = launch(HERE, "fsdp", 2, out, str(ckpt))
    single = launch(HERE, "single_load", 1, out, str(ckpt), "--no-dist")[0]
    reload = launch(HERE, "reload", 2, out, str(ckpt))
    return fsdp, single, reload


def test_a_grad_is_dtensor_sharded_dim0_rank_averaged(runs):
    fsdp, _, _ = runs
    for r, res in enumerate(fsdp):
        # 7 rows over 2 ranks: 4 + 3; 3 rows: 2 + 1
        rows = [(4, 2), (3, 1)][r]
        want = [("DTensor", "Shard(dim=0)", (rows[0], D_IN)), ("DTensor", "Shard(dim=0)", (rows[0],)),
                ("DTensor", "Shard(dim=0)", (rows[1], D_HID)), ("DTensor", "Shard(dim=0)", (rows[1],))]
        got = [(t, repr(pl[0]), shape) for t, pl, shape in res["grad_layout"]]
        assert got == want
        assert [(t, repr(pl[0]), shape) for t, pl, shape in res["param_layout"]] == want
        assert res["true_err"] < 1e-6, res["true_err"]


def test_b_sampled_gradients_through_fsdp2(runs):
    fsdp, _, _ = runs
    for res in fsdp:
        assert "appears to not have been used in the graph" in res["autograd_grad_params"]
        assert res["autograd_grad_outputs"] == "Tensor"
        assert all(t == "DTensor" and repr(pl[0]) == "Shard(dim=0)" for t, pl in res["sampled_layout"])
        assert res["sampled_err"] < 1e-6, res["sampled_err"]  # the rank-averaged sampled gradient
        assert res["true_err"] < 1e-6  # the true backward after it is untouched
        assert res["nosync_grad_is_none"]
        assert res["nosync_true_err"] > 1e-3  # the unsynced sampled gradient leaked into .grad


def test_c_hooks_see_full_activations(runs):
    fsdp, _, _ = runs
    for res in fsdp:
        # forward hooks: plain tensors, local batch, full feature width; module.weight is the
        # unsharded plain nn.Parameter during forward
        assert res["fwd_hooks"][:2] == [
            ("Tensor", (BATCH, D_IN), "Tensor", (BATCH, D_HID), "Parameter", (D_HID, D_IN)),
            ("Tensor", (BATCH, D_HID), "Tensor", (BATCH, D_OUT), "Parameter", (D_OUT, D_HID)),
        ]
        # output-gradient tensor hooks fire in the sampled and in the true backward
        assert res["out_grad_hooks"] == [("Tensor", (BATCH, D_OUT)), ("Tensor", (BATCH, D_HID))] * 2


def test_d_fsdp_training_matches_one_process(runs):
    fsdp, single, _ = runs
    for res in fsdp:
        assert res["shard0"]
        assert res["momentum_layout"] == [("DTensor", False)] * 4
        for name, want in single["reference"].items():
            got = res["trained"][name]
            assert got["step"] == want["step"] == 3
            for key in ("param", "factor", "momentum"):
                torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


def test_d_dcp_two_ranks_to_one_process_and_back(runs):
    fsdp, single, reload = runs
    saved = fsdp[0]["trained"]
    for name, want in saved.items():
        got = single["loaded"][name]
        assert (got["step"], got["inverse_version"]) == (want["step"], want["inverse_version"]) == (3, 1)
        for key in ("param", "factor", "momentum"):
            assert torch.equal(got[key], want[key]), (name, key)
    for r, res in enumerate(reload):
        assert res["local_momentum"] == [[(4, D_IN), (4,), (2, D_HID), (2,)], [(3, D_IN), (3,), (1, D_HID), (1,)]][r]
        for name, want in single["stepped"].items():
            got = res["loaded"][name]
            assert (got["step"], got["inverse_version"]) == (want["step"], want["inverse_version"]) == (4, 2)
            for key in ("param", "factor", "momentum"):
                assert torch.equal(got[key], want[key]), (r, name, key)
        assert all(v["step"] == 5 for v in res["continued"].values())
    # both ranks continue identically (full tensors)
    for name in saved:
        for key in ("param", "factor", "momentum"):
            assert torch.equal(reload[0]["continued"][name][key], reload[1]["continued"][name][key])


def test_d_dcp_steps_an_optimizer_with_empty_state(runs):
    _, single, _ = runs
    # get_optimizer_state_dict ran opt.step() with zero gradients: the engine must create its
    # state eagerly (or make that step a no-op), or a save counts a phantom step
    assert single["lazy_steps"] == [1, 1, 1, 1]


if __name__ == "__main__":
    main(SCENARIOS)
