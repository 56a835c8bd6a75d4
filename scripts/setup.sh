#!/usr/bin/env bash
# Set up a virtual environment in .venv with curvkit, every plugin in plugins/, and the extras.
# torch is pinned here (torch==2.13.0 is the local CPU wheel); an unpinned torch would pull
# several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==2.13.0"
args=(-e ".[dev,docs,bench]")
for plugin in plugins/*/; do
  [ -f "$plugin/pyproject.toml" ] && args+=(-e "$plugin")
done
.venv/bin/python -m pip install -q "${args[@]}"
# trainer integrations (curvkit.integrations): lightning, transformers, accelerate; torch stays as pinned
.venv/bin/python -m pip install -q -e ".[integrations]"
echo "curvkit environment ready in .venv"
