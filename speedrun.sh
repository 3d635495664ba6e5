#!/bin/bash
# The main job.
#   With CUDA GPUs: upstream nanochat's speedrun (shards -> tokenizer -> base model over all
#     GPUs with torchrun -> evals). Set WANDB_RUN=name to log to wandb.
#   Without a GPU: a small offline run end to end on CPU (CPython's docs and sources, Shakespeare's plays as the
#     corpus -> tokenizer -> base model -> long-context testbed -> MegaContext JT1, JT2, end to
#     end -> eval reports -> memory chat -> SFT -> chat); 35-79 minutes measured on 2 cores.
# Artifacts go to $NANOCHAT_BASE_DIR (default ~/.cache/nanochat; the CPU preset uses
# ~/.cache/nanochat-cpu so it never mixes with a real run).
#   bash speedrun.sh            # auto-detect
#   NANOCHAT_PRESET=cpu bash speedrun.sh   # force the CPU preset
set -euo pipefail
cd "$(dirname "$0")"

if [ -z "${NANOCHAT_PRESET:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        NANOCHAT_PRESET=gpu
    else
        NANOCHAT_PRESET=cpu
    fi
fi
WANDB_RUN="${WANDB_RUN:-dummy}"  # 'dummy' skips wandb
source scripts/uv_env.sh
source .venv/bin/activate
START_TIME=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - START_TIME ))s] $*"; }

if [ "$NANOCHAT_PRESET" = "gpu" ]; then
    # -------------------------------------------------------------------------
    # GPU: upstream's speedrun (see runs/speedrun.sh for the annotated original)
    export OMP_NUM_THREADS=1
    export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
    mkdir -p "$NANOCHAT_BASE_DIR"
    NPROC=$(nvidia-smi -L | wc -l)
    step "tokenizer: download 8 shards (~2B chars), keep downloading 170 in the background"
    python -m nanochat.dataset -n 8
    python -m nanochat.dataset -n 170 &
    DATASET_DOWNLOAD_PID=$!
    python -m scripts.tok_train
    python -m scripts.tok_eval
    step "base model: d24 on $NPROC GPU(s)"
    wait $DATASET_DOWNLOAD_PID
    torchrun --standalone --nproc_per_node="$NPROC" -m scripts.base_train -- --depth=24 --target-param-data-ratio=8 --device-batch-size=16 --fp8 --run="$WANDB_RUN"
    torchrun --standalone --nproc_per_node="$NPROC" -m scripts.base_eval -- --device-batch-size=16
    step "SFT and chat eval"
    torchrun --standalone --nproc_per_node="$NPROC" -m scripts.chat_sft -- --run="$WANDB_RUN"
    torchrun --standalone --nproc_per_node="$NPROC" -m scripts.chat_eval -- -i sft
    python -m scripts.report_card --wall-time-s=$(( $(date +%s) - START_TIME ))
    step "done in $(( $(date +%s) - START_TIME ))s. Chat: python -m scripts.chat_cli -p 'Why is the sky blue?'"
    exit 0
fi

# -----------------------------------------------------------------------------
# CPU preset: small and offline. Nothing here touches the network.
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat-cpu}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
mkdir -p "$NANOCHAT_BASE_DIR"
LOG_DIR="$NANOCHAT_BASE_DIR/speedrun_logs"
mkdir -p "$LOG_DIR"

step "data: shards from CPython's bundled docs -> $NANOCHAT_BASE_DIR/base_data_climbmix"
python -m scripts.offline_data -n 4

step "tokenizer: train a 4096-token BPE"
python -m scripts.tok_train --vocab-size=4096 --max-chars=20000000 2>&1 | tee "$LOG_DIR/tok_train.log"
python -m scripts.tok_eval 2>&1 | tee "$LOG_DIR/tok_eval.log"

step "base model: tiny config (configs/cpu_tiny.yaml)"
python -m nanochat.train --config configs/cpu_tiny.yaml 2>&1 | tee "$LOG_DIR/base_train.log"

step "evaluation: bits per byte on train/val, and samples"
python -m scripts.base_eval --eval=bpb,sample --model-tag=cpu_tiny --device-batch-size=4 --split-tokens=16384 2>&1 | tee "$LOG_DIR/base_eval.log"

# MegaContext's testbed: a base model that needs distant context, its GistNet and LensNet, and the harness
step "long-context testbed: a base model on long documents + synthetic long-range tasks (configs/longctx_cpu.yaml)"
python -m nanochat.train --config configs/longctx_cpu.yaml 2>&1 | tee "$LOG_DIR/longctx_train.log"

step "MegaContext JT1: GistNet on the frozen testbed model (configs/gistnet_longctx_cpu.yaml)"
python -m nanochat.train --config configs/gistnet_longctx_cpu.yaml 2>&1 | tee "$LOG_DIR/gistnet_train.log"

step "MegaContext JT2: LensNet on the frozen testbed model and GistNet (configs/lensnet_cpu.yaml)"
python -m nanochat.train --config configs/lensnet_cpu.yaml 2>&1 | tee "$LOG_DIR/lensnet_train.log"

step "long-context evaluation: every method at W=128 (configs/eval_cpu.yaml) -> $NANOCHAT_BASE_DIR/eval/longctx"
python -m megacontext.eval --config configs/eval_cpu.yaml --out "$NANOCHAT_BASE_DIR/eval/longctx" 2>&1 | tee "$LOG_DIR/longctx_eval.log"

