"""The benchmark harness at a tiny size: data readers, the curves generator, the runner's
budgets, divergence / error / Ctrl-C handling, and the files the command line writes."""

from __future__ import annotations

import ctypes
import gzip
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import benchmarks
from benchmarks import cli
from benchmarks.curves import curve_points, generate_curves, render_curves
from benchmarks.data import load_mnist_images, read_idx, write_idx
from benchmarks.memory import state_bytes
from benchmarks.methods import PREFERRED_ORDER, MethodSpec, discover_methods
from benchmarks.problems import PROBLEMS, DataOptions, get_problem
from benchmarks.report import format_table, summarize
from benchmarks.drive import peak_memory, run_interleaved, run_one
from benchmarks.runner import Budget
from benchmarks.settings import PROBLEM_DEFAULTS, SETTINGS

ROOT = Path(__file__).resolve().parents[1]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one torch thread is fastest and immune to a busy machine; restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------- IDX
def _hand_written_idx():
    """IDX bytes assembled here by hand (not by write_idx), and the arrays they hold."""
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 0x08, 3]) + struct.pack(">iii", 2, 3, 4) + data.tobytes()
    shorts = np.array([[-2, 300], [7, -32768]], dtype=np.int16)
    raw16 = bytes([0, 0, 0x0B, 2]) + struct.pack(">ii", 2, 2) + shorts.astype(">i2").tobytes()
    return raw, data, raw16, shorts


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reader_plain_and_gzipped(tmp_path, gz):
    raw, data, raw16, shorts = _hand_written_idx()
    opener = gzip.open if gz else open
    for name, payload, expected in (("a", raw, data), ("b", raw16, shorts)):
        path = tmp_path / (name + (".gz" if gz else ""))
        with opener(path, "wb") as fh:
            fh.write(payload)
        got = read_idx(path)
        assert got.shape == expected.shape and np.array_equal(got, expected)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, dtype, suffix):
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal((3, 5, 2)) * 50).astype(dtype)
    path = write_idx(tmp_path / f"x{suffix}", arr)
    assert np.array_equal(read_idx(path), arr)


def test_idx_reader_rejects_malformed(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(bytes([1, 0, 8, 1]) + struct.pack(">i", 2) + b"ab")
    with pytest.raises(ValueError, match="two zero bytes"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">i", 5) + b"abc")
    with pytest.raises(ValueError, match="data bytes"):
        read_idx(short)
    code = tmp_path / "code"
    code.write_bytes(bytes([0, 0, 0x42, 1]) + struct.pack(">i", 1) + b"a")
    with pytest.raises(ValueError, match="type byte"):
        read_idx(code)


def _write_mnist(tmp_path, n_train=12, n_test=6):
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", test)
    return train, test


def test_mnist_loader_reads_idx_files(tmp_path):
    train, test = _write_mnist(tmp_path)
    split = load_mnist_images(tmp_path, limit_train=10)
    assert split.x_train.shape == (10, 784) and split.x_test.shape == (6, 784)
    assert torch.equal(split.x_train, split.y_train)
    expected = torch.from_numpy(train[:10].reshape(10, -1).astype(np.float32)) / 255
    assert torch.allclose(split.x_train, expected)
    assert float(split.x_test.max()) <= 1.0 and float(split.x_test.min()) >= 0.0


def test_mnist_loader_names_the_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((1, 28, 28), np.uint8))
        load_mnist_images(tmp_path)
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_mnist_images(None)


# ------------------------------------------------------------------------------------- curves
def test_curve_passes_through_its_three_points():
    anchors = 3 + 22 * torch.rand(5, 3, 2, dtype=torch.float64)
    pts = curve_points(anchors, samples=41)
    assert torch.allclose(pts[:, 0], anchors[:, 0]) and torch.allclose(pts[:, -1], anchors[:, 2])
    assert torch.allclose(pts[:, 20], anchors[:, 1])


