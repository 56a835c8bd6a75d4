"""benchmarks/distributed.py's full-step timing end to end on a tiny MLP: DDP and FSDP2 on 2 gloo
ranks, JSON written, the inverse work divided between the ranks in both settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_full_step_timing_runs_under_ddp_and_fsdp2(tmp_path):
    out = tmp_path / "dist.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.distributed", "--ranks", "2", "--repeats", "1",
         "--widths", "20", "10", "--step-widths", "12", "16", "4", "--step-batch", "8", "--steps", "2",
         "--invert-every", "2", "--baseline", "off", "--full-step", "on", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "setting | method | ranks | step wall ms" in done.stdout
    data = json.loads(out.read_text())
    rows = {(r["setting"], r["ranks"]): r for r in data["full_steps"] if r["method"] == "TNT"}
    assert sorted(rows) == [("ddp", 2), ("fsdp2", 2)]
    # 12-16-4: 6 factors (sizes 16, 12, 16 | 4, 16, 4); timed steps t = 2, 3 with T2 = 2 invert
    # once, each factor on one rank
    for setting in ("ddp", "fsdp2"):
        two = rows[(setting, 2)]["inverted_rows_per_rank"]
        assert sum(two) == 6 and min(two) > 0, two
        assert all(r["step_s_max"] > 0 for r in rows.values())
    assert data["meta"]["full_step"]["method"] == "TNT"
