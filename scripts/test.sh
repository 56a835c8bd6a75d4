#!/usr/bin/env bash
# Run the whole test suite (core, plugins, benchmarks harness, doc examples) and build the docs
# with warnings as errors. Expects the environment from scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest -q "$@"
if [ -f docs/conf.py ]; then
  # -E: a fresh environment every time, so warnings of unchanged pages are not hidden by a cache
  .venv/bin/python -m sphinx -W --keep-going -q -E -d docs/_build/doctrees -b html docs docs/_build/html
  echo "docs built in docs/_build/html"
  # every testcode/doctest block of the docs runs, so the examples cannot drift from the code
  .venv/bin/python -m sphinx -W --keep-going -q -d docs/_build/doctrees -b doctest docs docs/_build/doctest
  echo "doc examples passed (docs/_build/doctest/output.txt)"
fi