def test_rendering_matches_analytic_distance_to_a_segment():
    """Collinear anchors (middle point at the midpoint) give a straight segment, whose pixel
    distances have a closed form."""
    a, b = torch.tensor([4.2, 6.9], dtype=torch.float64), torch.tensor([22.7, 19.1], dtype=torch.float64)
    anchors = torch.stack([a, (a + b) / 2, b])[None]
    width = 1.3
    img = render_curves(curve_points(anchors, samples=301), width=width)[0]
    centres = torch.arange(28, dtype=torch.float64) + 0.5
    yy, xx = torch.meshgrid(centres, centres, indexing="ij")
    p = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    t = ((p - a) @ (b - a) / ((b - a) @ (b - a))).clamp(0, 1)
    dist = (p - (a + t[:, None] * (b - a))).norm(dim=1)
    expected = (1 + width / 2 - dist).clamp(0, 1)
    assert (img - expected).abs().max() < 0.05  # sampling spacing ~0.08 px


def test_generated_curves_are_images_in_unit_range_and_reproducible():
    x = generate_curves(20, seed=3)
    assert x.shape == (20, 784) and x.dtype == torch.float32
    assert float(x.min()) >= 0 and float(x.max()) == 1.0
    assert torch.equal(x, generate_curves(20, seed=3))
    assert not torch.equal(x, generate_curves(20, seed=4))
    ink = (x > 0).sum(dim=1)
    assert bool((ink > 10).all()) and bool((ink < 300).all())  # a stroke, not a blank or a blob


# ------------------------------------------------------------------------------------- runner
def _digits_small():
    problem = get_problem("digits-ae")
    return problem, problem.load(DataOptions())


class _NaNAfter(torch.optim.SGD):
    """SGD that poisons the first parameter after ``k`` steps."""

    def __init__(self, params, k):
        super().__init__(params, lr=0.01)
        self.k, self.n = k, 0

    def step(self, closure=None):
        super().step(closure)
        self.n += 1
        if self.n == self.k:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))


def test_nonfinite_loss_marks_the_run_diverged_and_stops_it():
    problem, split = _digits_small()
    spec = MethodSpec("poison", lambda model: _NaNAfter(model.parameters(), 3), "test", False)
    r = run_one(problem, split, spec, {}, seed=0, batch_size=200, budget=Budget(epochs=5), progress=False)
    assert r.status == "diverged" and "step 4" in r.message
    assert r.steps == 4 and not math.isfinite(r.step_loss[-1])
    rows = summarize([r], classifier=False)
    assert rows[0]["status"] == "diverged" and "diverged" in format_table(rows, classifier=False)


