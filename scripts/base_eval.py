"""
Evaluate a base model. Pick any of three modes with --eval (comma-separated):
  core    CORE metric: in-context-learning accuracy over the tasks of the eval bundle
  bpb     bits per byte on the train and val splits of the pretraining data
  sample  a few greedy completions of fixed prompts, plus some unconditioned samples
The default runs all three: --eval core,bpb,sample

Examples:

    # all evaluations of the d24 model on 8 GPUs
    torchrun --nproc_per_node=8 -m scripts.base_eval --model-tag d24 --device-batch-size=16

    # a quick, approximate pass on one GPU
    python -m scripts.base_eval --model-tag d24 --device-batch-size=16 --max-per-task=100 --split-tokens=524288

The CORE eval bundle lives in <base_dir>/eval_bundle and is downloaded there on first use.
A bundle already placed there is used as is, so an offline machine only needs a copy of it.
NANOCHAT_EVAL_BUNDLE_DIR=/path/to/eval_bundle points at a bundle elsewhere instead (then
nothing is ever downloaded).
"""
import os
import csv
import argparse

from nanochat.common import compute_init, compute_cleanup, print0, get_base_dir, autodetect_device_type, Progress
from nanochat.tokenizer import get_token_bytes
from nanochat.checkpoint_manager import load_model
from nanochat.core_eval import evaluate_core, get_eval_bundle_dir  # the CORE driver lives in the library (nanochat.train needs it)
from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
from nanochat.loss_eval import evaluate_bpb
from nanochat.engine import Engine

# -----------------------------------------------------------------------------
# Main


def main():
    parser = argparse.ArgumentParser(description="Base model evaluation")
    parser.add_argument('--eval', type=str, default='core,bpb,sample', help='Comma-separated evaluations to run: core,bpb,sample (default: all)')
    parser.add_argument('--model-tag', type=str, default=None, help='nanochat model tag to identify the checkpoint directory')
    parser.add_argument('--step', type=int, default=None, help='Model step to load (default = last)')
    parser.add_argument('--max-per-task', type=int, default=-1, help='Max examples per CORE task (-1 = all)')
    parser.add_argument('--device-batch-size', type=int, default=32, help='Per-device batch size for BPB evaluation')
    parser.add_argument('--split-tokens', type=int, default=40*524288, help='Number of tokens to evaluate per split for BPB')
    parser.add_argument('--device-type', type=str, default='', help='cuda|cpu|mps (empty = autodetect)')
    args = parser.parse_args()

    eval_modes = set(mode.strip() for mode in args.eval.split(','))
    valid_modes = {'core', 'bpb', 'sample'}
    invalid = eval_modes - valid_modes
    if invalid:
        parser.error(f"Invalid eval modes: {invalid}. Valid: {valid_modes}")

    device_type = autodetect_device_type() if args.device_type == '' else args.device_type
    ddp, ddp_rank, ddp_local_rank, ddp_world_size, device = compute_init(device_type)
    # everything that can fail on bad input happens up front, before any long evaluation
    try:
        model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=args.model_tag, step=args.step)
        token_bytes = get_token_bytes(device=device)
        eval_bundle_dir = get_eval_bundle_dir() if 'core' in eval_modes else None
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print0(f"Error: {e}")
        compute_cleanup()
        raise SystemExit(1)
    sequence_len = meta["model_config"]["sequence_len"]
    model_name = f"base_model (step {meta['step']})"
    model_slug = f"base_model_{meta['step']:06d}"

    print0(f"Evaluating model: {model_name}")
    print0(f"Eval modes: {', '.join(sorted(eval_modes))}")

    core_results = None
    bpb_results = {}
    samples = []
    unconditioned_samples = []

    # --- Sampling ---
    if 'sample' in eval_modes:
        print0("\n" + "=" * 80)
        print0("Model Samples")
        print0("=" * 80)
        if ddp_rank == 0:
            prompts = [
                "The capital of France is",
                "The chemical symbol of gold is",
                "If yesterday was Friday, then tomorrow will be",
                "The opposite of hot is",
                "The planets of the solar system are:",
                "My favorite color is",
                "If 5*x + 3 = 13, then x is",
            ]
            engine = Engine(model, tokenizer)
            # a progress bar with ETA (ours): on CPU the samples take a while
            sample_progress = Progress(len(prompts) + 1, "samples", unit="prompts")
            print0("\nConditioned samples:")
            for prompt in sample_progress.wrap(prompts):
                tokens = tokenizer(prompt, prepend="<|bos|>")
                sample, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=16, temperature=0)
                sample_str = tokenizer.decode(sample[0])
                print0("-" * 80)
                print0(sample_str)
                samples.append(sample_str)

            print0("\nUnconditioned samples:")
            tokens = tokenizer("", prepend="<|bos|>")
            uncond, _ = engine.generate_batch(tokens, num_samples=8, max_tokens=128, temperature=1.0)
            sample_progress.update()
            sample_progress.close()
            for sample in uncond:
                sample_str = tokenizer.decode(sample)
                print0("-" * 80)
                print0(sample_str)
                unconditioned_samples.append(sample_str)

    # --- BPB ---
    if 'bpb' in eval_modes:
        print0("\n" + "=" * 80)
        print0("BPB Evaluation")
        print0("=" * 80)
        tokens_per_step = args.device_batch_size * sequence_len * ddp_world_size
        if args.split_tokens % tokens_per_step != 0:
            # round down to a whole number of steps
            args.split_tokens = (args.split_tokens // tokens_per_step) * tokens_per_step
            print0(f"Adjusted split_tokens to {args.split_tokens} (must be divisible by {tokens_per_step})")
        steps = args.split_tokens // tokens_per_step
        for split_name in ["train", "val"]:
            loader = tokenizing_distributed_data_loader_bos_bestfit(tokenizer, args.device_batch_size, sequence_len, split_name, device=device)
            bpb_progress = Progress(steps, f"bpb {split_name}", unit="batches")  # ours
            bpb = evaluate_bpb(model, bpb_progress.wrap(loader), steps, token_bytes)
            bpb_progress.close()
            bpb_results[split_name] = bpb
            print0(f"{split_name} bpb: {bpb:.6f}")

    # --- CORE ---
    if 'core' in eval_modes:
        print0("\n" + "=" * 80)
        print0("CORE Evaluation")
        print0("=" * 80)
        core_results = evaluate_core(model, tokenizer, device, max_per_task=args.max_per_task, eval_bundle_dir=eval_bundle_dir)
        if ddp_rank == 0:
            output_csv_path = os.path.join(get_base_dir(), "base_eval", f"{model_slug}.csv")
            os.makedirs(os.path.dirname(output_csv_path), exist_ok=True)
            with open(output_csv_path, 'w', encoding='utf-8', newline='') as f:
                f.write(f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}\n")
                for label, acc in core_results["results"].items():
                    centered = core_results["centered_results"][label]
                    f.write(f"{label:<35}, {acc:<10.6f}, {centered:<10.6f}\n")
                f.write(f"{'CORE':<35}, {'':<10}, {core_results['core_metric']:<10.6f}\n")
            print0(f"\nResults written to: {output_csv_path}")
            print0(f"CORE metric: {core_results['core_metric']:.4f}")

    compute_cleanup()


if __name__ == "__main__":
    main()
