"""The step-time benchmark (``python -m benchmarks.steptime``): the floor's amortisation by the
schedule, the measurement windows, the interleaving of rounds, the table's ratios on a hand-made
payload, and a smoke run at tiny shapes (structure of the JSON and table, positive floor pieces).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks.steptime import cli
from benchmarks.steptime.cases import Case, measurement_window
from benchmarks.steptime.floor import PIECES, RECIPES, floor_breakdown, floor_ms
from benchmarks.steptime.worker import run_job

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# distinct powers of two: any wrong weight or a piece counted twice changes the sum
PIECE_MS = {name: float(2 ** i) for i, name in enumerate(PIECES)}


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- floor arithmetic
def test_tnt_floor_amortises_statistics_by_t1_and_inverses_by_t2():
    p = PIECE_MS
    expected = (p["forward"] + p["backward"] + p["sampled_backward_params"] / 10 + p["grams_params"] / 10
                + p["inverse_cholesky_params"] / 100 + p["mode_products_params"] + p["momentum_update"])
    assert floor_ms("tnt", (10, 100), p) == pytest.approx(expected, rel=1e-12)
    expected_paper = (p["forward"] + p["backward"] + p["sampled_backward_params"] + p["grams_params"]
                      + p["inverse_cholesky_params"] / 20 + p["mode_products_params"] + p["momentum_update"])
    assert floor_ms("tnt", (1, 20), p) == pytest.approx(expected_paper, rel=1e-12)


def test_floor_of_each_method_written_out():
    p = PIECE_MS
    t1, t2 = 3, 7
    written = {
        "sgd": p["forward"] + p["backward"] + p["momentum_update"],
        "adam": p["forward"] + p["backward"] + p["adam_update"],
        "tnt_empirical": p["forward"] + p["backward"] + p["grams_params"] / t1 + p["inverse_cholesky_params"] / t2
        + p["mode_products_params"] + p["momentum_update"],
        "shampoo": p["forward"] + p["backward"] + p["grams_params"] / t1 + p["inverse_roots_params"] / t2
        + p["mode_products_params"] + p["momentum_update"],
        "kfac": p["forward"] + p["backward"] + p["sampled_backward_outputs"] / t1 + p["grams_layers"] / t1
        + p["inverse_cholesky_layers"] / t2 + p["mode_products_layers"] + p["momentum_update"],
        # K-BFGS: the closure's second forward and backward every step, no inversion term
        "kbfgs": 2 * p["forward"] + 2 * p["backward"] + p["grams_inputs"] / t1 + p["bfgs_a"] + p["bfgs_g"]
        + p["mode_products_layers"] + p["momentum_update"],
        "kbfgs_l": 2 * p["forward"] + 2 * p["backward"] + p["grams_inputs"] / t1 + p["bfgs_a"]
        + p["lbfgs_direction"] + p["momentum_update"],
    }
    for recipe, value in written.items():
        assert floor_ms(recipe, (t1, t2), p) == pytest.approx(value, rel=1e-12), recipe
    assert set(written) | {"tnt"} == set(RECIPES)


def test_own_schedule_is_every_step_and_breakdown_sums_to_floor():
    p = PIECE_MS
    parts = floor_breakdown("kbfgs", None, p)
    assert parts["forward"] == 2 * p["forward"] and parts["grams_inputs"] == p["grams_inputs"]
    assert sum(parts.values()) == floor_ms("kbfgs", None, p)
    assert set(parts) == {piece for piece, _, _ in RECIPES["kbfgs"]}


def test_every_recipe_piece_is_measured():
    for recipe, entries in RECIPES.items():
        assert {piece for piece, _, _ in entries} <= set(PIECES), recipe


@pytest.mark.parametrize(
    "recipe, schedule, pieces, match",
    [
        ("nope", (1, 20), PIECE_MS, "recipe must be one of"),
        ("tnt", (0, 20), PIECE_MS, "T1 must be an integer >= 1, got 0"),
        ("tnt", (1, 2.5), PIECE_MS, "T2 must be an integer >= 1, got 2.5"),
        ("tnt", (1, 20), {"forward": 1.0}, "needs piece 'backward'"),
    ],
)
def test_floor_rejects_bad_input(recipe, schedule, pieces, match):
    with pytest.raises(ValueError, match=match):
        floor_ms(recipe, schedule, pieces)


# ----------------------------------------------------------------------------- windows, rounds
def test_measurement_window_excludes_warmup_and_covers_whole_periods():
    tnt = lambda s: Case("TNT", "curvkit", s, "x")  # noqa: E731
    assert measurement_window(tnt((1, 20))) == (21, 20)
    # curvkit inverts on every statistics step while t < T2: the warm-up ends after step T2
    assert measurement_window(tnt((10, 100))) == (101, 100)
    assert measurement_window(tnt((10, 100)), periods=2) == (101, 200)
    assert measurement_window(tnt((1, 7))) == (21, 21)  # at least 20 steps, whole periods
    assert measurement_window(Case("Adam", "baseline", None, "x")) == (21, 20)
    assert measurement_window(Case("KBFGS_L", "curvkit", None, "x")) == (101, 20)  # memory of 100 pairs full
    assert measurement_window(tnt((2, 4)), quick=True) == (5, 4)
    with pytest.raises(ValueError, match="periods must be >= 1"):
        measurement_window(tnt((1, 20)), periods=0)


def test_interleave_runs_every_job_once_per_round_in_different_orders():
    jobs = list("abcdef")
    order = cli.interleave(jobs, 3)
    assert len(order) == 18
    per_round = [[j for r, j in order if r == k] for k in range(3)]
    for seq in per_round:
        assert sorted(seq) == jobs
    assert len({tuple(s) for s in per_round}) == 3
    assert {s[0] for s in per_round} != {"a"}  # not always the same job first


def test_distributed_shampoo_peer_runs_where_its_factors_update_every_step(monkeypatch):
    """Distributed Shampoo updates its factors at every step, so it is a peer of Shampoo at the
    schedules with T1 = 1 only, with Shampoo's floor; without the package it is listed as not
    installed."""
    from benchmarks.steptime import cases as C

    installed = {"ASDL": False, "heavyball": False, "torch.optim.Muon": False, "Distributed Shampoo": True}
    monkeypatch.setattr(C, "peers_installed", lambda: dict(installed))
    found, _, missing = C.discover_cases([(1, 20), (10, 100), (1, 7)])
    peers = [c for c in found if c.name == "Distributed Shampoo"]
    assert [c.schedule for c in peers] == [(1, 20), (1, 7)]
    assert all(c.kind == "peer" and c.peer_of == "Shampoo" and c.recipe == "shampoo" for c in peers)
    assert not any("Distributed Shampoo" in m for m in missing)
    installed["Distributed Shampoo"] = False
    found, _, missing = C.discover_cases([(1, 20)])
    assert not any(c.name == "Distributed Shampoo" for c in found)
    assert any(m.startswith("Distributed Shampoo") for m in missing)


def test_parse_schedules():
    assert cli.parse_schedules("1:20, 10:100") == [(1, 20), (10, 100)]
    for bad in ("1-20", "0:20", "", "1:2:3"):
        with pytest.raises(ValueError, match="--schedules"):
            cli.parse_schedules(bad)


# ----------------------------------------------------------------------------- table ratios
def _payload():
    cases = [Case("Adam", "baseline", None, "torch"), Case("KFAC", "curvkit", (1, 20), "kfac"),
             Case("KFAC", "curvkit", (10, 100), "kfac"), Case("ASDL KFAC", "peer", (1, 20), "asdl", peer_of="KFAC"),
             Case("ASDL KFAC", "peer", (10, 100), "asdl", peer_of="KFAC"), Case("torch Muon", "peer", None, "torch")]
    run = lambda ms, status="ok": {"status": status, "mean_ms": ms, "peak_mib": 1.0, "state_mib": 2.0,  # noqa: E731
                                   "warmup": 21, "steps": 20, "memory_method": "m"}
    pieces = dict(PIECE_MS)
    return {
        "cases": [c.to_dict() for c in cases], "batches": [8], "widths": [4, 2, 4], "device": "cpu", "threads": 1,
        "floor": {"8": [{"status": "ok", "pieces": pieces}, {"status": "ok", "pieces": {k: 3 * v for k, v in pieces.items()}}]},
        "runs": {"Adam|8": [run(10.0), run(30.0), run(20.0)], "KFAC (1,20)|8": [run(60.0)],
                 "ASDL KFAC (1,20)|8": [run(40.0)], "KFAC (10,100)|8": [run(100.0)],
                 "ASDL KFAC (10,100)|8": [run(25.0)], "torch Muon|8": [{"status": "error", "message": "boom"}]},
    }


def test_summary_ratios_on_a_hand_made_payload():
    rows = {r["label"]: r for r in cli.summarize(_payload())}
    adam, kfac, asdl, muon = rows["Adam"], rows["KFAC (1,20)"], rows["ASDL KFAC (1,20)"], rows["torch Muon"]
    assert adam["ms"] == 20.0 and adam["x_adam"] == 1.0  # median over rounds
    assert kfac["x_adam"] == 3.0
    assert kfac["peer"] == "ASDL KFAC" and kfac["x_peer"] == 1.5
    assert rows["KFAC (10,100)"]["x_peer"] == 4.0  # against the peer at the same schedule
    assert asdl["peer"] == "" and math.isnan(asdl["x_peer"])  # a peer is not compared with itself
    floor = 2 * floor_ms("kfac", (1, 20), PIECE_MS)  # median of the two floor rounds (x1, x3)
    assert kfac["floor_ms"] == pytest.approx(floor) and kfac["x_floor"] == pytest.approx(60.0 / floor)
    assert asdl["floor_ms"] == pytest.approx(floor)  # a peer has the floor of the method it implements
    assert muon["status"] == "error" and muon["message"] == "boom" and math.isnan(muon["floor_ms"])
    table = cli.format_table(list(rows.values()))
    assert table.splitlines()[0].split()[:3] == ["method", "schedule", "batch"]
    assert len(table.splitlines()) == 2 + 6
    rst = cli.format_table(list(rows.values()), rst=True)
    assert rst.splitlines()[0] == rst.splitlines()[2] == rst.splitlines()[-1]


# ----------------------------------------------------------------------------- smoke runs
def test_quick_run_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "st"
    code = cli.main(["--quick", "--in-process", "--methods", "Adam,TNT", "--schedules", "1:2", "--threads", "1",
                     "--no-peers", "--no-progress", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "TNT" in printed and "x floor" in printed
    payload = json.loads((out / "steptime.json").read_text())
    for key in ("command", "widths", "batches", "cases", "runs", "floor", "table", "environment", "own_schedule"):
        assert key in payload
    assert [c["label"] for c in payload["cases"]] == ["Adam", "TNT (1,2)"]
    (pieces,) = [r["pieces"] for r in payload["floor"]["32"]]
    assert set(pieces) == set(PIECES) and all(v > 0 for v in pieces.values())
    rows = {r["label"]: r for r in payload["table"]}
    assert set(rows) == {"Adam", "TNT (1,2)"}
    for r in rows.values():
        assert r["status"] == "ok" and r["ms"] > 0 and r["floor_ms"] > 0 and r["state_mib"] >= 0
        assert r["warmup"] == 3 and r["steps"] == 4
    assert rows["Adam"]["x_adam"] == 1.0 and rows["TNT (1,2)"]["state_mib"] > 0
    assert (out / "table.txt").read_text().splitlines()[1].split()[:2] == ["method", "schedule"]
    assert (out / "steptime.png").read_bytes()[:8] == PNG_MAGIC
    piece_rows = (out / "pieces.txt").read_text().splitlines()[2:]
    assert [row.split()[0] for row in piece_rows] == list(PIECES)
    assert all(float(row.split()[1]) >= 0 for row in piece_rows)
    # re-rendering from the JSON gives the same table
    again = tmp_path / "again"
    assert cli.main(["--from-json", str(out / "steptime.json"), "--out", str(again), "--no-plot"]) == 0
    assert (again / "table.txt").read_text() == (out / "table.txt").read_text()


def test_widths_choose_the_model_of_every_measurement(tmp_path):
    out = tmp_path / "st"
    code = cli.main(["--quick", "--in-process", "--methods", "SGD-m", "--widths", "12,6,12", "--threads", "1",
                     "--no-peers", "--no-progress", "--no-plot", "--out", str(out)])
    assert code == 0
    payload = json.loads((out / "steptime.json").read_text())
    assert payload["widths"] == [12, 6, 12]
    (row,) = payload["table"]
    assert row["status"] == "ok" and row["floor_ms"] > 0
    # the state of SGD-m on the 12-6-12 model: one momentum buffer per parameter, 12*6+6+6*12+12 floats
    assert row["state_mib"] * 2**20 == pytest.approx(4 * (12 * 6 + 6 + 6 * 12 + 12), rel=0.2)


def test_worker_in_a_fresh_process_and_its_errors():
    job = {"kind": "case", "case": Case("SGD-m", "baseline", None, "torch").to_dict(), "widths": [8, 4, 8],
           "batch": 4, "threads": 1, "device": "cpu", "warmup": 1, "steps": 2}
    result = cli._run_subprocess(job, timeout=120)
    assert result["status"] == "ok", result
    assert result["mean_ms"] > 0 and result["steps"] == 2 and result["threads"] == 1
    bad = run_job({**job, "case": Case("Nope", "peer", None, "x").to_dict()})
    assert bad["status"] == "error" and "unknown case 'Nope'" in bad["message"]


@pytest.mark.parametrize("argv, match", [
    (["--schedules", "1-20"], "--schedules expects"),
    (["--methods", "Nope"], "'Nope' not available"),
    (["--batch", "0"], "--batch expects positive"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--widths", "64,8"], "--widths must list"),
    (["--widths", "64,x,64"], "--widths must be comma-separated"),
])
def test_bad_options_exit_2(argv, match, capsys, tmp_path):
    assert cli.main(["--quick", "--no-peers", "--out", str(tmp_path), *argv]) == 2
    assert match in capsys.readouterr().err


def test_budget_skips_what_it_cannot_measure(tmp_path):
    out = tmp_path / "st"
    code = cli.main(["--quick", "--in-process", "--methods", "Adam", "--no-peers", "--no-progress", "--no-plot",
                     "--budget-minutes", "1e-9", "--out", str(out)])
    assert code == 0
    payload = json.loads((out / "steptime.json").read_text())
    assert [r["status"] for r in payload["table"]] == ["skipped"]
    assert "--budget-minutes" in payload["table"][0]["message"] and payload["floor"]["32"][0]["status"] == "skipped"
