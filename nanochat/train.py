"""
Base-model pre-training as a library: the loop of upstream's scripts/base_train.py, callable
as `train(args)`, with the variant hooks of nanochat/hooks.py at the lines marked as hooks (grep for them, see UPSTREAM.md).

Two ways in, same loop:
    python -m scripts.base_train --depth=12 ...                  (upstream's dashed flags)
    python -m nanochat.train --config configs/cpu_tiny.yaml --depth=4 ...   (YAML + overrides)
or distributed:
    torchrun --nproc_per_node=8 -m nanochat.train --config configs/d20_8xh100.yaml

With the default variant (`vanilla`) this is upstream's run: same flags in vars(args), same
schedules, same log line, same checkpoint files. A YAML config may select another variant
(`variant: NAME`) and give it a section of its own; those settings never enter
vars(args), the wandb config or the checkpoint's user_config.

Dev knob (not a flag, so vars(args) stays upstream's): NANOCHAT_COMPILE=0 skips
torch.compile of the model, which on a CPU saves the inductor compile time in tests.
"""

import os
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
import gc
import sys
import json
import math
import time
import argparse
from dataclasses import asdict
from contextlib import contextmanager

import torch
import torch.distributed as dist

from nanochat.gpt import GPT, GPTConfig, Linear
from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit, tokenizing_distributed_data_loader_with_state_bos_bestfit, pack_doc_buffer
from nanochat.common import compute_init, compute_cleanup, print0, DummyWandb, print_banner, get_base_dir, autodetect_device_type, get_peak_flops, COMPUTE_DTYPE, COMPUTE_DTYPE_REASON, is_ddp_initialized
from nanochat.tokenizer import get_tokenizer, get_token_bytes
from nanochat.checkpoint_manager import save_checkpoint, load_checkpoint, load_checkpoint_file, step_status
from nanochat.loss_eval import evaluate_bpb
from nanochat.engine import Engine
from nanochat import hooks

# -----------------------------------------------------------------------------
# Flags: exactly upstream's base_train flags (names, defaults, help)

def build_parser():
    parser = argparse.ArgumentParser(description="Pretrain base model")
    # Logging
    parser.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb logging)")
    # Runtime
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    # FP8 training
    parser.add_argument("--fp8", action="store_true", help="enable FP8 training (requires H100+ GPU)")
    parser.add_argument("--fp8-recipe", type=str, default="tensorwise", choices=["rowwise", "tensorwise"], help="FP8 scaling recipe: tensorwise (faster, recommended) or rowwise (more accurate but slower)")
    # Model architecture
    parser.add_argument("--depth", type=int, default=20, help="depth of the Transformer model")
    parser.add_argument("--aspect-ratio", type=int, default=64, help="model_dim = depth * aspect_ratio")
    parser.add_argument("--head-dim", type=int, default=128, help="target head dimension for attention")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="max context length")
    parser.add_argument("--window-pattern", type=str, default="SSSL", help="sliding window pattern tiled across layers: L=full, S=half context (e.g. 'SSL')")
    # Training horizon (only one used, in order of precedence)
    parser.add_argument("--num-iterations", type=int, default=-1, help="explicit number of optimization steps (-1 = disable)")
    parser.add_argument("--target-flops", type=float, default=-1.0, help="calculate num_iterations to reach target_flops (-1 = disable)")
    parser.add_argument("--target-param-data-ratio", type=float, default=12, help="calculate num_iterations to maintain data:param ratio (Chinchilla=20, -1 = disable)")
    # Optimization
    parser.add_argument("--device-batch-size", type=int, default=32, help="per-device batch size. good number to reduce to 16,8,4,... if you OOM on VRAM.")
    parser.add_argument("--total-batch-size", type=int, default=-1, help="total batch size in tokens. decent numbers are e.g. 524288. (-1 = auto-compute optimal)")
    parser.add_argument("--embedding-lr", type=float, default=0.3, help="learning rate for embedding parameters (Adam)")
    parser.add_argument("--unembedding-lr", type=float, default=0.008, help="learning rate for unembedding parameters (Adam)")
    parser.add_argument("--weight-decay", type=float, default=0.28, help="cautious weight decay for the Muon optimizer (for weights)")
    parser.add_argument("--matrix-lr", type=float, default=0.02, help="learning rate for matrix parameters (Muon)")
    parser.add_argument("--scalar-lr", type=float, default=0.5, help="learning rate for scalars (resid_lambdas, x0_lambdas)")
    parser.add_argument("--warmup-steps", type=int, default=40, help="number of steps for LR warmup")
    parser.add_argument("--warmdown-ratio", type=float, default=0.65, help="ratio of iterations for LR warmdown")
    parser.add_argument("--final-lr-frac", type=float, default=0.05, help="final LR as fraction of initial LR")
    parser.add_argument("--resume-from-step", type=int, default=-1, help="resume training from this step (-1 = disable)")
    # Evaluation
    parser.add_argument("--eval-every", type=int, default=250, help="evaluate val bpb every N steps (-1 = disable)")
    parser.add_argument("--eval-tokens", type=int, default=80*524288, help="number of tokens to evaluate val loss on")
    parser.add_argument("--core-metric-every", type=int, default=2000, help="evaluate CORE metric every N steps (-1 = disable)")
    parser.add_argument("--core-metric-max-per-task", type=int, default=500, help="examples per task for CORE metric")
    parser.add_argument("--sample-every", type=int, default=2000, help="sample from model every N steps (-1 = disable)")
    parser.add_argument("--save-every", type=int, default=-1, help="save checkpoints every N steps (-1 = only at end)")
    # Output
    parser.add_argument("--model-tag", type=str, default=None, help="override model tag for checkpoint directory name")
    return parser

