"""benchmarks/distributed.py end to end on small factors: 1 and 2 gloo ranks, JSON written,
inverses checked (bit-identical to rank 0's and inverses of their factors) by the script itself,
and the LPT split of the work visible in the numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_runs_and_splits_the_work(tmp_path):
    out = tmp_path / "dist.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.distributed", "--ranks", "1", "2", "--repeats", "1",
         "--widths", "40", "30", "20", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ranks | factors/rank" in done.stdout
    data = json.loads(out.read_text())
    assert [r["ranks"] for r in data["results"]] == [1, 2]
    assert data["meta"]["factor_sizes"] == [["layer0.weight[0]", 30], ["layer0.weight[1]", 40], ["layer0.bias[0]", 30],
                                            ["layer1.weight[0]", 20], ["layer1.weight[1]", 30], ["layer1.bias[0]", 20]]
    one, two = data["results"]
    assert one["factors_per_rank"] == [6] and sum(two["factors_per_rank"]) == 6
    # LPT on d^3 over 2 ranks: 64000 -> r0; 27000 x 3 -> r1 (27000, 54000, 81000); 8000 x 2 -> r0
    # (72000, 80000): the busiest rank has 81000 of 161000
    assert abs(two["cost_share_max"] - 81000 / 161000) < 1e-9
    assert sorted(two["factors_per_rank"]) == [3, 3]
    assert two["identical_to_rank0"] and two["max_residual"] < 1e-3