step "MegaContext end to end: GistNet, LensNet and a LoRA on the testbed model in EM cycles (configs/megacontext_cpu.yaml)"
python -m nanochat.train --config configs/megacontext_cpu.yaml 2>&1 | tee "$LOG_DIR/megacontext_train.log"

step "long-context evaluation of the end-to-end run (its GistNet, LensNet and LoRA) -> $NANOCHAT_BASE_DIR/eval/longctx_e2e"
E2E=longctx_cpu_megacontext
python -m megacontext.eval --config configs/eval_cpu.yaml --model_tag=$E2E --gistnet=$E2E --lensnet=$E2E --lora=$E2E \
    --out "$NANOCHAT_BASE_DIR/eval/longctx_e2e" 2>&1 | tee "$LOG_DIR/longctx_e2e_eval.log"

step "MegaContext chat: a pass key about 3,000 tokens back in an ingested document, then asked (configs/megacontext_demo.yaml)"
DEMO_DOC="$NANOCHAT_BASE_DIR/megacontext/demo_passkey.txt"
DEMO_MEMORY="$NANOCHAT_BASE_DIR/megacontext/chat/demo"
python -m megacontext.synthetic --task passkey --history 4096 --depth 0.2 --out "$DEMO_DOC" 2>&1 | tee "$LOG_DIR/chat_demo.log"
rm -rf "$DEMO_MEMORY"  # a fresh memory each run: the document goes in, then the question
printf 'What is the pass key? The pass key is\n/memory\nquit\n' | python -m nanochat.chat --config configs/megacontext_demo.yaml \
    --ingest "$DEMO_DOC" --memory "$DEMO_MEMORY" 2>&1 | tee -a "$LOG_DIR/chat_demo.log"

# SFT and chat eval read the task rows shipped in tasks/fixtures (no hub download)
export NANOCHAT_TASK_FIXTURES="$PWD/tasks/fixtures"
step "SFT on the offline task conversations"
NANOCHAT_COMPILE=0 python -m scripts.chat_sft --model-tag=cpu_tiny --device-type=cpu \
    --device-batch-size=4 --total-batch-size=1024 --mmlu-epochs=20 --gsm8k-epochs=20 \
    --eval-every=-1 --eval-tokens=8192 --chatcore-every=-1 2>&1 | tee "$LOG_DIR/chat_sft.log"

step "chat eval (ChatCORE on the fixture tasks)"
python -m scripts.chat_eval -i sft -g cpu_tiny --device-type=cpu -m 64 2>&1 | tee "$LOG_DIR/chat_eval.log"

step "a chat sample (the SFT model, configs/chat_cpu.yaml)"
if ! python -m nanochat.chat --config configs/chat_cpu.yaml --prompt "What is the capital of France?" \
        2>"$LOG_DIR/chat_sample.err" | tee "$LOG_DIR/chat_sample.log"; then
    cat "$LOG_DIR/chat_sample.err" >&2
    exit 1
fi

step "report card"
python -m scripts.report_card --model-tag=cpu_tiny --wall-time-s=$(( $(date +%s) - START_TIME ))

# >>> next steps. Each command printed here runs as printed when pasted into a new shell
# (no venv activated, any directory, NANOCHAT_BASE_DIR unset): it carries the repo, the base
# dir and the interpreter. The last line is `Chat: <command>`; --prompt "..." appended to it
# gives one reply. tests/test_handoffs.py runs them.
NEXT_RUN="cd $(printf %q "$PWD") && NANOCHAT_BASE_DIR=$(printf %q "$NANOCHAT_BASE_DIR") $(printf %q "$(command -v python)") -m"
step "done in $(( $(date +%s) - START_TIME ))s. Artifacts: $NANOCHAT_BASE_DIR"
if [ -f "$NANOCHAT_BASE_DIR/eval/longctx/report.json" ]; then
    echo "Long-context headline figures (frozen base, JT1 GistNet + JT2 LensNet):"
    python -m megacontext.eval --headline "$NANOCHAT_BASE_DIR/eval/longctx/report.json"
fi
if [ -f "$NANOCHAT_BASE_DIR/eval/longctx_e2e/report.json" ]; then
    echo "Long-context headline figures (end-to-end run: GistNet, LensNet and the base's LoRA trained together):"
    python -m megacontext.eval --headline "$NANOCHAT_BASE_DIR/eval/longctx_e2e/report.json"
fi
echo "Report: cat $(printf %q "$NANOCHAT_BASE_DIR/report.md")"
echo "Long-context report: cat $(printf %q "$NANOCHAT_BASE_DIR/eval/longctx/report.md")"
echo "Web:    $NEXT_RUN scripts.chat_web -i sft -g cpu_tiny --device-type=cpu   # then open http://localhost:8000/"
echo "Memory: $NEXT_RUN nanochat.chat --config configs/megacontext_demo.yaml --memory $(printf %q "$NANOCHAT_BASE_DIR/megacontext/chat/demo")   # the demo's memory; /memory, /forget"
echo "(append --prompt \"...\" to the Chat command below for a single reply)"
echo "Chat: $NEXT_RUN nanochat.chat --config configs/chat_cpu.yaml"
# <<< next steps
