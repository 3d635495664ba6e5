#!/bin/bash
# Exercise the whole pipeline on a CPU (or a Mac's MPS) with a small model, as upstream's
# runs/runcpu.sh does: real ClimbMix shards (needs network), a d6 model, SFT if present.
# For a fully offline few-minute run use `NANOCHAT_PRESET=cpu bash speedrun.sh` instead.
set -euo pipefail
cd "$(dirname "$0")/.."
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
mkdir -p "$NANOCHAT_BASE_DIR"
source scripts/uv_env.sh
source .venv/bin/activate
WANDB_RUN="${WANDB_RUN:-dummy}"

python -m nanochat.dataset -n 8
python -m scripts.tok_train --max-chars=2000000000
python -m scripts.tok_eval

# a 6-layer model; about half an hour on a recent laptop
python -m scripts.base_train \
    --depth=6 --head-dim=64 --window-pattern=L --max-seq-len=512 \
    --device-batch-size=32 --total-batch-size=16384 \
    --eval-every=100 --eval-tokens=524288 --core-metric-every=-1 \
    --sample-every=100 --num-iterations=5000 --run="$WANDB_RUN"
python -m scripts.base_eval --device-batch-size=1 --split-tokens=16384 --max-per-task=16

python -m scripts.chat_sft --eval-every=200 --eval-tokens=524288 --num-iterations=1500 --run="$WANDB_RUN"
echo 'Chat with it: python -m scripts.chat_cli -p "What is the capital of France?"'
