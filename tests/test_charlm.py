"""The char-lm benchmark problem at a tiny size: data, model, param groups, the runner's step
budget and evaluation points, steps/seconds to a target loss, and the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from benchmarks import charlm, cli, problems
from benchmarks.methods import discover_methods
from benchmarks.problems import DataOptions, get_problem
from benchmarks.report import format_table, summarize
from benchmarks.drive import run_one
from benchmarks.runner import Budget, RunResult
from benchmarks.settings import PROBLEM_DEFAULTS, SETTINGS

TINY = {"block": 8, "width": 8, "layers": 1, "heads": 2, "val_windows": 16}


@pytest.fixture(autouse=True)
def _tiny(monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    for key, value in TINY.items():
        monkeypatch.setitem(problems.CHAR_LM, key, value)
    yield
    torch.set_num_threads(before)


def test_text_ships_with_python_and_split_is_fixed():
    text = charlm.load_text()
    assert len(text) > 100_000 and "for" in text  # the stdlib's pydoc topics
    vocab = charlm.Vocabulary.of(text)
    assert vocab.decode(vocab.encode(text[:500])) == text[:500]
    split = get_problem("char-lm").load(DataOptions(n_train=40))
    again = get_problem("char-lm").load(DataOptions(n_train=40))
    assert torch.equal(split.x_train, again.x_train) and torch.equal(split.x_test, again.x_test)
    assert split.x_train.shape == (40, 8) and split.x_test.shape == (16, 8)
    codes = vocab.encode(text)
    cut = int(0.9 * codes.numel())
    # validation windows come from the last 10 % of the text: the first one starts at the cut
    assert torch.equal(split.x_test[0], codes[cut:cut + 8])
    # targets are the inputs shifted by one character, across window boundaries too
    assert torch.equal(split.y_train[:, :-1], split.x_train[:, 1:])
    assert torch.equal(split.y_train[:-1, -1], split.x_train[1:, 0])


def test_model_is_causal_with_a_tied_head():
    torch.manual_seed(0)
    model = get_problem("char-lm").build_model()
    x = torch.randint(0, model.cfg.vocab, (2, 8))
    out = model(x)
    assert out.shape == (2, 8, model.cfg.vocab)
    x2 = x.clone()
    x2[:, 5:] = (x2[:, 5:] + 1) % model.cfg.vocab
    out2 = model(x2)
    torch.testing.assert_close(out[:, :5], out2[:, :5])  # earlier positions do not see later ones
    assert not torch.allclose(out[:, 5:], out2[:, 5:])
    # the head is the token embedding: no separate (vocab, width) parameter, and the logits are
    # the final hidden states times the embedding
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes.count((model.cfg.vocab, model.cfg.width)) == 1
    h = model.tok(x) + model.pos(torch.arange(8))
    for block in model.blocks:
        h = block(h)
    torch.testing.assert_close(out, model.ln_f(h) @ model.tok.weight.T)
    with pytest.raises(ValueError, match="longer than the model's block"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_param_groups_decay_only_linear_weights():
    model = get_problem("char-lm").build_model()
    decay, rest = charlm.param_groups(model)
    assert "weight_decay" not in decay and rest["weight_decay"] == 0.0
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    assert {id(p) for p in decay["params"]} == linear
    norms_and_embeddings = {id(p) for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.Embedding))
                            for p in m.parameters(recurse=False)}
    assert {id(p) for p in rest["params"]} == norms_and_embeddings
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))


def test_curvature_outputs_put_the_vocabulary_last():
    problem = get_problem("char-lm")
    logits = torch.randn(3, 8, 11)
    assert problem.curvature_outputs(logits).shape == (24, 11)


@pytest.mark.parametrize("method", ["AdamW", "TNT", "KFAC", "KBFGS"])
def test_runner_step_budget_and_evaluation_points(method):
    methods, _ = discover_methods()
    if method not in methods:
        pytest.skip(f"{method} is not installed")
    problem = get_problem("char-lm")
    split = problem.load(DataOptions(n_train=64))
    settings = dict(SETTINGS["char-lm"][method].kwargs)
    r = run_one(problem, split, methods[method], settings, seed=0, batch_size=4, budget=Budget(steps=6),
                progress=False, eval_every=2)
    assert r.status == "ok", r.message + r.traceback
    assert r.steps == 6 and r.step == [0, 2, 4, 6]
    assert r.epoch[-1] == pytest.approx(6 / 16)
    assert all(math.isfinite(v) for v in r.test_loss + r.train_loss)
    assert r.test_loss[-1] < r.test_loss[0]  # it learns something in 6 steps
    if method == "AdamW":  # the param groups reached the optimizer
        built = methods[method].build(problem.build_model(), params=charlm.param_groups(problem.build_model()))
        assert [g["weight_decay"] for g in built.param_groups] == [0.01, 0.0]


def test_steps_and_seconds_to_target():
    def run(seed, losses, status="ok"):
        r = RunResult("M", seed, {}, status=status)
        r.step = [0, 10, 20, 30]
        r.seconds = [0.0, 1.0, 2.0, 3.0]
        r.test_loss = losses
        r.train_loss = losses
        r.epoch = [0, 0.1, 0.2, 0.3]
        r.steps, r.train_seconds = 30, 3.0
        return r

    a = run(0, [4.0, 2.5, 1.9, 1.8])
    b = run(1, [4.0, 1.95, 1.7, 1.6])
    c = run(2, [4.0, 3.0, 2.5, 2.1])
    assert a.reached(2.0) == (20, 2.0) and b.reached(2.0) == (10, 1.0) and c.reached(2.0) is None
    (row,) = summarize([a, b, c], classifier=False, target=2.0)
    assert row["target_reached"] == "2/3"
    assert row["steps_to_target"][0] == 15 and row["seconds_to_target"][0] == 1.5
    assert row["steps_to_target_range"] == (10, 20)
    table = format_table([row], classifier=False, test_name="validation")
    assert "reached 2" in table and "steps to target" in table and "validation loss" in table


def test_cli_char_lm_writes_json_with_target_columns(tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["--problem", "char-lm", "--methods", "AdamW,TNT", "--steps", "4", "--eval-every", "2",
                     "--batch-size", "4", "--n-train", "32", "--out", str(out), "--no-progress"])
    assert code == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["problem"] == "char-lm" and payload["target_test_loss"] == get_problem("char-lm").target_test_loss
    assert payload["budget"]["steps"] == 4 and payload["budget"]["eval_every"] == 2
    assert [r["method"] for r in payload["runs"]] == ["AdamW", "TNT"]
    assert all(r["status"] == "ok" and r["step"] == [0, 2, 4] for r in payload["runs"])
    assert "steps to target" in (out / "table.txt").read_text()
    for name in ("test_loss_vs_steps.png", "test_loss_vs_seconds.png", "train_loss_vs_steps.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_char_lm_defaults_and_method_selection():
    d = PROBLEM_DEFAULTS["char-lm"]
    assert d.epochs is None and d.steps and d.eval_every
    methods, _ = discover_methods()
    chosen, _ = cli._select("all", list(methods), get_problem("char-lm").skip_methods)
    assert "AdamW" in chosen and "SGD-m" in chosen and "TNT" in chosen and "Adam" not in chosen
    chosen, _ = cli._select("all", list(methods), get_problem("digits-ae").skip_methods)
    assert "AdamW" not in chosen and "Adam" in chosen


def test_results_of_parallel_seeds_merge(tmp_path):
    """Seeds run in separate processes merge into one table (--from-json repeated)."""
    common = ["--problem", "char-lm", "--methods", "AdamW", "--steps", "2", "--eval-every", "1", "--batch-size", "4",
              "--n-train", "16", "--no-progress", "--no-plots"]
    for seed in (0, 1):
        assert cli.main([*common, "--seed", str(seed), "--out", str(tmp_path / f"s{seed}")]) == 0
    merged = tmp_path / "merged"
    files = [str(tmp_path / f"s{seed}" / "results.json") for seed in (0, 1)]
    assert cli.main(["--from-json", files[0], "--from-json", files[1], "--out", str(merged), "--no-plots"]) == 0
    payload = json.loads((merged / "results.json").read_text())
    assert [r["seed"] for r in payload["runs"]] == [0, 1] and payload["seeds"] == [0, 1]
    assert payload["table"][0]["runs"] == 2 and "±" in (merged / "table.txt").read_text()
    assert cli.main([*common, "--steps", "1", "--out", str(tmp_path / "other")]) == 0
    assert cli.main(["--from-json", files[0], "--from-json", str(tmp_path / "other" / "results.json"),
                     "--out", str(tmp_path / "bad"), "--no-plots"]) == 2