def test_same_seed_gives_same_run_and_time_budget_stops_early():
    problem, split = _digits_small()
    sgd = discover_methods()[0]["SGD-m"]
    kw = {"lr": 0.01, "momentum": 0.9}
    a = run_one(problem, split, sgd, kw, seed=5, batch_size=200, budget=Budget(epochs=2), progress=False)
    b = run_one(problem, split, sgd, kw, seed=5, batch_size=200, budget=Budget(epochs=2), progress=False)
    assert a.status == "ok" and a.epoch == [0.0, 1.0, 2.0] and a.steps == 2 * (split.n_train // 200)
    assert a.train_loss == b.train_loss and a.step_loss == b.step_loss
    c = run_one(problem, split, sgd, kw, seed=6, batch_size=200, budget=Budget(epochs=1), progress=False)
    assert c.train_loss[0] != a.train_loss[0]  # another seed, another initialisation
    t = run_one(problem, split, sgd, kw, seed=5, batch_size=20, budget=Budget(epochs=1000, seconds=0.05),
                progress=False)
    assert t.status == "ok" and 0.05 <= t.train_seconds < 5 and t.epochs_done < 1000
    assert t.seconds[-1] == pytest.approx(t.train_seconds)


class _NoisySGD(torch.optim.SGD):
    """SGD with noise from torch's global generator in every step (as dropout or a sampling
    optimizer draws): runs that take turns must each see their own stream."""

    def step(self, closure=None):
        super().step(closure)
        with torch.no_grad():
            for p in self.param_groups[0]["params"]:
                p.add_(torch.randn_like(p), alpha=1e-3)


def test_interleaved_runs_equal_sequential_runs_to_every_digit():
    """Side by side, one epoch of each in turn: every run's curves and step losses are those it
    has alone, also for methods that draw from torch's global generator while they train (TNT
    draws its sampling seed from it), under a step budget that ends mid-epoch, and with turns
    shorter than an epoch."""
    problem, split = _digits_small()
    found = discover_methods()[0]
    noisy = MethodSpec("noisy", lambda model, **kw: _NoisySGD(model.parameters(), lr=0.01, momentum=0.9), "test", False)
    methods = [noisy, found["TNT"], noisy, found["SGD-m"]]
    settings = [{}, {"lr": 3e-3, "damping": 0.1}, {}, {"lr": 0.01, "momentum": 0.9}]
    for budget, turn, every in ((Budget(epochs=2), 50, None), (Budget(steps=11), 50, None), (Budget(epochs=2), 3, 5)):
        # turns of 3 steps split the 7-step epochs (char-lm's long epochs), with records every 5 steps
        alone = [run_one(problem, split, m, s, seed=3, batch_size=200, budget=budget, progress=False, eval_every=every)
                 for m, s in zip(methods, settings)]
        together = run_interleaved(problem, split, methods, settings, seed=3, batch_size=200, budget=budget,
                                   progress=False, eval_every=every, turn_steps=turn)
        for a, t in zip(alone, together):
            assert t.status == a.status == "ok" and t.method == a.method
            assert t.step_loss == a.step_loss and t.train_loss == a.train_loss and t.test_loss == a.test_loss
            assert t.epoch == a.epoch and t.step == a.step and t.steps == a.steps
            assert t.state_mib == a.state_mib and math.isnan(t.peak_mib)  # memory is measured alone
        if budget.steps:
            assert together[0].epoch[-1] == pytest.approx(11 / 7) and together[0].steps == 11
    assert together[0].epoch == pytest.approx([0.0, 5 / 7, 1.0, 10 / 7, 2.0])  # the records every 5 steps


def test_interleaved_runs_keep_going_past_a_failing_or_diverging_one():
    problem, split = _digits_small()
    sgd = discover_methods()[0]["SGD-m"]
    broken = MethodSpec("broken", lambda model, **kw: _NaNAfter(model.parameters(), 3), "test", False)
    class _Raises(torch.optim.SGD):
        def step(self, closure=None):
            if self.state_dict()["state"]:  # its second step
                raise RuntimeError("broken optimizer")
            return super().step(closure)

    raising = MethodSpec("raising", lambda model, **kw: _Raises(model.parameters(), lr=0.01, momentum=0.9), "test", False)
    runs = run_interleaved(problem, split, [broken, raising, sgd], [{}, {}, {"lr": 0.01, "momentum": 0.9}], seed=0,
                           batch_size=200, budget=Budget(epochs=3), progress=False)
    assert [r.status for r in runs] == ["diverged", "error", "ok"]
    assert runs[0].steps == 4 and "broken optimizer" in runs[1].message and runs[1].steps == 1
    assert runs[2].epoch == [0.0, 1.0, 2.0, 3.0]


def test_peak_memory_is_a_short_run_alone_and_passes_ctrl_c_on():
    problem, split = _digits_small()
    found = discover_methods()[0]
    mib, how = peak_memory(problem, split, found["TNT"], {}, seed=0, batch_size=200, budget=Budget(epochs=100), steps=5)
    assert mib >= 0 and "5 steps alone" in how

    class _Stop(torch.optim.SGD):
        def step(self, closure=None):
            raise KeyboardInterrupt

    stop = MethodSpec("stop", lambda model, **kw: _Stop(model.parameters(), lr=0.1), "test", False)
    with pytest.raises(KeyboardInterrupt):
        peak_memory(problem, split, stop, {}, seed=0, batch_size=200, budget=Budget(epochs=1))


class _ClosureSGD(torch.optim.SGD):
    needs_closure = True

    def __init__(self, params):
        super().__init__(params, lr=0.01)
        self.closure_losses = []

    def step(self, closure=None):
        assert closure is not None
        super().step()
        self.closure_losses.append(float(closure().detach()))  # after the update, on the same batch


def test_closure_is_passed_to_methods_that_need_it():
    problem, split = _digits_small()
    made = []
    spec = MethodSpec("closure", lambda model: made.append(_ClosureSGD(model.parameters())) or made[-1], "test", False)
    r = run_one(problem, split, spec, {}, seed=0, batch_size=400, budget=Budget(epochs=1), progress=False)
    assert r.status == "ok" and len(made[0].closure_losses) == r.steps == 3
    assert made[0].closure_losses[0] < r.step_loss[0]  # re-evaluated after a descent step


def test_time_ratio_to_sgd_is_paired_by_seed():
    """The x SGD-m column is the mean over seeds of each seed's ratio (the runs a side-by-side job
    trained together), with its standard deviation; without a common seed, the ratio of means."""
    from benchmarks.runner import RunResult

    def run(method, seed, seconds, epochs=2.0):
        r = RunResult(method, seed, {})
        r.epoch, r.train_seconds, r.train_loss = [0.0, epochs], seconds, [1.0, 0.5]
        return r

    # seed 0: a slow machine (both 2x slower); seed 1: a fast one. Per seed both ratios are 3.
    runs = [run("SGD-m", 0, 2.0), run("TNT", 0, 6.0), run("SGD-m", 1, 1.0), run("TNT", 1, 3.0),
            run("Adam", 0, 3.0), run("Adam", 1, 2.0), run("Other", 7, 4.5)]
    rows = {r["method"]: r for r in summarize(runs, classifier=False)}
    assert rows["SGD-m"]["time_ratio_to_sgd"] == 1.0 and rows["SGD-m"]["time_ratio_to_sgd_std"] == 0.0
    assert rows["TNT"]["time_ratio_to_sgd"] == pytest.approx(3.0) and rows["TNT"]["time_ratio_to_sgd_std"] == pytest.approx(0.0)
    assert rows["TNT"]["time_ratio_to_sgd_per_seed"] == pytest.approx([3.0, 3.0])
    assert rows["Adam"]["time_ratio_to_sgd"] == pytest.approx(1.75)  # (1.5 + 2) / 2, not 2.5 / 1.5
    assert rows["Adam"]["time_ratio_to_sgd_std"] == pytest.approx(0.5 ** 0.5 / 2)
    assert rows["Other"]["time_ratio_to_sgd"] == pytest.approx(2.25 / 0.75)  # no common seed: ratio of means
    assert "3.00 ± 0.00" in format_table(list(rows.values()), classifier=False)


_MAPPED_SHARE = """
import ctypes, os, sys
from benchmarks.memory import PeakRSS


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]


def mapped_share(piece=256 * 1024, count=32):
    # share of count fresh malloc(piece) blocks that glibc served by mmap
    before = libc.mallinfo2().hblkhd
    blocks = [libc.malloc(piece) for _ in range(count)]
    mapped = libc.mallinfo2().hblkhd - before
    for b in blocks:
        libc.free(b)
    return mapped / (piece * count)


with PeakRSS():
    inside = mapped_share()
print(inside, mapped_share(), mapped_share(4 * 2**20))
"""


def _has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_memory_window_maps_large_blocks_and_hands_the_allocator_back_for_timing():
    """Inside a PeakRSS window glibc maps blocks from 64 KiB (resident memory follows live
    tensors); after it, blocks of 256 KiB and 4 MiB stay on the heap again, so that whatever is
    timed next does not page-fault in its large temporaries at every step. A threshold the
    environment sets is what the window hands back. (A fresh process each: the heap's free
    blocks, which serve requests before any mapping, are then the same every time.)"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))

    def shares(**extra: str) -> list[float]:
        out = subprocess.run([sys.executable, "-c", _MAPPED_SHARE], env={**env, **extra}, cwd=ROOT,
                             capture_output=True, text=True, timeout=120, check=True)
        return [float(v) for v in out.stdout.split()]

    inside, after, after_4m = shares()
    assert inside > 0.9 and after == 0.0 and after_4m == 0.0
    inside, after, after_4m = shares(MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    assert inside > 0.9 and after > 0.9 and after_4m > 0.9


def test_state_bytes_counts_nested_tensors():
    sd = {"a": torch.zeros(3, 4), "b": [torch.zeros(2, dtype=torch.float64), {"c": torch.zeros(5, dtype=torch.int8)}], "d": 1.0}
    assert state_bytes(sd) == 48 + 16 + 5


# --------------------------------------------------------------------------------------- cli
def _run(tmp_path, *args):
    out = tmp_path / "out"
    code = cli.main(["--out", str(out), "--no-progress", *args])
    payload = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else None
    return code, out, payload


def test_cli_digits_ae_writes_table_json_and_plots(tmp_path, capsys):
    code, out, payload = _run(tmp_path, "--epochs", "1", "--batch-size", "300", "--methods", "SGD-m,TNT", "--seeds", "2")
    text = capsys.readouterr().out
    assert code == 0
    assert "final train loss" in text and "TNT" in text and "found" in text
    assert payload["problem"] == "digits-ae" and len(payload["runs"]) == 4 and payload["schedule"] == "interleaved"
    assert all(r["peak_mib"] >= 0 and "steps alone" in r["memory_method"] for r in payload["runs"])
    assert "side by side" in text
    assert {r["method"] for r in payload["runs"]} == {"SGD-m", "TNT"}
    for r in payload["runs"]:
        assert r["status"] == "ok" and r["epoch"] == [0.0, 1.0] and len(r["train_loss"]) == 2
        assert r["state_mib"] > 0 and r["settings"] == payload["settings"][r["method"]]["kwargs"]
    by_seed = {}
    for r in payload["runs"]:
        by_seed.setdefault(r["seed"], set()).add(r["train_loss"][0])
    assert all(len(v) == 1 for v in by_seed.values())  # same initial weights for every method
    assert payload["table"][0]["time_ratio_to_sgd"] == 1.0 and "±" in (out / "table.txt").read_text()
    assert (out / "table.rst").read_text().startswith("=")
    for name in ("train_loss_vs_epochs.png", "train_loss_vs_seconds.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    again = tmp_path / "again"  # re-render from the JSON alone: the same table
    assert cli.main(["--from-json", str(out / "results.json"), "--out", str(again), "--no-plots"]) == 0
    assert (again / "table.txt").read_text() == (out / "table.txt").read_text()


def test_cli_marks_divergence_and_continues(tmp_path):
    code, out, payload = _run(tmp_path, "--epochs", "2", "--batch-size", "300", "--methods", "SGD-m,Adam",
                              "--set", "SGD-m.lr=1e6", "--no-plots")
    status = {r["method"]: r["status"] for r in payload["runs"]}
    assert code == 0 and status == {"SGD-m": "diverged", "Adam": "ok"}
    assert "diverged" in (out / "table.txt").read_text()


def test_cli_classifier_and_generated_problems(tmp_path, capsys):
    code, out, payload = _run(tmp_path, "--problem", "digits-cnn", "--epochs", "1", "--batch-size", "400",
                              "--methods", "SGD-m,TNT")
    assert code == 0 and (out / "test_accuracy_vs_epochs.png").read_bytes()[:8] == PNG_MAGIC
    assert all(0 <= r["test_accuracy"][-1] <= 1 for r in payload["runs"])
    code, out, payload = _run(tmp_path, "--problem", "curves-ae", "--epochs", "1", "--batch-size", "20",
                              "--n-train", "60", "--n-test", "20", "--methods", "SGD-m", "--no-plots")
    assert code == 0 and payload["generated"] is True and "GENERATED" in capsys.readouterr().out
    assert payload["data"] == {"n_train": 60, "n_test": 20, "data_dir": None}


def test_cli_mnist_reads_data_dir_and_errors_without_it(tmp_path, capsys):
    _write_mnist(tmp_path, n_train=20, n_test=5)
    code, out, payload = _run(tmp_path, "--problem", "mnist-ae", "--data-dir", str(tmp_path), "--epochs", "1",
                              "--batch-size", "10", "--methods", "SGD-m", "--no-plots")
    assert code == 0 and payload["runs"][0]["steps"] == 2
    assert cli.main(["--problem", "mnist-ae", "--data-dir", str(tmp_path / "nowhere"), "--no-progress"]) == 2
    assert "train-images-idx3-ubyte" in capsys.readouterr().err


def test_cli_ctrl_c_keeps_finished_runs_and_errors_do_not_stop_others(tmp_path, monkeypatch):
    real = cli.discover_methods

    class _Interrupt(torch.optim.SGD):
        def step(self, closure=None):
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 3:  # the untimed warm-up makes two steps: interrupt the measured run
                raise KeyboardInterrupt
            return super().step(closure)

    class _Broken(torch.optim.SGD):
        def step(self, closure=None):
            raise RuntimeError("broken optimizer")

    def fake():
        methods, notes = real()
        methods["Broken"] = MethodSpec("Broken", lambda m: _Broken(m.parameters(), lr=0.1), "test", False)
        methods["Stop"] = MethodSpec("Stop", lambda m: _Interrupt(m.parameters(), lr=0.1), "test", False)
        return methods, notes

    monkeypatch.setattr(cli, "discover_methods", fake)
    code, out, payload = _run(tmp_path, "--epochs", "1", "--batch-size", "300", "--methods", "Broken,SGD-m", "--no-plots")
    assert code == 1 and [r["status"] for r in payload["runs"]] == ["error", "ok"]
    assert "broken optimizer" in payload["runs"][0]["message"]
    code, out, payload = _run(tmp_path, "--epochs", "1", "--batch-size", "300", "--methods", "SGD-m,Stop,Adam",
                              "--no-plots", "--sequential")
    assert code == 130 and payload["interrupted"] is True and payload["schedule"] == "sequential"
    assert [r["status"] for r in payload["runs"]] == ["ok", "interrupted"]  # Adam never started


def test_cli_ctrl_c_side_by_side_marks_the_unfinished_runs(tmp_path, monkeypatch):
    """Side by side (the default), Ctrl-C in one run's epoch stops the seed: runs that had
    finished keep their status, the others are marked interrupted, and the table is written."""
    real = cli.discover_methods
    built = []

    class _Late(torch.optim.SGD):  # the third one built (after warm-up and the memory run) is the timed run
        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            built.append(self)
            self.calls = 0

        def step(self, closure=None):
            self.calls += 1
            if len(built) == 3 and self is built[2] and self.calls == 2:
                raise KeyboardInterrupt
            return super().step(closure)

    def fake():
        methods, notes = real()
        methods["Late"] = MethodSpec("Late", lambda m: _Late(m.parameters(), lr=0.1), "test", False)
        return methods, notes

    monkeypatch.setattr(cli, "discover_methods", fake)
    code, out, payload = _run(tmp_path, "--epochs", "1", "--batch-size", "300", "--methods", "SGD-m,Late,Adam",
                              "--no-plots", "--seeds", "2")
    assert code == 130 and payload["interrupted"] is True and payload["schedule"] == "interleaved"
    # SGD-m trained its one epoch before Late's turn; Adam never got its turn
    assert [(r["method"], r["status"]) for r in payload["runs"]] == [("SGD-m", "ok"), ("Late", "interrupted"),
                                                                     ("Adam", "interrupted")]
    assert (out / "table.txt").exists()


def test_cli_rejects_bad_options(capsys):
    assert cli.main(["--methods", "NoSuchMethod", "--no-progress"]) == 2
    assert cli.main(["--set", "TNT.lr", "--no-progress"]) == 2
    assert cli.main(["--methods", "SGD-m", "--set", "Adam.lr=1", "--no-progress"]) == 2
    assert "error:" in capsys.readouterr().err
    assert cli.parse_overrides(["TNT.lr=3e-4", "TNT.evidence=empirical"]) == {"TNT": {"lr": 3e-4, "evidence": "empirical"}}


def test_every_problem_and_known_method_has_recorded_settings():
    assert benchmarks.main is cli.main
    for name in PROBLEMS:
        assert PROBLEM_DEFAULTS[name].reason and PROBLEM_DEFAULTS[name].batch_size > 0
        for method in PREFERRED_ORDER:
            if method in PROBLEMS[name].skip_methods:
                continue
            setting = SETTINGS[name][method]
            assert setting.reason, (name, method)


# --------------------------------------------------------------------------------------- work
def test_work_counts_the_matrix_products_written_out_for_sgd_and_tnt():
    """benchmarks.work on digits-ae against the flops of each product written out: SGD-m's
    forward, weight gradients and input gradients (none for the data); TNT's sampled backward
    pass on top, the two mode Grams of each (out, in) sampled gradient and the two mode products
    of its direction; one inversion in the 20 counted steps (Cholesky and inverse for each of the
    four factor sizes 128, 64, 32, 8)."""
    from benchmarks.work import count_work, format_work

    rows = {r["method"]: r for r in count_work("digits-ae", ["SGD-m", "TNT"], steps=20)}
    widths, batch = [64, 128, 64, 32, 8, 32, 64, 128, 64], 100
    pairs = list(zip(widths[:-1], widths[1:]))
    weights = sum(i * o for i, o in pairs)
    forward = weight_grads = 2 * batch * weights
    input_grads = 2 * batch * (weights - widths[0] * widths[1])
    sgd = forward + weight_grads + input_grads
    grams = sum(2 * i * o * (i + o) for i, o in pairs)  # G G^T (2 o^2 i) and G^T G (2 o i^2)
    tnt = sgd + (weight_grads + input_grads) + grams + grams  # the products V_1 M V_2^T cost the same
    assert rows["SGD-m"]["mflop"] * 1e6 == pytest.approx(sgd, rel=1e-12)
    assert rows["TNT"]["mflop"] * 1e6 == pytest.approx(tnt, rel=1e-12)
    assert rows["TNT"]["mflop_ratio"] == pytest.approx(tnt / sgd)
    assert rows["SGD-m"]["decompositions"] == 0 and rows["TNT"]["decompositions"] == pytest.approx(8 / 20)
    assert rows["TNT"]["ops"] > 2 * rows["SGD-m"]["ops"] > 0
    table = format_work(list(rows.values()))
    assert "TNT" in table and f"{tnt / sgd:.2f}" in table


def test_work_command_line_writes_its_table_and_json(tmp_path, capsys):
    from benchmarks import work

    assert work.main(["--methods", "SGD-m", "--steps", "2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "work.json").read_text())
    assert data["problem"] == "digits-ae" and [r["method"] for r in data["rows"]] == ["SGD-m"]
    assert data["rows"][0]["steps"] == 2 and data["rows"][0]["mflop_ratio"] == 1.0
    assert "SGD-m" in (tmp_path / "work.txt").read_text() and "MFlop/step" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown methods"):
        work.count_work("digits-ae", ["NoSuchMethod"], steps=1)
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        work.main(["--methods", "SGD-m", "--steps", "0"])
