#!/bin/bash
# Scaling-law sweep: for each FLOPs budget, train several depths to exactly that budget
# (--target-flops) and record params, tokens, val bpb and CORE. Finished (budget, depth)
# pairs already in the CSV are skipped, so the sweep can be restarted.
#   bash runs/scaling_laws.sh          (after data + tokenizer exist, e.g. from miniseries.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
LABEL="${LABEL:-jan26}"
FLOPS_BUDGETS=(${FLOPS_BUDGETS:-1e18 2.15e18 4.64e18 1e19})
DEPTHS=(${DEPTHS:-10 12 14 16 18 20})
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
WANDB_RUN="${WANDB_RUN:-scaling_${LABEL}}"
EVAL_TOKENS=$((100 * 524288))  # a larger final eval than the default, for cleaner fits
export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
source .venv/bin/activate

RESULTS_DIR="$NANOCHAT_BASE_DIR/scaling_laws_results_${LABEL}"
RESULTS_FILE="$RESULTS_DIR/results.csv"
FIELDS="params_wte params_value_embeds params_lm_head params_transformer_matrices params_scalars params_total num_iterations tokens_trained val_bpb core_score"
mkdir -p "$RESULTS_DIR"
[ -f "$RESULTS_FILE" ] || echo "flops_budget,depth,${FIELDS// /,},train_time_sec" > "$RESULTS_FILE"

for flops in "${FLOPS_BUDGETS[@]}"; do
    for d in "${DEPTHS[@]}"; do
        if grep -q "^${flops},${d}," "$RESULTS_FILE"; then
            echo "skipping d=$d at $flops FLOPs (already in results)"
            continue
        fi
        TAG="scaling_${flops}_d${d}"
        LOG_FILE="$RESULTS_DIR/${TAG}_train.log"
        if [ "$d" -ge 28 ]; then DBS=8; elif [ "$d" -ge 20 ]; then DBS=16; else DBS=32; fi
        echo "[$(date '+%F %T')] d=$d at $flops FLOPs"
        T0=$(date +%s)
        torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" -m scripts.base_train -- \
            --depth="$d" --target-flops="$flops" --target-param-data-ratio=-1 \
            --run="${WANDB_RUN}_${TAG}" --model-tag="$TAG" --eval-tokens="$EVAL_TOKENS" \
            --core-metric-every=999999 --core-metric-max-per-task=-1 \
            --sample-every=-1 --save-every=-1 --device-batch-size="$DBS" 2>&1 | tee "$LOG_FILE"
        echo "$flops,$d,$(python runs/parse_train_log.py "$LOG_FILE" $FIELDS),$(( $(date +%s) - T0 ))" >> "$RESULTS_FILE"
    done
done
echo "results: $RESULTS_FILE"
