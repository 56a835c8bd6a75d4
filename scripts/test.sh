#!/usr/bin/env bash
# Run the whole test suite (core, plugins, benchmarks harness, doc examples) and build the docs
# with warnings as errors. Expects the environment from scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest -q "$@"
if [ -f docs/conf.py ]; then
  .venv/bin/python -m sphinx -W --keep-going -q -b html docs docs/_build/html
  echo "docs built in docs/_build/html"
fi
