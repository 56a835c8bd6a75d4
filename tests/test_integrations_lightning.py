"""curvkit optimizers under a real PyTorch Lightning Trainer (CPU, a few steps, no network).

The reference for each run is the same training written out as a plain loop (forward,
``update_curvature`` before the backward, ``step`` with a closure for K-BFGS): with the same
seeds, data order and optimizer seed, Lightning must reach bit-for-bit the same parameters and
statistics. That fails if the sampled pass is skipped, run on the wrong axis, run after the
backward, or run twice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvkit

L = pytest.importorskip("lightning.pytorch")
from curvkit.integrations import sequence_sampler  # noqa: E402
from curvkit.integrations.lightning import CurvatureCallback  # noqa: E402

V, T, N, BATCH, STEPS = 11, 6, 24, 4, 4


class TinyLM(nn.Module):
    """Embedding -> Linear -> tanh -> Linear: (batch, time) codes to (batch, time, vocab) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 8)
        self.hidden = nn.Linear(8, 16)
        self.head = nn.Linear(16, V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.emb(x))))


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (N, T), generator=g)
    return x, (x + 1) % V  # a learnable next-token rule


def _loss(logits, y):
    return F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))


def _make(method: str, model: nn.Module):
    if method == "TNT":
        return curvkit.TNT(model.parameters(), lr=1e-2, damping=0.1, seed=3)
    return curvkit.get("method", method)(model.parameters(), model=model, lr=0.05, damping=0.3, seed=3)


class LitLM(L.LightningModule):
    def __init__(self, method: str) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = TinyLM()
        self.method = method

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        return {"loss": _loss(logits, y), "outputs": logits}

    def configure_optimizers(self):
        return _make(self.method, self.net)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data()), batch_size=BATCH, shuffle=False)


def _trainer(callbacks, steps=STEPS):
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                     num_sanity_val_steps=0)


def _reference(method: str, steps=STEPS):
    """The same training as a plain loop."""
    torch.manual_seed(1)
    model = TinyLM()
    opt = _make(method, model)
    x, y = _data()
    sampler = sequence_sampler("cross_entropy", class_dim=-1)
    for i in range(steps):
        xb, yb = x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]
        if opt.needs_closure:
            def closure(xb=xb, yb=yb):
                opt.zero_grad()
                value = _loss(model(xb), yb)
                value.backward()
                return value
            opt.step(closure)
            continue
        out = model(xb)
        loss = _loss(out, yb)
        opt.zero_grad()
        opt.update_curvature(out, loss=sampler)
        loss.backward()
        opt.step()
    return model, opt


def _fit(method: str, callbacks):
    module = LitLM(method)
    _trainer(callbacks).fit(module)
    return module


@pytest.mark.parametrize("method", ["TNT", "KFAC"])
def test_callback_runs_the_sampled_pass_as_a_plain_loop_does(method):
    if method not in curvkit.available("method")["method"]:
        pytest.skip(f"{method} is not installed")
    callback = CurvatureCallback(loss="cross_entropy", class_dim=-1)
    module = _fit(method, [callback])
    opt = module.trainer.optimizers[0]
    assert callback.sampled_passes == STEPS
    ref_model, ref_opt = _reference(method)
    for p, q in zip(module.net.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for i in range(len(opt.blocks)):
        ours, theirs = opt.block_state(i)["estimator"], ref_opt.block_state(i)["estimator"]
        assert ours["updates"] == theirs["updates"]
        for key, value in ours.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, theirs[key], rtol=0, atol=0)
    # the statistics of the head really moved (not left at their initial zeros)
    head = next(i for i, b in enumerate(opt.blocks) if b.params[0] is module.net.head.weight)
    state = opt.block_state(head)["estimator"]
    stats = state["grams"] if method == "TNT" else [state["A"], state["G"]]
    assert state["updates"] == STEPS and all(float(s.abs().sum()) > 0 for s in stats if s is not None)
    # the method is restored once the fit is over
    assert "training_step" not in module.__dict__


def test_kbfgs_takes_lightnings_closure():
    if "KBFGS" not in curvkit.available("method")["method"]:
        pytest.skip("KBFGS is not installed")
    module = _fit("KBFGS", [])
    opt = module.trainer.optimizers[0]
    ref_model, ref_opt = _reference("KBFGS")
    for p, q in zip(module.net.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    hidden = next(i for i, b in enumerate(opt.blocks) if b.params[0] is module.net.hidden.weight)
    state, ref_state = opt.block_state(hidden)["estimator"], ref_opt.block_state(hidden)["estimator"]
    assert state["updates"] == ref_state["updates"] > 0
    assert not torch.equal(state["Hg"], torch.eye(state["Hg"].shape[0]))  # the after-step pass updated H_g
    torch.testing.assert_close(state["Hg"], ref_state["Hg"], rtol=0, atol=0)


def test_missing_outputs_and_missing_optimizer_are_explained():
    class NoOutputs(LitLM):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return _loss(self.net(x), y)

    with pytest.raises(RuntimeError, match="'outputs'"):
        _trainer([CurvatureCallback(class_dim=-1)], steps=1).fit(NoOutputs("TNT"))

    class Plain(LitLM):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ValueError, match="no curvkit optimizer"):
        _trainer([CurvatureCallback(class_dim=-1)], steps=1).fit(Plain("TNT"))
    with pytest.raises(ValueError, match="outputs_key"):
        CurvatureCallback(outputs_key="loss")
    with pytest.raises(ValueError, match="class_dim"):
        CurvatureCallback(class_dim=0)


