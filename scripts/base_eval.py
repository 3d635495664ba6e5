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
import time
import json
import yaml
import shutil
import random
import zipfile
import tempfile
import argparse

from nanochat.common import compute_init, compute_cleanup, print0, get_base_dir, autodetect_device_type, download_file_with_lock, Progress
from nanochat.tokenizer import get_token_bytes
from nanochat.checkpoint_manager import load_model
from nanochat.core_eval import evaluate_task
from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
from nanochat.loss_eval import evaluate_bpb
from nanochat.engine import Engine

# -----------------------------------------------------------------------------
# Locating the CORE eval bundle

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
EVAL_BUNDLE_ENV = "NANOCHAT_EVAL_BUNDLE_DIR"
# what a bundle directory must contain (the layout of the upstream eval_bundle.zip)
EVAL_BUNDLE_FILES = ("core.yaml", "eval_meta_data.csv", "eval_data")


def place_eval_bundle(file_path):
    """Unpack a downloaded eval_bundle.zip into <base_dir>/eval_bundle."""
    eval_bundle_dir = os.path.join(get_base_dir(), "eval_bundle")
    # unpack somewhere private first so a half-extracted bundle never appears under its real name
    with tempfile.TemporaryDirectory() as tmpdir:
        with zipfile.ZipFile(file_path, 'r') as zf:
            zf.extractall(tmpdir)
        extracted = os.path.join(tmpdir, "eval_bundle")
        if not os.path.isdir(extracted):
            raise RuntimeError(f"{file_path} has no top-level eval_bundle/ folder; delete it so it is downloaded again")
        shutil.move(extracted, eval_bundle_dir)
    print0(f"Placed eval_bundle directory at {eval_bundle_dir}")


def get_eval_bundle_dir(eval_bundle_dir=None):
    """
    The directory of the CORE eval bundle: eval_bundle_dir if given, else $NANOCHAT_EVAL_BUNDLE_DIR,
    else <base_dir>/eval_bundle, which is downloaded if it is not there yet. An explicit or
    environment override is never downloaded into; it must already hold a bundle.
    """
    override = eval_bundle_dir or os.environ.get(EVAL_BUNDLE_ENV)
    if override:
        bundle_dir, fix = override, f"point {EVAL_BUNDLE_ENV} (or eval_bundle_dir) at an unpacked eval_bundle"
    else:
        bundle_dir = os.path.join(get_base_dir(), "eval_bundle")
        fix = f"delete {bundle_dir} so it is downloaded again, or unpack {EVAL_BUNDLE_URL} there"
        if not os.path.exists(bundle_dir):
            zip_path = download_file_with_lock(EVAL_BUNDLE_URL, "eval_bundle.zip", postprocess_fn=place_eval_bundle)
            # the zip can be present from an earlier run whose unpacking was interrupted
            if not os.path.exists(bundle_dir):
                place_eval_bundle(zip_path)
    if not os.path.isdir(bundle_dir):
        raise FileNotFoundError(f"eval bundle directory {bundle_dir} does not exist; {fix}")
    for name in EVAL_BUNDLE_FILES:
        if not os.path.exists(os.path.join(bundle_dir, name)):
            raise FileNotFoundError(f"eval bundle {bundle_dir} has no {name}; {fix}")
    return bundle_dir


def _load_task_data(path):
    """One JSON object per line."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"CORE task data {path} not found; check dataset_uri in core.yaml")
    data = []
    with open(path, 'r', encoding='utf-8') as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line.strip()))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno} is not valid JSON ({e}); fix or re-download the eval bundle") from e
    return data

# -----------------------------------------------------------------------------
# CORE evaluation


def evaluate_core(model, tokenizer, device, max_per_task=-1, eval_bundle_dir=None):
    """
    Evaluate a base model on the CORE tasks.
    Returns {"results": {label: accuracy}, "centered_results": {label: centered accuracy},
    "core_metric": mean centered accuracy}. Centering maps the task's random-guess accuracy
    to 0 and perfect accuracy to 1. max_per_task > 0 evaluates a fixed random subset of
    each task (the same subset on every call).
    """
    bundle_dir = get_eval_bundle_dir(eval_bundle_dir)
    with open(os.path.join(bundle_dir, "core.yaml"), 'r', encoding='utf-8') as f:
        tasks = yaml.safe_load(f)['icl_tasks']
    # random-guess accuracy of each task, in percent
    random_baselines = {}
    with open(os.path.join(bundle_dir, "eval_meta_data.csv"), 'r', encoding='utf-8') as f:
        for row in csv.DictReader(f):
            random_baselines[row['Eval Task']] = float(row['Random baseline'])

    results = {}
    centered_results = {}
    for task in tasks:
        t0 = time.time()
        label = task['label']
        task_meta = {
            'task_type': task['icl_task_type'],
            'dataset_uri': task['dataset_uri'],
            'num_fewshot': task['num_fewshot'][0],
            'continuation_delimiter': task.get('continuation_delimiter', ' '),
        }
        if label not in random_baselines:
            raise ValueError(f"task {label!r} from core.yaml has no row in {bundle_dir}/eval_meta_data.csv; "
                             f"add its 'Random baseline' there")
        print0(f"Evaluating: {label} ({task_meta['num_fewshot']}-shot, type: {task_meta['task_type']})... ", end='')
        data = _load_task_data(os.path.join(bundle_dir, "eval_data", task_meta['dataset_uri']))
        # a fixed shuffle makes max_per_task pick the same representative subset every time
        random.Random(1337).shuffle(data)
        if max_per_task > 0:
            data = data[:max_per_task]

        accuracy = evaluate_task(model, tokenizer, data, device, task_meta)
        baseline = 0.01 * random_baselines[label]
        centered = (accuracy - baseline) / (1.0 - baseline)
        results[label] = accuracy
        centered_results[label] = centered
        print0(f"accuracy: {accuracy:.4f} | centered: {centered:.4f} | time: {time.time() - t0:.2f}s")

    core_metric = sum(centered_results.values()) / len(centered_results)
    return {
        "results": results,
        "centered_results": centered_results,
        "core_metric": core_metric,
    }

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
