#!/usr/bin/env bash
# README command 1: set up .venv and run the main job on the shipped demo model (demo_assets/):
# erase one style ("stripes") and one object ("star") with both methods (feature ablation and
# detect-and-replace) using the shipped SAE's concept library, and write a before/after grid
# with the shipped classifier's reading of every image. A few minutes on a 2-core CPU.
# Extra arguments go to scripts/erase_demo.py (e.g. --style noise --object heart --seed 3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
OUT=out/demo
mkdir -p "$OUT"
.venv/bin/saeuron info demo_assets/sae.safetensors | head -12
.venv/bin/python scripts/erase_demo.py --out "$OUT/erase-grid.png" "$@"