# -----------------------------------------------------------------------------
# Helpers shared by the loop

def build_model_meta(args, depth, vocab_size):
    """A GPT on the meta device (shapes only) for `depth`, sized the way upstream sizes it."""
    # round the width up to a whole number of heads so head_dim is exactly args.head_dim
    base_dim = depth * args.aspect_ratio
    model_dim = ((base_dim + args.head_dim - 1) // args.head_dim) * args.head_dim
    num_heads = model_dim // args.head_dim
    config = GPTConfig(
        sequence_len=args.max_seq_len, vocab_size=vocab_size,
        n_layer=depth, n_head=num_heads, n_kv_head=num_heads, n_embd=model_dim,
        window_pattern=args.window_pattern,
    )
    with torch.device("meta"):
        return GPT(config)


def get_scaling_params(model):
    # transformer matrices + lm_head give the cleanest scaling laws (upstream dev/LOG.md, Jan 27 2026)
    counts = model.num_scaling_params()
    return counts['transformer_matrices'] + counts['lm_head']


def fp8_module_filter(mod, fqn):
    """Only Linear layers whose dims suit FP8 tensor cores (multiples of 16, at least 128)."""
    if not isinstance(mod, torch.nn.Linear):
        return False
    if mod.in_features % 16 != 0 or mod.out_features % 16 != 0:
        return False
    return min(mod.in_features, mod.out_features) >= 128


@contextmanager
def disable_fp8(model):
    """Swap Float8Linear modules back to plain Linear (sharing weights) for the duration of an eval."""
    swapped = []  # (parent, attribute, fp8 module)
    for name, module in model.named_modules():
        if 'Float8' in type(module).__name__:
            parent_name, _, attr = name.rpartition('.')
            parent = model.get_submodule(parent_name) if parent_name else model
            swapped.append((parent, attr, module))
    for parent, attr, fp8_module in swapped:
        # built on meta so no memory is allocated; the real weight is shared in right after
        linear = Linear(fp8_module.in_features, fp8_module.out_features, bias=fp8_module.bias is not None,
                        device="meta", dtype=fp8_module.weight.dtype)
        linear.weight = fp8_module.weight
        if fp8_module.bias is not None:
            linear.bias = fp8_module.bias
        setattr(parent, attr, linear)
    try:
        yield
    finally:
        for parent, attr, fp8_module in swapped:
            setattr(parent, attr, fp8_module)


def loader_state_path(checkpoint_dir, step, rank):
    return os.path.join(checkpoint_dir, f"loader_{step:06d}_rank{rank:d}.pt")


def loader_state_files(step, rank, snapshot):
    """This rank's exact dataloader snapshot, as an extra file for save_checkpoint to write and commit."""
    return {os.path.basename(loader_state_path("", step, rank)): pack_doc_buffer(snapshot)}


SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]

