#!/usr/bin/env bash
# Set up .venv (see setup.sh), write a small synthetic nuScenes dataset and show what the devkit sees in it.
# A second run reuses the dataset already written.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT="${OUT:-out/synth-mini}"
if [ -f "$OUT/v1.0-mini/sample.json" ]; then
    echo "reusing $OUT (remove it to write it again)"
    .venv/bin/bevjepa inspect --dataroot "$OUT" --version v1.0-mini
else
    .venv/bin/bevjepa synth --out "$OUT" --scenes 4 --duration 10 --workers 2 --check
fi
