#!/bin/bash
# Upstream's reference pipeline on one 8xH100 node: GPT-2 grade base model + SFT, ~2 hours.
# Kept under runs/ where upstream users look for it; the top-level ./speedrun.sh is the entry
# point and runs the same sequence when it finds GPUs (and a tiny offline preset when not).
#   bash runs/speedrun.sh
#   WANDB_RUN=speedrun screen -L -Logfile runs/speedrun.log -S speedrun bash runs/speedrun.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NANOCHAT_PRESET=gpu exec bash speedrun.sh
