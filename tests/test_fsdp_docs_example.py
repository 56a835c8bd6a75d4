"""docs/examples/fsdp_tnt.py, as docs/howto/distributed.rst runs it: two CPU processes under FSDP2.

The sharded run must equal one process on the global batch to rounding (float64), and the run
restored from its DCP checkpoint must continue exactly like the uninterrupted one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "fsdp_tnt.py"


def test_fsdp_example_equals_one_process_and_resumes():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(EXAMPLE)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    out = proc.stdout
    single = re.search(r"^FSDP2 on 2 ranks vs one process on the global batch: (\S+)$", out, re.M)
    resumed = re.search(r"^resumed from the checkpoint vs uninterrupted: (\S+)$", out, re.M)
    assert single and resumed, out
    assert float(single.group(1)) < 1e-10
    assert float(resumed.group(1)) == 0.0
