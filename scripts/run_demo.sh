#!/usr/bin/env bash
# README command 1: set up the venv (scripts/setup_env.sh core: no ComfyUI, no browser) and run the main job on
# the shipped demo model (demo_assets/): erase one style ("stripes") and one object ("star") with both methods
# (feature ablation and detect-and-replace), the style with the shipped style SAE and the object with the object
# SAE (each on the block where its kind enters the UNet), and write a before/after grid with the shipped
# classifier's reading of every image. A few minutes on a 2-core CPU.
# Extra arguments go to the demo script, python -m scripts.erase_demo (e.g. --style noise --object heart --seed 3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh core
VENV=${SAEURON_VENV:-.venv}
OUT=out/demo
mkdir -p "$OUT"
for sae in demo_assets/sae-objects.safetensors demo_assets/sae-styles.safetensors; do
  "$VENV/bin/saeuron" info "$sae" | sed -n "1p;7p"
done
"$VENV/bin/python" -m scripts.erase_demo --out "$OUT/erase-grid.png" "$@"
