#!/usr/bin/env bash
# README command 1: set up .venv and run the main job.
# Until the shipped demo model lands this runs the whole method on a tiny randomly initialised
# SD-layout pipeline: record `up_blocks.1.attentions.1` over every denoising step, train a TopK SAE
# and print its FVU, learn a concept ("cat") with the SAE, and write a before/after grid of the
# concept erased (the model is random, so the pictures are noise; the numbers are real).
# Everything goes to out/demo-tiny/.
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
printf 'a cat\na small cat on a chair\na cat in the park\n' > "$OUT/cat.txt"
printf 'a dog\na small dog on a chair\na tree in the park\n' > "$OUT/no-cat.txt"
"$BIN/saeuron" learn-concept "$OUT/sae.safetensors" --concept cat --positive "$OUT/cat.txt" \
  --negative "$OUT/no-cat.txt" --model "$OUT/pipeline" --steps 20 --seeds 0,1
"$BIN/saeuron" info "$OUT/sae.safetensors"
"$BIN/saeuron" erase --model "$OUT/pipeline" --sae "$OUT/sae.safetensors" --concept cat --strength 20 \
  --prompt "a cat" --prompt "a dog" --steps 20 --out "$OUT/erase-grid.png"