# -----------------------------------------------------------------------------
# The loop

def train(args, variant=None, data_source=None):  # hook: data_source (a run config's `data:` section)
    """
    Run pre-training with upstream's semantics. `args` is the namespace of build_parser().
    `variant` is a hooks variant object (None = vanilla); `data_source` (None = upstream's
    ClimbMix loader) replaces the data, see nanochat/hooks.py. Returns a summary dict with the
    per-step training losses, the final step and the validation bpb figures.
    """
    variant = variant if variant is not None else hooks.get_variant("vanilla")
    user_config = vars(args).copy()  # for logging: upstream's flags only, never variant settings

    # Compute init and wandb logging
    device_type = autodetect_device_type() if args.device_type == "" else args.device_type
    ddp, ddp_rank, ddp_local_rank, ddp_world_size, device = compute_init(device_type)
    master_process = ddp_rank == 0  # this process does the logging and checkpointing
    synchronize = torch.cuda.synchronize if device_type == "cuda" else lambda: None
    get_max_memory = torch.cuda.max_memory_allocated if device_type == "cuda" else lambda: 0
    if device_type == "cuda":
        gpu_device_name = torch.cuda.get_device_name(0)
        gpu_peak_flops = get_peak_flops(gpu_device_name)
        print0(f"GPU: {gpu_device_name} | Peak FLOPS (BF16): {gpu_peak_flops:.2e}")
    else:
        gpu_peak_flops = float('inf')  # MFU is not meaningful on CPU/MPS
    print0(f"COMPUTE_DTYPE: {COMPUTE_DTYPE} ({COMPUTE_DTYPE_REASON})")

    use_dummy_wandb = args.run == "dummy" or not master_process
    if use_dummy_wandb:
        wandb_run = DummyWandb()
    else:
        import wandb
        wandb_run = wandb.init(project="nanochat", name=args.run, config=user_config)

    # Attention backend report, as upstream prints it
    from nanochat.flash_attention import USE_FA3, HAS_FA3, FLASH_IMPL
    if USE_FA3 and FLASH_IMPL == "fa2":
        print0("✓ Using Flash Attention 2 (flash-attn, the gpu extra): no FA3 kernel could be loaded.")
    elif USE_FA3:
        print0("✓ Using Flash Attention 3: efficient, new and awesome.")
    else:
        print0("!" * 80)
        if HAS_FA3 and COMPUTE_DTYPE != torch.bfloat16:
            print0(f"WARNING: Flash Attention 3 only supports bf16, but COMPUTE_DTYPE={COMPUTE_DTYPE}. Using PyTorch SDPA fallback")
        else:
            print0("WARNING: Flash Attention 3 not available, using PyTorch SDPA fallback")
        print0("WARNING: Training will be less efficient without FA3")
        if args.window_pattern != "L":
            print0(f"WARNING: SDPA has no support for sliding window attention (window_pattern='{args.window_pattern}'). Your GPU utilization will be terrible.")
            print0("WARNING: Recommend using --window-pattern L for full context attention without alternating sliding window patterns.")
        print0("!" * 80)

    # Tokenizer: needed for the vocab size and for evaluation
    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device=device)
    vocab_size = tokenizer.get_vocab_size()
    print0(f"Vocab size: {vocab_size:,}")

    # Model: meta build -> storage on device -> init
    model = build_model_meta(args, args.depth, vocab_size)
    model_config = model.config
    model_config_kwargs = asdict(model_config)
    print0(f"Model config:\n{json.dumps(model_config_kwargs, indent=2)}")
    model.to_empty(device=device)
    model.init_weights()

    base_dir = get_base_dir()
    output_dirname = args.model_tag if args.model_tag else f"d{args.depth}"
    checkpoint_dir = os.path.join(base_dir, "base_checkpoints", output_dirname)
    resuming = args.resume_from_step != -1
    if resuming:
        # only a committed step (or an upstream-written one) loads; a half-saved step is refused by name
        model_data, optimizer_data, meta_data = load_checkpoint(checkpoint_dir, args.resume_from_step, device, load_optimizer=True, rank=ddp_rank)
        committed = step_status(checkpoint_dir, args.resume_from_step)[0] == "committed"
        print0(f"Resuming optimization from step {args.resume_from_step} "
               f"({'committed, checksums verified' if committed else 'no manifest: written by upstream, not verified'})")
        for key in ("step", "loop_state", "val_bpb", "dataloader_state_dict"):
            if key not in meta_data:
                meta_path = os.path.join(checkpoint_dir, f"meta_{args.resume_from_step:06d}.json")
                raise ValueError(f"{meta_path} has no '{key}' entry, so training "
                                 f"cannot resume from it (it was not saved by a pre-training run); resume from a step saved by "
                                 f"base_train / nanochat.train, or start without --resume-from-step")
        model.load_state_dict(model_data, strict=True, assign=True)
        del model_data

    # FP8: a module swap that must happen before torch.compile
    if args.fp8:
        if device_type != "cuda":
            print0("Warning: FP8 training requires CUDA, ignoring --fp8 flag")
        else:
            from nanochat.fp8 import Float8LinearConfig, convert_to_float8_training
            fp8_config = Float8LinearConfig.from_recipe_name(args.fp8_recipe)
            num_linear = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear))
            convert_to_float8_training(model, config=fp8_config, module_filter_fn=fp8_module_filter)
            num_fp8 = sum(1 for m in model.modules() if 'Float8' in type(m).__name__)
            print0(f"✓ FP8 training enabled ({args.fp8_recipe} scaling) - converted {num_fp8}/{num_linear} linear layers, skipped {num_linear - num_fp8} (too small)")

    extra_groups = hooks.variant_param_groups(variant, model, vars(args), resuming)  # hook: variant attaches its modules (without resetting a resumed model)
    if resuming:
        hooks.load_variant_state(variant, checkpoint_dir, args.resume_from_step, device)  # hook: variant resume state

    # Compile. orig_model keeps the uncompiled module for saving and for evals whose shapes vary.
    orig_model = model
    if os.environ.get("NANOCHAT_COMPILE", "1") != "0":
        model = torch.compile(model, dynamic=False)  # input shapes never change during training

    # Scaling laws and muP-style transfer: horizon, batch size, LR and weight decay
    param_counts = orig_model.num_scaling_params()
    print0("Parameter counts:")
    for key, value in param_counts.items():
        print0(f"{key:24s}: {value:,}")
    num_flops_per_token = orig_model.estimate_flops()
    print0(f"Estimated FLOPs per token: {num_flops_per_token:e}")

    # 1) horizon: the tokens:params ratio found compute-optimal in upstream's scaling sweeps
    num_scaling_params = get_scaling_params(orig_model)
    target_tokens = int(args.target_param_data_ratio * num_scaling_params)
    # d12 is the reference model where the hyperparameters were tuned
    d12_ref = build_model_meta(args, 12, vocab_size)
    D_REF = args.target_param_data_ratio * get_scaling_params(d12_ref)
    B_REF = 2**19  # best batch size at d12, measured upstream

    # 2) batch size: Power Lines (Bopt ∝ D^0.383), rounded to a power of two
    total_batch_size = args.total_batch_size
    if total_batch_size == -1:
        predicted_batch_size = B_REF * (target_tokens / D_REF) ** 0.383
        total_batch_size = 2 ** round(math.log2(predicted_batch_size))
        print0(f"Auto-computed optimal batch size: {total_batch_size:,} tokens")

    # 3) LR: sqrt scaling with batch size (AdamW theory, assumed for Muon too)
    batch_lr_scale = 1.0
    batch_ratio = total_batch_size / B_REF
    if batch_ratio != 1.0:
        batch_lr_scale = batch_ratio ** 0.5
        print0(f"Scaling LRs by {batch_lr_scale:.4f} for batch size {total_batch_size:,} (reference: {B_REF:,})")

    # 4) weight decay: keep T_epoch = B/(lr*wd*D) constant given the LR scaling above
    weight_decay_scaled = args.weight_decay * math.sqrt(total_batch_size / B_REF) * (D_REF / target_tokens)
    if weight_decay_scaled != args.weight_decay:
        print0(f"Scaling weight decay from {args.weight_decay:.6f} to {weight_decay_scaled:.6f} for depth {args.depth}")

    # Optimizer: Muon for matrices, AdamW for the rest
    optimizer = orig_model.setup_optimizer(
        unembedding_lr=args.unembedding_lr * batch_lr_scale,
        embedding_lr=args.embedding_lr * batch_lr_scale,
        scalar_lr=args.scalar_lr * batch_lr_scale,
        matrix_lr=args.matrix_lr * batch_lr_scale,
        weight_decay=weight_decay_scaled,
    )
    hooks.add_param_groups(optimizer, extra_groups)  # hook: variant parameters join the LR schedule
    hooks.drop_frozen_params(optimizer)  # hook: a variant may freeze the base model
    if resuming:
        optimizer.load_state_dict(optimizer_data)
        del optimizer_data

    # fp16 needs loss scaling; bf16 and fp32 have fp32's exponent range and do not
    scaler = torch.amp.GradScaler() if COMPUTE_DTYPE == torch.float16 else None
    if scaler is not None:
        print0("GradScaler enabled for fp16 training")

    # Data. Upstream resumes the loader approximately (from the next row group); we also
    # save an exact snapshot of the loader (loader_XXXXXX_rankR.pt) so a resumed run sees
    # the very batches an uninterrupted one would. Without that file we resume as upstream.
    dataloader_resume_state_dict = None
    if resuming:
        dataloader_resume_state_dict = dict(meta_data["dataloader_state_dict"])
        loader_path = loader_state_path(checkpoint_dir, args.resume_from_step, ddp_rank)
        snapshot = load_checkpoint_file(checkpoint_dir, args.resume_from_step, os.path.basename(loader_path), device="cpu",
                                        what="loader snapshot", fix="resume from an earlier step")
        if snapshot is not None:
            dataloader_resume_state_dict["exact"] = snapshot
            print0("Resuming the dataloader exactly (loader snapshot found)")
        else:
            print0(f"No loader snapshot at {loader_path}: resuming the dataloader from the next row group, as upstream")
    train_loader = tokenizing_distributed_data_loader_with_state_bos_bestfit(tokenizer, args.device_batch_size, args.max_seq_len, split="train", device=device, resume_state_dict=dataloader_resume_state_dict, exact_resume=True)
    build_val_loader = lambda: tokenizing_distributed_data_loader_bos_bestfit(tokenizer, args.device_batch_size, args.max_seq_len, split="val", device=device)
    train_loader, build_val_loader = hooks.data_loaders(data_source, train_loader, build_val_loader, tokenizer, args.device_batch_size, args.max_seq_len, device, dataloader_resume_state_dict, variant)  # hook: a run config's data source, or the variant's own loader
    x, y, dataloader_state_dict = next(train_loader)  # the first batch

    # Number of iterations: explicit, else from target FLOPs, else from the data:param ratio
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
        print0(f"Using user-provided number of iterations: {num_iterations:,}")
    elif args.target_flops > 0:
        num_iterations = round(args.target_flops / (num_flops_per_token * total_batch_size))
        print0(f"Calculated number of iterations from target FLOPs: {num_iterations:,}")
    elif args.target_param_data_ratio > 0:
        num_iterations = target_tokens // total_batch_size
        print0(f"Calculated number of iterations from target data:param ratio: {num_iterations:,}")
    else:
        raise ValueError("no training horizon: set --num-iterations, --target-flops or --target-param-data-ratio")
    total_tokens = total_batch_size * num_iterations
    print0(f"Total number of training tokens: {total_tokens:,}")
    print0(f"Tokens : Scaling params ratio: {total_batch_size * num_iterations / num_scaling_params:.2f}")
    print0(f"Total training FLOPs estimate: {num_flops_per_token * total_tokens:e}")

    warmdown_iters = round(args.warmdown_ratio * num_iterations)

    def get_lr_multiplier(it):
        # linear warmup, constant, linear warmdown to final_lr_frac
        if it < args.warmup_steps:
            return (it + 1) / args.warmup_steps
        if it <= num_iterations - warmdown_iters:
            return 1.0
        progress = (num_iterations - it) / warmdown_iters
        return progress * 1.0 + (1 - progress) * args.final_lr_frac

    def get_muon_momentum(it):
        # 0.85 -> 0.97 over the first 400 steps, then down to 0.90 across the warmdown
        warmdown_start = num_iterations - warmdown_iters
        if it < 400:
            frac = it / 400
            return (1 - frac) * 0.85 + frac * 0.97
        if it >= warmdown_start:
            progress = (it - warmdown_start) / warmdown_iters
            return 0.97 * (1 - progress) + 0.90 * progress
        return 0.97

    def get_weight_decay(it):
        # cosine from the scaled value to zero over the run
        return weight_decay_scaled * 0.5 * (1 + math.cos(math.pi * it / num_iterations))

    # Loop state (saved in checkpoints so a resumed run continues exactly)
    if not resuming:
        step = 0
        val_bpb = None
        min_val_bpb = float("inf")
        smooth_train_loss = 0  # EMA of the training loss
        total_training_time = 0
    else:
        step = meta_data["step"]
        loop_state = meta_data["loop_state"]
        val_bpb = meta_data["val_bpb"]
        min_val_bpb = loop_state["min_val_bpb"]
        smooth_train_loss = loop_state["smooth_train_loss"]
        total_training_time = loop_state["total_training_time"]

    # Gradient accumulation to reach total_batch_size
    tokens_per_fwdbwd = args.device_batch_size * args.max_seq_len
    world_tokens_per_fwdbwd = tokens_per_fwdbwd * ddp_world_size
    if total_batch_size % world_tokens_per_fwdbwd != 0:
        raise ValueError(f"--total-batch-size ({total_batch_size}) must be a multiple of device_batch_size*max_seq_len*world_size "
                         f"({args.device_batch_size}*{args.max_seq_len}*{ddp_world_size} = {world_tokens_per_fwdbwd})")
    grad_accum_steps = total_batch_size // world_tokens_per_fwdbwd
    print0(f"Tokens / micro-batch / rank: {args.device_batch_size} x {args.max_seq_len} = {tokens_per_fwdbwd:,}")
    print0(f"Tokens / micro-batch: {world_tokens_per_fwdbwd:,}")
    print0(f"Total batch size {total_batch_size:,} => gradient accumulation steps: {grad_accum_steps}")

    variant_loss = getattr(variant, "loss", None)  # hook: a variant may replace the micro-batch loss
    variant_on_step = getattr(variant, "on_step", None)  # hook: per-step callback (telemetry)
    variant_metrics = {}  # hook: what the variant's loss() reported for the last micro-batch, logged with the step
    train_losses = []  # raw per-step losses (last micro-batch), for callers and tests

    while True:
        last_step = step == num_iterations  # one extra pass so the end gets its eval and save
        flops_so_far = num_flops_per_token * total_batch_size * step

        # Validation bpb (all ranks take part)
        if args.eval_every > 0 and (last_step or step % args.eval_every == 0):
            model.eval()
            val_loader = build_val_loader()
            eval_steps = args.eval_tokens // (args.device_batch_size * args.max_seq_len * ddp_world_size)
            with disable_fp8(model):
                val_bpb = evaluate_bpb(model, val_loader, eval_steps, token_bytes)
            print0(f"Step {step:05d} | Validation bpb: {val_bpb:.6f}")
            if val_bpb < min_val_bpb:
                min_val_bpb = val_bpb
            wandb_run.log({
                "step": step,
                "total_training_flops": flops_so_far,
                "total_training_time": total_training_time,
                "val/bpb": val_bpb,
            })
            model.train()

        # CORE metric (all ranks), on the uncompiled model because input shapes vary
        results = {}
        if args.core_metric_every > 0 and (last_step or (step > 0 and step % args.core_metric_every == 0)):
            from nanochat.core_eval import evaluate_core
            model.eval()
            with disable_fp8(orig_model):
                results = evaluate_core(orig_model, tokenizer, device, max_per_task=args.core_metric_max_per_task)
            print0(f"Step {step:05d} | CORE metric: {results['core_metric']:.4f}")
            wandb_run.log({
                "step": step,
                "total_training_flops": flops_so_far,
                "core_metric": results["core_metric"],
                "centered_results": results["centered_results"],
            })
            model.train()

        # Samples (master only), uncompiled model
        if args.sample_every > 0 and master_process and (last_step or (step > 0 and step % args.sample_every == 0)):
            model.eval()
            engine = Engine(orig_model, tokenizer)
            for prompt in SAMPLE_PROMPTS:
                tokens = tokenizer(prompt, prepend="<|bos|>")
                with disable_fp8(orig_model):
                    sample, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=16, temperature=0)
                print0(tokenizer.decode(sample[0]))
            model.train()

        # Checkpoint: at the end, and every save_every steps (not at step 0 or the resume step)
        if last_step or (step > 0 and step != args.resume_from_step and args.save_every > 0 and step % args.save_every == 0):
            # every file of the step goes through save_checkpoint, which commits them together
            extra_files = loader_state_files(step, ddp_rank, dataloader_state_dict["exact"])
            hooks.save_variant_state(variant, checkpoint_dir, step, rank=ddp_rank, into=extra_files)  # hook: mc_XXXXXX.pt beside upstream's files
            save_checkpoint(
                checkpoint_dir,
                step,
                orig_model.state_dict(),
                optimizer.state_dict(),
                {
                    "step": step,
                    "val_bpb": val_bpb,
                    "model_config": model_config_kwargs,
                    "user_config": user_config,
                    "device_batch_size": args.device_batch_size,
                    "max_seq_len": args.max_seq_len,
                    "total_batch_size": total_batch_size,
                    "dataloader_state_dict": {k: v for k, v in dataloader_state_dict.items() if k != "exact"},
                    "loop_state": {
                        "min_val_bpb": min_val_bpb,
                        "smooth_train_loss": smooth_train_loss,
                        "total_training_time": total_training_time,
                    },
                },
                rank=ddp_rank,
                extra_files=extra_files,
            )

        if last_step:
            break

        # ---------------------------------------------------------------------
        # One optimization step
        synchronize()
        t0 = time.time()
        for micro_step in range(grad_accum_steps):
            if variant_loss is None:
                loss = model(x, y)
            else:
                loss, variant_metrics = variant_loss(model, (x, y), step)  # hook: variant loss (and its metrics) for this micro-batch
            train_loss = loss.detach()
            loss = loss / grad_accum_steps  # backward sums grads over micro-steps, so normalize here
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
            x, y, dataloader_state_dict = next(train_loader)  # prefetch while the device works
        lrm = get_lr_multiplier(step)
        muon_momentum = get_muon_momentum(step)
        muon_weight_decay = get_weight_decay(step)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group['kind'] == 'muon':
                group["momentum"] = muon_momentum
                group["weight_decay"] = muon_weight_decay
        train_loss = hooks.before_optimizer_step(variant, optimizer, train_loss, step, checkpoint_dir, scaler)  # hook: NaN/inf guard (opt-in), idle groups sit out
        if scaler is not None:
            scaler.unscale_(optimizer)
            # all ranks must agree to skip a step when any of them saw inf/nan
            if is_ddp_initialized():
                for v in scaler._found_inf_per_device(optimizer).values():
                    dist.all_reduce(v, op=dist.ReduceOp.MAX)
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        hooks.after_optimizer_step(optimizer)  # hook: idle groups back, every grad cleared (the variant's too)
        train_loss_f = train_loss.item()  # a host-device sync point
        synchronize()
        t1 = time.time()
        dt = t1 - t0
        train_losses.append(train_loss_f)

        # Logging (host only)
        ema_beta = 0.9
        smooth_train_loss = ema_beta * smooth_train_loss + (1 - ema_beta) * train_loss_f
        debiased_smooth_loss = smooth_train_loss / (1 - ema_beta**(step + 1))
        pct_done = 100 * step / num_iterations
        step_tokens = hooks.trained_tokens(variant_metrics, total_batch_size, grad_accum_steps * ddp_world_size)  # hook: what was really trained
        tok_per_sec = int(step_tokens / dt)  # hook: step_tokens (= total_batch_size for vanilla)
        flops_per_sec = num_flops_per_token * step_tokens / dt  # hook: step_tokens
        mfu = 100 * flops_per_sec / (gpu_peak_flops * ddp_world_size)
        if step > 10:
            total_training_time += dt  # the first steps include compilation, so they are not counted
        steps_done = step - 10
        if steps_done > 0:
            eta_seconds = (num_iterations - step) * total_training_time / steps_done
            eta_str = f" | eta: {eta_seconds/60:.1f}m"
        else:
            eta_str = ""
        epoch = f"{dataloader_state_dict['epoch']} pq: {dataloader_state_dict['pq_idx']} rg: {dataloader_state_dict['rg_idx']}"
        eta_str += hooks.variant_metrics_line(variant_metrics)  # hook: the variant's metrics end the step line ('' for vanilla)
        print0(f"step {step:05d}/{num_iterations:05d} ({pct_done:.2f}%) | loss: {debiased_smooth_loss:.6f} | lrm: {lrm:.2f} | dt: {dt * 1000:.2f}ms | tok/sec: {tok_per_sec:,} | bf16_mfu: {mfu:.2f} | epoch: {epoch} | total time: {total_training_time/60:.2f}m{eta_str}")
        if step % 100 == 0:
            wandb_run.log({
                "step": step,
                "total_training_flops": flops_so_far,
                "total_training_time": total_training_time,
                "train/loss": debiased_smooth_loss,
                "train/lrm": lrm,
                "train/dt": dt,
                "train/tok_per_sec": tok_per_sec,
                "train/mfu": mfu,
                "train/epoch": epoch,
                **hooks.variant_wandb_metrics(variant_metrics),  # hook: the variant's metrics in the trainer's wandb run
            })
        if variant_on_step is not None:
            variant_on_step(step, {"loss": train_loss_f, "lrm": lrm, "dt": dt})  # hook: per-step callback

        first_step_of_run = (step == 0) or (resuming and step == args.resume_from_step)
        step += 1

        # Python's cyclic GC spends ~0.5 s per scan for almost no garbage once setup is done:
        # collect and freeze what survived setup, then keep it off but for rare manual passes.
        if first_step_of_run:
            gc.collect()
            gc.freeze()
            gc.disable()
        elif step % 5000 == 0:
            gc.collect()

    print0(f"Peak memory usage: {get_max_memory() / 1024 / 1024:.2f}MiB")
    print0(f"Total training time: {total_training_time/60:.2f}m")
    if val_bpb is not None:
        print0(f"Minimum validation bpb: {min_val_bpb:.6f}")
    hooks.finish_variant(variant)  # hook: the variant's finish()
    wandb_run.finish()
    gc.enable()  # leave the interpreter as we found it when used as a library
    return {
        "step": step,
        "num_iterations": num_iterations,
        "train_losses": train_losses,
        "val_bpb": val_bpb,
        "min_val_bpb": min_val_bpb,
        "total_batch_size": total_batch_size,
        "checkpoint_dir": checkpoint_dir,
        "model": orig_model,
        "optimizer": optimizer,
    }


