#!/usr/bin/env bash
# Time the `base` preset on a CUDA GPU: a training step and inference (end to end and by stage), then `small`
# beside it. Writes a small synthetic dataset and its windows first, so it needs nothing but this checkout.
# Usage: bash scripts/bench_gpu.sh [OUT_DIR]   (the reports go to OUT_DIR, default bench-gpu/)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-gpu}"
mkdir -p "$out"

if [ ! -x .venv/bin/bevjepa ]; then
    # A CUDA machine takes torch's default (CUDA) wheel; scripts/setup.sh pins the CPU build for the 2-core machines.
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q torch
    .venv/bin/python -m pip install -q -e .
fi
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" \
    | tee "$out/gpu.txt"

data="$out/data"
[ -f "$data/nuscenes/v1.0-mini/scene.json" ] || .venv/bin/bevjepa synth --out "$data/nuscenes" --scenes 2 --duration 8 --workers 2
for preset in base small; do
    # Each preset's windows hold targets on its own grid (base: ±50 m, small: ±32 m).
    [ -f "$data/windows-$preset/manifest.json" ] \
        || .venv/bin/bevjepa preprocess --dataroot "$data/nuscenes" --out "$data/windows-$preset" --config "$preset"
    .venv/bin/bevjepa bench model --data "$data/windows-$preset" --config "$preset" --device cuda \
        | tee "$out/model-$preset.txt"
done
