"""curvkit optimizers under a real Hugging Face ``transformers.Trainer`` (CPU, a tiny Llama built
from a config: nothing is downloaded).

The reference is the same training as a plain loop over the same batches (the Trainer's own
dataloader order is replayed by using an unshuffled sampler): TNT's sampled pass and K-BFGS's
after-step closure must give bit-for-bit the parameters and statistics of the loop."""

from __future__ import annotations

import os

import pytest
import torch

import curvkit

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from curvkit.integrations import sequence_sampler  # noqa: E402
from curvkit.integrations.transformers import CurvatureTrainer  # noqa: E402

V, T, N, BATCH, STEPS = 32, 8, 16, 4, 4


def _model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=T)
    return transformers.LlamaForCausalLM(config)


class _Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, V, (N, T), generator=g)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class _InOrder(CurvatureTrainer):
    """The Trainer with its batches in dataset order (so a plain loop can replay them)."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def _make(method, model):
    if method == "TNT":
        return curvkit.TNT(model.parameters(), lr=1e-2, damping=0.1, seed=5)
    return curvkit.get("method", method)(model.parameters(), model=model, lr=0.05, damping=0.3, seed=5)


def _train(method, tmp_path, **options):
    model = _model()
    opt = _make(method, model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=BATCH, use_cpu=True,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, max_grad_norm=0.0,
        lr_scheduler_type="constant", dataloader_num_workers=0, seed=0, **options,
    )
    trainer = _InOrder(model=model, args=args, train_dataset=_Data(), optimizers=(opt, None))
    trainer.train()
    return trainer, model, opt


def _reference(method):
    model = _model()
    model.train()
    opt = _make(method, model)
    data = _Data()
    sampler = sequence_sampler("cross_entropy", class_dim=-1)
    for i in range(STEPS):
        batch = {"input_ids": data.ids[i * BATCH:(i + 1) * BATCH], "labels": data.ids[i * BATCH:(i + 1) * BATCH]}
        if opt.needs_closure:
            def closure(batch=batch):
                opt.zero_grad()
                value = model(**batch).loss
                value.backward()
                return value
            opt.zero_grad()
            closure()
            opt.step(closure)
            continue
        out = model(**batch)
        opt.zero_grad()
        opt.update_curvature(out.logits, loss=sampler)
        out.loss.backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("method", ["TNT", "KBFGS"])
def test_trainer_matches_a_plain_loop(method, tmp_path):
    if method not in curvkit.available("method")["method"]:
        pytest.skip(f"{method} is not installed")
    trainer, model, opt = _train(method, tmp_path)
    ref_model, ref_opt = _reference(method)
    assert opt.step_count == ref_opt.step_count == STEPS
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    moved = 0
    for i, block in enumerate(opt.blocks):
        ours, theirs = opt.block_state(i)["estimator"], ref_opt.block_state(i)["estimator"]
        assert ours.get("updates") == theirs.get("updates"), block.name
        for key, value in ours.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, theirs[key], rtol=0, atol=0)
        moved += ours.get("updates", 0) > 0
    assert moved > 0
    if method == "TNT":
        assert trainer.sampled_passes == STEPS


def test_kbfgs_refuses_gradient_accumulation(tmp_path):
    if "KBFGS" not in curvkit.available("method")["method"]:
        pytest.skip("KBFGS is not installed")
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        _train("KBFGS", tmp_path, gradient_accumulation_steps=2)


def test_bad_options_and_outputs(tmp_path):
    with pytest.raises(ValueError, match="outputs_attr"):
        CurvatureTrainer(model=_model(), outputs_attr="")
    model = _model()
    opt = _make("TNT", model)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=BATCH,
                                          use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    trainer = CurvatureTrainer(model=model, args=args, train_dataset=_Data(), optimizers=(opt, None),
                               outputs_attr="no_such_thing")
    with pytest.raises(RuntimeError, match="no_such_thing"):
        trainer.train()
    assert os.path.isdir(tmp_path)


# ---------------------------------------------------------------------------- gradient accumulation
ACCUMULATE = 2


def _fixed_sampler(outputs, generator):
    """A deterministic stand-in for the sampled loss (a per-example mean), so that the evidence of
    the micro-batches can be compared with the evidence of the whole batch."""
    return 0.5 * outputs.float().pow(2).sum(-1).mean()


def _train_accumulating(tmp_path, **options):
    model = _model()
    opt = _make("TNT", model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=BATCH // ACCUMULATE,
        gradient_accumulation_steps=ACCUMULATE, use_cpu=True, report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=True, max_grad_norm=0.0, lr_scheduler_type="constant",
        dataloader_num_workers=0, seed=0,
    )
    trainer = _InOrder(model=model, args=args, train_dataset=_Data(), optimizers=(opt, None), **options)
    trainer.train()
    return trainer, opt


def _statistics(opt):
    return [opt.block_state(i)["estimator"] for i in range(len(opt.blocks))]


def test_trainer_feeds_every_micro_batch_as_a_plain_accumulating_loop_does(tmp_path):
    """gradient_accumulation_steps=2: one sampled pass per micro-batch; after the accumulated step
    the statistics equal those of a plain loop calling update_curvature on each micro-batch."""
    trainer, opt = _train_accumulating(tmp_path)
    assert trainer.sampled_passes == ACCUMULATE and opt.step_count == 1
    model = _model()
    model.train()
    ref = _make("TNT", model)
    data = _Data()
    sampler = sequence_sampler("cross_entropy", class_dim=-1)
    micro = BATCH // ACCUMULATE
    for i in range(ACCUMULATE):
        ids = data.ids[i * micro:(i + 1) * micro]
        out = model(input_ids=ids, labels=ids)
        ref.update_curvature(out.logits, loss=sampler)
        out.loss.backward()
    ref.step()
    moved = 0
    for ours, theirs in zip(_statistics(opt), _statistics(ref)):
        assert ours.get("updates") == theirs.get("updates")
        for key, value in ours.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, theirs[key], rtol=0, atol=0)
        moved += ours.get("updates", 0) == 1
    assert moved > 0


def test_accumulated_statistics_equal_the_whole_batch_statistics(tmp_path):
    """With a deterministic likelihood the accumulated evidence is the whole batch's: one plain
    update_curvature on all of it gives the same statistics."""
    trainer, opt = _train_accumulating(tmp_path, curvature_loss=_fixed_sampler, class_dim=None)
    assert trainer.sampled_passes == ACCUMULATE
    model = _model()
    model.train()
    ref = _make("TNT", model)
    ids = _Data().ids[:BATCH]
    ref.update_curvature(model(input_ids=ids).logits, loss=_fixed_sampler)
    compared = 0
    for ours, theirs in zip(_statistics(opt), _statistics(ref)):
        for g, h in zip(ours.get("grams") or (), theirs.get("grams") or ()):
            if g is not None:
                torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)
                compared += 1
    assert compared > 0