def run_cli(args, variant=None, data_source=None):  # hook: data_source
    """Print the banner, train, clean up; turn known bad-input errors into one clear line."""
    print_banner()
    try:
        return train(args, variant, data_source)  # hook: data_source
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        if os.environ.get("NANOCHAT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        compute_cleanup()


def main(argv=None):
    """python -m nanochat.train --config FILE.yaml [--key=value ...]"""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            sys.exit("error: --config needs a path to a YAML file (see configs/)")
        config_path = argv[i + 1]
        del argv[i:i + 2]
    elif any(a.startswith("--config=") for a in argv):
        i = next(i for i, a in enumerate(argv) if a.startswith("--config="))
        config_path = argv.pop(i).split("=", 1)[1]
    if "-h" in argv or "--help" in argv:
        build_parser().print_help()
        print("\nAlso: --config FILE.yaml (keys are the flags above with underscores; "
              "`variant: NAME` plus a section named after the variant)")
        return
    defaults = vars(build_parser().parse_args([]))
    try:
        extra_sections = {"data": {}}  # hook: the `data:` section names a data source
        settings, variant_name, variant_config = hooks.load_run_config(config_path, hooks.parse_overrides(argv), defaults, extra_sections)
        variant = hooks.get_variant(variant_name, variant_config)
        data_source = hooks.get_data_source(extra_sections["data"])  # hook: None without a data section
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return run_cli(argparse.Namespace(**settings), variant, data_source)  # hook: data_source


if __name__ == "__main__":
    main()
