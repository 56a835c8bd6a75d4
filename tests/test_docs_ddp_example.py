"""docs/examples/ddp_tnt.py, as docs/howto/distributed.rst runs it: two CPU processes under DDP.

Rank-local sampled statistics (``distributed=False``) must make the replicas drift apart; the
default (the sampled gradient averaged over the ranks) and minibatch evidence (read after DDP's
gradient average) must keep them bit-identical."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "ddp_tnt.py"


def test_ddp_example_replicas():
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(EXAMPLE)],
        check=True, capture_output=True, text=True, timeout=300,
    ).stdout
    spread = {mode: float(v) for mode, v in re.findall(r"^statistics (\w+)\s+.*: (\S+)$", out, re.M)}
    assert set(spread) == {"local", "default", "minibatch"}, out
    assert spread["local"] > 1e-3
    assert spread["default"] == 0.0
    assert spread["minibatch"] == 0.0
