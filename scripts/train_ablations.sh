#!/usr/bin/env bash
# Train the small model on the synthetic v1.0-mini mini_train split four ways and score each on mini_val
# against the constant-velocity baseline: both sensors with the JEPA loss, without it, LiDAR only, cameras only.
# Usage: bash scripts/train_ablations.sh WINDOWS OUT [STEPS] [MINUTES]   (WINDOWS: a `bevjepa preprocess` output;
# each variant trains STEPS steps or stops at MINUTES, whichever comes first)
set -euo pipefail
WINDOWS="$1"; OUT="$2"; STEPS="${3:-600}"; MINUTES="${4:-20}"
BEVJEPA="$(dirname "$0")/../.venv/bin/bevjepa"
run() {
    local name="$1"; shift
    if [ ! -f "$OUT/$name/state.json" ]; then
        local start=$SECONDS
        "$BEVJEPA" train --data "$WINDOWS" --out "$OUT/$name" --steps "$STEPS" --minutes "$MINUTES" "$@"
        echo "$name: trained in $((SECONDS - start)) s"
    fi
    "$BEVJEPA" eval --data "$WINDOWS" --split mini_val --checkpoint "$OUT/$name" --out "$OUT/$name/eval" \
        --figures 0 --animation-windows 0
}
run full
run no-jepa --no-jepa
run lidar-only --sensors lidar
run camera-only --sensors camera
