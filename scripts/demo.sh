#!/usr/bin/env bash
# Set up .venv (see setup.sh), then run the whole system with `bevjepa demo`: a synthetic nuScenes v1.0-mini,
# Ray preprocessing, training the small model, open-loop and closed-loop evaluation, and out/demo/report.md.
# A second run reuses every finished stage. Extra arguments go to `bevjepa demo` (e.g. --minutes 20).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/bevjepa demo --out "${OUT:-out/demo}" "$@"
