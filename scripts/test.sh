#!/usr/bin/env bash
# Set up .venv (see setup.sh), then lint and run the tests. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Two pytest workers (pytest-xdist), each test module whole in one of them, so that a module's fixtures (a trained
# run, an evaluation) are built once; `-n 0` runs everything in this process.
.venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
