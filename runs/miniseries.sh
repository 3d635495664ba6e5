#!/bin/bash
# Train a series of compute-optimal base models, one per depth, on one 8-GPU node, and
# collect their figures in a CSV. Depth is the single knob: width, horizon, batch size, LR
# and weight decay all follow from it (see nanochat/train.py).
#   bash runs/miniseries.sh [SERIES_NAME]        (SKIP_SETUP=1 to reuse data and tokenizer)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
mkdir -p "$NANOCHAT_BASE_DIR"
if [ -z "${SKIP_SETUP:-}" ]; then
    source scripts/uv_env.sh
    source .venv/bin/activate
    python -m nanochat.dataset -n 1000
    python -m scripts.tok_train --max-chars=2000000000 --vocab-size=32768
else
    source .venv/bin/activate
fi

SERIES_NAME="${1:-${SERIES_NAME:-$(date +%b%d | tr '[:upper:]' '[:lower:]')}}"
DEPTHS=(${DEPTHS:-12 14 16 18 20 22 24 26})
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
WANDB_RUN="${WANDB_RUN:-${SERIES_NAME}_miniseries}"
RESULTS_DIR="$NANOCHAT_BASE_DIR/${SERIES_NAME}_miniseries_results"
RESULTS_FILE="$RESULTS_DIR/results.csv"
FIELDS="params_total params_transformer_matrices num_iterations tokens_trained val_bpb core_score"
mkdir -p "$RESULTS_DIR"
[ -f "$RESULTS_FILE" ] || echo "depth,${FIELDS// /,},train_time_sec" > "$RESULTS_FILE"

for d in "${DEPTHS[@]}"; do
    TAG="${SERIES_NAME}_miniseries_d${d}"
    LOG_FILE="$RESULTS_DIR/${TAG}_train.log"
    # smaller micro-batches for the deeper models so they fit in 80GB
    if [ "$d" -ge 28 ]; then DBS=8; elif [ "$d" -ge 20 ]; then DBS=16; else DBS=32; fi
    echo "[$(date '+%F %T')] training d=$d ($TAG)"
    T0=$(date +%s)
    torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" -m scripts.base_train -- \
        --depth="$d" --run="${WANDB_RUN}_d${d}" --model-tag="$TAG" \
        --core-metric-every=999999 --core-metric-max-per-task=-1 \
        --sample-every=-1 --save-every=-1 --device-batch-size="$DBS" 2>&1 | tee "$LOG_FILE"
    ROW=$(python runs/parse_train_log.py "$LOG_FILE" $FIELDS)
    echo "$d,$ROW,$(( $(date +%s) - T0 ))" >> "$RESULTS_FILE"
    echo "[$(date '+%F %T')] d=$d: $ROW"
done
echo "results: $RESULTS_FILE"