class ManualLM(LitLM):
    """Manual optimisation, calling update_curvature on what ``self.optimizers()`` returns."""

    def __init__(self, unwrap: bool) -> None:
        super().__init__("TNT")
        self.automatic_optimization = False
        self.unwrap = unwrap

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        target = opt.optimizer if self.unwrap else opt
        logits = self.net(x)
        loss = _loss(logits, y)
        opt.zero_grad()
        target.update_curvature(logits, loss=sequence_sampler(class_dim=-1))
        self.manual_backward(loss)
        opt.step()


def test_manual_optimisation_with_the_unwrapped_optimizer():
    module = ManualLM(unwrap=True)
    _trainer([]).fit(module)
    ref_model, _ = _reference("TNT")
    for p, q in zip(module.net.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_manual_optimisation_through_lightnings_wrapper():
    """LightningOptimizer copies the optimizer's __dict__: update_curvature on the copy must
    record its statistics step where the real optimizer's step sees it (shared run counters)."""
    module = ManualLM(unwrap=False)
    _trainer([]).fit(module)
    ref_model, _ = _reference("TNT")
    for p, q in zip(module.net.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


# ---------------------------------------------------------------------------- gradient accumulation
ACCUMULATE = 2


def _fixed_sampler(outputs, generator):
    """A deterministic stand-in for the sampled loss (a per-example mean), so that the evidence of
    the micro-batches can be compared with the evidence of the whole batch."""
    return 0.5 * outputs.float().pow(2).sum(-1).mean()


class AccumulatingLM(LitLM):
    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data()), batch_size=BATCH // ACCUMULATE,
                                           shuffle=False)


def _fit_accumulating(method: str, callback, steps: int):
    module = AccumulatingLM(method)
    L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
              num_sanity_val_steps=0, accumulate_grad_batches=ACCUMULATE).fit(module)
    return module, module.trainer.optimizers[0]


def _statistics(opt):
    return [{k: v for k, v in opt.block_state(i)["estimator"].items()} for i in range(len(opt.blocks))]


def test_callback_feeds_every_micro_batch_as_a_plain_accumulating_loop_does():
    """accumulate_grad_batches=2: two sampled passes per step; the statistics and the parameters
    equal a plain loop that calls update_curvature on each micro-batch (Lightning divides the
    loss by the number of micro-batches, so does the loop)."""
    steps = 2
    callback = CurvatureCallback(loss="cross_entropy", class_dim=-1)
    module, opt = _fit_accumulating("TNT", callback, steps)
    assert callback.sampled_passes == steps * ACCUMULATE
    torch.manual_seed(1)
    model = TinyLM()
    ref = _make("TNT", model)
    x, y = _data()
    sampler = sequence_sampler("cross_entropy", class_dim=-1)
    micro = BATCH // ACCUMULATE
    for i in range(steps * ACCUMULATE):
        xb, yb = x[i * micro:(i + 1) * micro], y[i * micro:(i + 1) * micro]
        out = model(xb)
        ref.update_curvature(out, loss=sampler)
        (_loss(out, yb) / ACCUMULATE).backward()
        if (i + 1) % ACCUMULATE == 0:
            ref.step()
            ref.zero_grad()
    for ours, theirs in zip(_statistics(opt), _statistics(ref)):
        assert ours["updates"] == theirs["updates"] == steps
        for key, value in ours.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, theirs[key], rtol=0, atol=0)
    for p, q in zip(module.net.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_accumulated_statistics_equal_the_whole_batch_statistics():
    """With a deterministic likelihood the accumulated evidence of the micro-batches is the
    evidence of the whole batch: one plain update_curvature on all of it gives the same statistics
    (a reference that does not go through the accumulation)."""
    callback = CurvatureCallback(loss=_fixed_sampler)
    _, opt = _fit_accumulating("TNT", callback, 1)
    assert callback.sampled_passes == ACCUMULATE
    torch.manual_seed(1)
    model = TinyLM()
    ref = _make("TNT", model)
    x, _ = _data()
    ref.update_curvature(model(x[:BATCH]), loss=_fixed_sampler)
    for ours, theirs in zip(_statistics(opt), _statistics(ref)):
        assert ours["updates"] == theirs["updates"] == 1
        for g, h in zip(ours["grams"], theirs["grams"]):
            if g is not None:
                torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-7)
    # and they differ from the first micro-batch's alone (what the callback used to feed)
    torch.manual_seed(1)
    model = TinyLM()
    first = _make("TNT", model)
    first.update_curvature(model(x[:BATCH // ACCUMULATE]), loss=_fixed_sampler)
    head = next(i for i, b in enumerate(opt.blocks) if b.params[0].shape == (V, 16))
    assert not torch.allclose(_statistics(opt)[head]["grams"][0], _statistics(first)[head]["grams"][0])


def test_layer_estimators_under_accumulation_get_the_micro_batches_the_engine_takes():
    if "KFAC" not in curvkit.available("method")["method"]:
        pytest.skip("KFAC is not installed")
    from curvkit.integrations import feeds_every_micro_batch

    callback = CurvatureCallback(loss="cross_entropy", class_dim=-1)
    _, opt = _fit_accumulating("KFAC", callback, 2)
    assert feeds_every_micro_batch(opt)  # KFAC accumulates micro-batches
    assert callback.sampled_passes == 2 * ACCUMULATE
    assert all(s["updates"] == 2 for s in _statistics(opt) if "updates" in s)
