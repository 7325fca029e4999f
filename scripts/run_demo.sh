#!/usr/bin/env bash
# README command 1: set up .venv and run the main job.
# Until the shipped demo model lands this is a short collect + train run on a tiny randomly
# initialised SD-layout pipeline: it records `up_blocks.1.attentions.1` over every denoising step,
# trains a TopK SAE on it and prints its FVU. Everything goes to out/demo-tiny/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
OUT=${1:-out/demo-tiny}
BIN=.venv/bin
mkdir -p "$OUT"
cat > "$OUT/prompts.txt" <<'PROMPTS'
a red cat sitting on a chair
a blue dog in the park
a green tree on a hill
a yellow car on the road
a house by the lake
a bird on a wire
a bowl of fruit
a portrait of an old man
PROMPTS
[ -f "$OUT/pipeline/model_index.json" ] || "$BIN/saeuron" make-tiny-pipeline "$OUT/pipeline"
"$BIN/saeuron" collect --model "$OUT/pipeline" --prompts "$OUT/prompts.txt" --out "$OUT/activations" \
  --hook-point up_blocks.1.attentions.1 --steps 20 --seeds 0-3 --guidance 7.5 --rows-per-shard 128
"$BIN/saeuron" train --store "$OUT/activations" --out "$OUT/sae.safetensors" \
  --expansion-factor 8 --k 8 --batch-size 1024 --steps 600 --lr 2e-3 --checkpoint-every 200 --log-every 100
"$BIN/saeuron" info "$OUT/sae.safetensors"
