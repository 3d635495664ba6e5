"""
Supervised fine-tuning (SFT): turn a pretrained base model into a chat model.

The base checkpoint is trained further on a mixture of conversations (SmolTalk for
general chat, MMLU's auxiliary_train for the multiple-choice format, GSM8K for
arithmetic with the calculator tool), with the loss only on the tokens the assistant
says. The result goes to <base_dir>/chatsft_checkpoints/<model_tag>/.

    python -m scripts.chat_sft

or distributed (CPU torchrun works too, over gloo):

    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --device-batch-size=16

Batch sizes, sequence length and learning rates default to those the base model was
trained with (read from its checkpoint metadata); any flag given explicitly wins.

Offline use: with NANOCHAT_TASK_FIXTURES=tasks/fixtures every task reads the small
local fixture files instead of downloading from the HuggingFace hub. NANOCHAT_COMPILE=0
(a dev knob, as in nanochat/train.py) skips torch.compile of the model.
"""

import os
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
import gc
import sys
import time
import argparse
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat.common import compute_init, compute_cleanup, print0, DummyWandb, get_base_dir, autodetect_device_type, get_peak_flops, COMPUTE_DTYPE, COMPUTE_DTYPE_REASON, is_ddp_initialized
from nanochat.tokenizer import get_token_bytes
from nanochat.checkpoint_manager import save_checkpoint, load_model, load_optimizer_state
from nanochat.loss_eval import evaluate_bpb
from nanochat.flash_attention import HAS_FA3
from nanochat.engine import Engine
from scripts.chat_eval import run_chat_eval, ALL_TASKS, centered_accuracy

from tasks.common import TaskMixture
from tasks.gsm8k import GSM8K
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk

# -----------------------------------------------------------------------------
# CLI arguments (upstream's flags; None means "inherit from the base checkpoint")


def build_parser():
    parser = argparse.ArgumentParser(description="Supervised fine-tuning (SFT) the model")
    # Logging
    parser.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb logging)")
    # Runtime
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    # Model loading
    parser.add_argument("--model-tag", type=str, default=None, help="model tag to load from")
    parser.add_argument("--model-step", type=int, default=None, help="model step to load from")
    parser.add_argument("--load-optimizer", type=int, default=1, help="warm-start optimizer from pretrained checkpoint (0=no, 1=yes)")
    # Training horizon
    parser.add_argument("--num-iterations", type=int, default=-1, help="number of optimization steps (-1 = full epoch)")
    # Batch sizes (default: inherit from pretrained checkpoint)
    parser.add_argument("--max-seq-len", type=int, default=None, help="max context length (default: inherit from pretrain)")
    parser.add_argument("--device-batch-size", type=int, default=None, help="per-device batch size (default: inherit from pretrain)")
    parser.add_argument("--total-batch-size", type=int, default=None, help="total batch size in tokens (default: inherit from pretrain)")
    # Optimization (default: inherit from pretrained checkpoint)
    parser.add_argument("--embedding-lr", type=float, default=None, help="learning rate for embedding parameters (Adam) (default: inherit from pretrain)")
    parser.add_argument("--unembedding-lr", type=float, default=None, help="learning rate for unembedding parameters (Adam) (default: inherit from pretrain)")
    parser.add_argument("--matrix-lr", type=float, default=None, help="learning rate for matrix parameters (Muon) (default: inherit from pretrain)")
    parser.add_argument("--init-lr-frac", type=float, default=0.8, help="initial LR as fraction of base LR")
    parser.add_argument("--warmup-ratio", type=float, default=0.0, help="ratio of iterations for LR warmup")
    parser.add_argument("--warmdown-ratio", type=float, default=0.5, help="ratio of iterations for LR warmdown")
    parser.add_argument("--final-lr-frac", type=float, default=0.0, help="final LR as fraction of initial LR")
    # Evaluation
    parser.add_argument("--eval-every", type=int, default=200, help="evaluate val bpb every N steps (-1 = disable)")
    parser.add_argument("--eval-tokens", type=int, default=40*524288, help="number of tokens to evaluate val loss on")
    parser.add_argument("--chatcore-every", type=int, default=200, help="evaluate ChatCORE metric every N steps (-1 = disable)")
    parser.add_argument("--chatcore-max-cat", type=int, default=-1, help="max problems per categorical task for ChatCORE")
    parser.add_argument("--chatcore-max-sample", type=int, default=24, help="max problems per generative task for ChatCORE")
    # Data mixture
    parser.add_argument("--mmlu-epochs", type=int, default=3, help="number of epochs of MMLU in training mixture (teaches Multiple Choice)")
    parser.add_argument("--gsm8k-epochs", type=int, default=4, help="number of epochs of GSM8K in training mixture (teaches Math and Tool Use)")
    return parser

# -----------------------------------------------------------------------------
# Data: the task mixtures and a packing loader over them


def capped(task):
    """
    The task with its `stop` clamped to the number of rows its split really has.
    Task.__len__ trusts `stop`, so MMLU(..., stop=5200) over a 4-row offline fixture
    would claim 5200 rows and index past the end. On the real datasets the stops used
    below are smaller than the splits, so this changes nothing there.
    """
    if task.stop is not None:
        task.stop = min(task.stop, task.num_examples())
    return task


def build_train_mixture(mmlu_epochs, gsm8k_epochs):
    """The SFT training data; listing a task k times makes it k epochs of the mixture."""
    return TaskMixture([
        SmolTalk(split="train"),  # ~460K general conversations
        *[MMLU(subset="all", split="auxiliary_train") for _ in range(mmlu_epochs)],  # ~100K rows per epoch
        *[GSM8K(subset="main", split="train") for _ in range(gsm8k_epochs)],  # ~8K rows per epoch
    ])


def build_val_mixture():
    """Held-out conversations for val bpb, in roughly the proportions of the training mixture."""
    return TaskMixture([
        SmolTalk(split="test"),  # ~24K rows
        capped(MMLU(subset="all", split="test", stop=5200)),  # 5.2K of ~14K rows
        capped(GSM8K(subset="main", split="test", stop=420)),  # 420 of ~1.3K rows
    ])


@dataclass
class EpochProgress:
    """What the training loader reports back to the loop: SFT runs until the data is used
    up, so only the loader knows when the last step comes and how far along we are."""
    last_step: bool = False
    approx_progress: float = 0.0  # 0 -> 1 over the epoch (or over num_iterations)
    current_epoch: int = 1


def sft_data_generator_bos_bestfit(dataset, tokenizer, device_batch_size, max_seq_len, device,
                                   num_iterations=-1, progress=None, ddp_rank=0, ddp_world_size=1,
                                   buffer_size=100):
    """
    Endless (inputs, targets) batches of shape (device_batch_size, max_seq_len) packed
    from whole conversations, every row starting with a conversation's BOS.

    Rows are filled best-fit from a buffer of rendered conversations: the longest one
    that still fits goes in next. When none fits, the rest of the row is padding
    rather than a cropped conversation, so no conversation is ever cut. Targets are -1
    (ignored by the loss) wherever render_conversation's mask is 0 (user turns, BOS,
    special tokens, tool outputs) and on padding.

    Pass `progress` (an EpochProgress) for the training split: it is updated after each
    batch. Under torchrun each rank takes every ddp_world_size-th conversation.
    """
    dataset_size = len(dataset)
    if dataset_size == 0:  # ours: a ValueError naming where the data comes from
        raise ValueError("the SFT data mixture is empty; check the task data (or NANOCHAT_TASK_FIXTURES)")
    row_capacity = max_seq_len + 1  # inputs and targets are the row shifted by one
    bos_token = tokenizer.get_bos_token_id()

    conv_buffer = []  # (ids, mask) of rendered conversations waiting to be packed
    cursor = ddp_rank  # next conversation to render into the buffer
    consumed = ddp_rank  # conversations actually packed into rows (the buffer runs ahead)
    epoch = 1
    it = 0

    def refill_buffer():
        nonlocal cursor, epoch
        while len(conv_buffer) < buffer_size:
            conversation = dataset[cursor]
            ids, mask = tokenizer.render_conversation(conversation)
            conv_buffer.append((ids, mask))
            cursor += ddp_world_size
            if cursor >= dataset_size:
                cursor = cursor % dataset_size
                epoch += 1

    while True:
        rows = []
        mask_rows = []
        row_lengths = []  # the length before any padding, per row
        for _ in range(device_batch_size):
            row = []
            mask_row = []
            padded = False
            while len(row) < row_capacity:
                while len(conv_buffer) < buffer_size:
                    refill_buffer()

                remaining = row_capacity - len(row)

                # best fit: the longest buffered conversation that fits in what is left
                best_idx = -1
                best_len = 0
                for i, (conv, _) in enumerate(conv_buffer):
                    conv_len = len(conv)
                    if conv_len <= remaining and conv_len > best_len:
                        best_idx = i
                        best_len = conv_len

                if best_idx >= 0:
                    conv, conv_mask = conv_buffer.pop(best_idx)
                    row.extend(conv)
                    mask_row.extend(conv_mask)
                    consumed += ddp_world_size
                else:
                    if not row:
                        # ours: an empty row and still nothing fits: the whole (full) buffer is
                        # conversations longer than a row, and none of them can ever leave it
                        raise RuntimeError(
                            f"all {buffer_size} buffered conversations are longer than a row of "
                            f"{row_capacity} tokens (max_seq_len + 1), so no batch can be filled; "
                            f"raise --max-seq-len")
                    # nothing fits: pad the rest of the row instead of cropping a conversation
                    content_len = len(row)
                    row.extend([bos_token] * remaining)
                    mask_row.extend([0] * remaining)
                    padded = True
                    break

            if padded:
                row_lengths.append(content_len)
            else:
                row_lengths.append(row_capacity)
            rows.append(row[:row_capacity])
            mask_rows.append(mask_row[:row_capacity])

        # `progress` is given for the training split only (upstream: split == "train")
        it += 1
        if 0 < num_iterations <= it and progress is not None:
            progress.last_step = True

        if progress is not None:
            progress.current_epoch = epoch
            if num_iterations > 0:
                progress.approx_progress = it / num_iterations
            else:
                progress.approx_progress = consumed / dataset_size
            # the epoch ends when its conversations have been packed, not when the
            # buffer's read cursor wraps around (which happens earlier)
            if consumed >= dataset_size:
                progress.last_step = True

        use_cuda = device.type == "cuda"
        batch_tensor = torch.tensor(rows, dtype=torch.long, pin_memory=use_cuda)
        inputs = batch_tensor[:, :-1].to(device=device, dtype=torch.int32, non_blocking=use_cuda).contiguous()
        targets = batch_tensor[:, 1:].to(device=device, dtype=torch.int64, non_blocking=use_cuda).contiguous()

        # mask[j] belongs to token j, and token j is the target at position j-1
        mask_tensor = torch.tensor(mask_rows, dtype=torch.int8)
        mask_targets = mask_tensor[:, 1:].to(device=device)
        targets[mask_targets == 0] = -1

        # padding carries mask 0 already; this also drops the target that would predict
        # the first pad token from the last real one
        for i, content_len in enumerate(row_lengths):
            if content_len < row_capacity:
                targets[i, content_len-1:] = -1

        yield inputs, targets

# -----------------------------------------------------------------------------
# Schedules


def get_lr_multiplier(progress, warmup_ratio, warmdown_ratio, final_lr_frac):
    # Linear warmup, constant, linear warmdown to final_lr_frac, as a function of progress in
    # [0, 1] (not of the step: a full-epoch SFT run does not know its step count in advance).
    # Ours: the ratios are parameters (upstream reads its global args) so tests can call it.
    if progress < warmup_ratio:
        return (progress + 1e-8) / warmup_ratio
    elif progress <= 1.0 - warmdown_ratio:
        return 1.0
    else:
        decay = (progress - (1.0 - warmdown_ratio)) / warmdown_ratio
        return (1 - decay) * 1.0 + decay * final_lr_frac

def get_muon_momentum(it):
    # Muon momentum ramps from 0.85 to 0.95 over the first 300 steps
    frac = min(it / 300, 1)
    momentum = (1 - frac) * 0.85 + frac * 0.95
    return momentum

# -----------------------------------------------------------------------------
# Training


def train_sft(args):
    """Run SFT with parsed flags. Returns a summary dict (final step, val bpb, checkpoint dir, losses)."""
    user_config = vars(args).copy()

    device_type = autodetect_device_type() if args.device_type == "" else args.device_type
    ddp, ddp_rank, ddp_local_rank, ddp_world_size, device = compute_init(device_type)
    master_process = ddp_rank == 0
    print0(f"COMPUTE_DTYPE: {COMPUTE_DTYPE} ({COMPUTE_DTYPE_REASON})")
    synchronize = torch.cuda.synchronize if device_type == "cuda" else lambda: None
    get_max_memory = torch.cuda.max_memory_allocated if device_type == "cuda" else lambda: 0
    if device_type == "cuda":
        gpu_device_name = torch.cuda.get_device_name(0)
        gpu_peak_flops = get_peak_flops(gpu_device_name)
        print0(f"GPU: {gpu_device_name} | Peak FLOPS (BF16): {gpu_peak_flops:.2e}")
    else:
        gpu_peak_flops = float('inf')  # MFU means nothing on CPU/MPS

    use_dummy_wandb = args.run == "dummy" or not master_process
    if not use_dummy_wandb:
        import wandb  # ours: only needed (and only slow to import) when actually logging
    wandb_run = DummyWandb() if use_dummy_wandb else wandb.init(project="nanochat-sft", name=args.run, config=user_config)

    if not HAS_FA3:
        print0("WARNING: Flash Attention 3 not available, using PyTorch SDPA fallback. Training will be less efficient.")

    model, tokenizer, meta = load_model("base", device, phase="train", model_tag=args.model_tag, step=args.model_step)

    # Unset flags take the base run's values (or a default when the checkpoint lacks them)
    pretrain_user_config = meta.get("user_config", {})
    for name, fallback, source in [
        ("max_seq_len",       2048,   meta),
        ("device_batch_size", 32,     meta),
        ("total_batch_size",  524288, meta),
        ("embedding_lr",      0.3,    pretrain_user_config),
        ("unembedding_lr",    0.004,  pretrain_user_config),
        ("matrix_lr",         0.02,   pretrain_user_config),
    ]:
        arg_val = getattr(args, name)
        pretrain_val = source.get(name)
        if arg_val is None:
            resolved = pretrain_val if pretrain_val is not None else fallback
            setattr(args, name, resolved)
            print0(f"Inherited {name}={resolved} from pretrained checkpoint")
        elif pretrain_val is not None and arg_val != pretrain_val:
            print0(f"NOTE: --{name.replace('_', '-')}={arg_val} overrides pretrained value of {pretrain_val}")
        else:
            print0(f"Using {name}={arg_val}")

    orig_model = model  # uncompiled: for saving, and for evals whose input shapes vary
    if os.environ.get("NANOCHAT_COMPILE", "1") != "0":
        model = torch.compile(model, dynamic=False)
    depth = model.config.n_layer
    num_flops_per_token = model.estimate_flops()
    tokens_per_fwdbwd = args.device_batch_size * args.max_seq_len  # one micro-batch on one rank
    world_tokens_per_fwdbwd = tokens_per_fwdbwd * ddp_world_size
    if args.total_batch_size % world_tokens_per_fwdbwd != 0:
        raise ValueError(f"--total-batch-size={args.total_batch_size} must be a multiple of device_batch_size x "
                         f"max_seq_len x world_size = {args.device_batch_size} x {args.max_seq_len} x "
                         f"{ddp_world_size} = {world_tokens_per_fwdbwd}; change one of them")
    grad_accum_steps = args.total_batch_size // world_tokens_per_fwdbwd
    print0(f"Tokens / micro-batch / rank: {args.device_batch_size} x {args.max_seq_len} = {tokens_per_fwdbwd:,}")
    print0(f"Tokens / micro-batch: {world_tokens_per_fwdbwd:,}")
    print0(f"Total batch size {args.total_batch_size:,} => gradient accumulation steps: {grad_accum_steps}")
    token_bytes = get_token_bytes(device=device)

    # MuonAdamW as in pre-training; weight decay is 0 because pre-training already ramped it to 0
    optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr, matrix_lr=args.matrix_lr, weight_decay=0.0)

    # Warm start from the base run's optimizer state (momentum buffers and the like).
    # load_state_dict also brings back that run's param-group settings, whose LRs the
    # warmdown left near zero, so our fresh LRs are put back afterwards.
    base_dir = get_base_dir()
    if args.load_optimizer:
        optimizer_data = load_optimizer_state("base", device, rank=ddp_rank, model_tag=args.model_tag, step=args.model_step)
        if optimizer_data is not None:
            base_lrs = [group["lr"] for group in optimizer.param_groups]
            optimizer.load_state_dict(optimizer_data)
            del optimizer_data
            for group, base_lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base_lr
            print0("Loaded optimizer state from pretrained checkpoint (momentum buffers only, LRs reset)")
        else:
            print0("WARNING: optimizer checkpoint not found, starting with fresh optimizer (slightly worse)")

    # fp16 needs loss scaling; bf16 and fp32 do not
    scaler = torch.amp.GradScaler() if COMPUTE_DTYPE == torch.float16 else None
    if scaler is not None:
        print0("GradScaler enabled for fp16 training")

    # SFT starts from a fraction of the base learning rates
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * args.init_lr_frac
        group["initial_lr"] = group["lr"]

    train_dataset = build_train_mixture(args.mmlu_epochs, args.gsm8k_epochs)
    print0(f"Training mixture: {len(train_dataset):,} rows (MMLU x{args.mmlu_epochs}, GSM8K x{args.gsm8k_epochs})")
    val_dataset = build_val_mixture()
    epoch_progress = EpochProgress()
    loader_kwargs = dict(tokenizer=tokenizer, device_batch_size=args.device_batch_size, max_seq_len=args.max_seq_len,
                         device=device, ddp_rank=ddp_rank, ddp_world_size=ddp_world_size)
    train_loader = sft_data_generator_bos_bestfit(train_dataset, num_iterations=args.num_iterations,
                                                  progress=epoch_progress, **loader_kwargs)
    build_val_loader = lambda: sft_data_generator_bos_bestfit(val_dataset, **loader_kwargs)
    progress = 0.0  # monotone copy of epoch_progress.approx_progress that drives the LR

    # -------------------------------------------------------------------------
    # Training loop
    x, y = next(train_loader)  # the first batch; later ones are fetched during backward
    min_val_bpb = float("inf")
    val_bpb = None
    smooth_train_loss = 0.0  # EMA of the training loss
    ema_beta = 0.9
    total_training_time = 0.0  # wall-clock seconds of training steps, after the first 10
    train_losses = []
    checkpoint_dir = None
    step = 0
    sft_wall_start = time.time()  # for the ETA at the end of each step line (ours)
    while True:
        flops_so_far = num_flops_per_token * args.total_batch_size * step

        # ranks run out of data at slightly different times; all stop when any one does
        if ddp:
            last_step_tensor = torch.tensor(epoch_progress.last_step, dtype=torch.int32, device=device)
            dist.all_reduce(last_step_tensor, op=dist.ReduceOp.MAX)
            epoch_progress.last_step = bool(last_step_tensor.item())
        last_step = epoch_progress.last_step

        # Validation bpb (all ranks)
        if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
            model.eval()
            val_loader = build_val_loader()
            eval_steps = args.eval_tokens // (args.device_batch_size * args.max_seq_len * ddp_world_size)
            val_bpb = evaluate_bpb(model, val_loader, eval_steps, token_bytes)
            print0(f"Step {step:05d} | Validation bpb: {val_bpb:.4f}")
            if val_bpb < min_val_bpb:
                min_val_bpb = val_bpb
            wandb_run.log({
                "step": step,
                "total_training_flops": flops_so_far,
                "total_training_time": total_training_time,
                "val/bpb": val_bpb,
            })
            model.train()

        # ChatCORE (all ranks), on the uncompiled model since prompt lengths keep changing
        if args.chatcore_every > 0 and (last_step or (step > 0 and step % args.chatcore_every == 0)):
            model.eval()
            engine = Engine(orig_model, tokenizer)
            categorical_tasks = ('ARC-Easy', 'ARC-Challenge', 'MMLU')  # a tuple: the sums below add in a fixed order
            task_results = {}
            for task_name in ALL_TASKS:
                limit = args.chatcore_max_cat if task_name in categorical_tasks else args.chatcore_max_sample
                max_problems = None if limit < 0 else limit  # -1 = every problem
                acc = run_chat_eval(task_name, orig_model, tokenizer, engine,
                                    batch_size=args.device_batch_size, max_problems=max_problems)
                task_results[task_name] = acc
                print0(f"  {task_name}: {100*acc:.2f}%")
            # mean centered accuracy: 0 = random guessing, 1 = perfect
            def centered_mean(tasks):
                return sum(centered_accuracy(t, task_results[t]) for t in tasks) / len(tasks)
            chatcore = centered_mean(ALL_TASKS)
            chatcore_cat = centered_mean(categorical_tasks)
            print0(f"Step {step:05d} | ChatCORE: {chatcore:.4f} | ChatCORE_cat: {chatcore_cat:.4f}")
            wandb_run.log({
                "step": step,
                "total_training_flops": flops_so_far,
                "chatcore_metric": chatcore,
                "chatcore_cat": chatcore_cat,
                **{f"chatcore/{task_name}": acc for task_name, acc in task_results.items()},
            })
            model.train()

        # Checkpoint once, at the end (every rank saves its own optimizer shard)
        if last_step:
            output_dirname = args.model_tag if args.model_tag else f"d{depth}"
            checkpoint_dir = os.path.join(base_dir, "chatsft_checkpoints", output_dirname)
            save_checkpoint(
                checkpoint_dir,
                step,
                orig_model.state_dict(),
                optimizer.state_dict(),
                {
                    "step": step,
                    "val_bpb": val_bpb,  # at the last step
                    "model_config": {
                        "sequence_len": args.max_seq_len,
                        "vocab_size": tokenizer.get_vocab_size(),
                        "n_layer": depth,
                        "n_head": model.config.n_head,
                        "n_kv_head": model.config.n_kv_head,
                        "n_embd": model.config.n_embd,
                        "window_pattern": model.config.window_pattern,
                    },
                    "user_config": user_config,  # the flags as given, before inheritance
                },
                rank=ddp_rank,
            )

        if last_step:
            break

        # ---------------------------------------------------------------------
        # One optimization step
        synchronize()
        t0 = time.time()
        for micro_step in range(grad_accum_steps):
            loss = model(x, y)
            train_loss = loss.detach()  # for logging
            loss = loss / grad_accum_steps  # backward() sums gradients, so average here
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
            x, y = next(train_loader)  # fetch the next batch while the device works
            progress = max(progress, epoch_progress.approx_progress)
        lrm = get_lr_multiplier(progress, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        muon_momentum = get_muon_momentum(step)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group['kind'] == 'muon':
                group["momentum"] = muon_momentum
        if scaler is not None:
            scaler.unscale_(optimizer)
            # every rank must agree on whether to skip the step
            if is_ddp_initialized():
                for v in scaler._found_inf_per_device(optimizer).values():
                    dist.all_reduce(v, op=dist.ReduceOp.MAX)
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        synchronize()
        t1 = time.time()
        dt = t1 - t0
        # ---------------------------------------------------------------------

        step += 1

        # Logging
        train_loss_f = train_loss.item()
        train_losses.append(train_loss_f)
        smooth_train_loss = ema_beta * smooth_train_loss + (1 - ema_beta) * train_loss_f
        debiased_smooth_loss = smooth_train_loss / (1 - ema_beta**(step + 1))
        pct_done = 100 * progress
        tok_per_sec = int(args.total_batch_size / dt)
        flops_per_sec = num_flops_per_token * args.total_batch_size / dt
        mfu = 100 * flops_per_sec / (gpu_peak_flops * ddp_world_size)
        if step > 10:
            total_training_time += dt  # the first steps include compilation and warm-up
        # ETA from the wall clock so far (evals included) and the fraction of the data consumed
        eta = f"{(time.time() - sft_wall_start) * (1 - progress) / progress / 60:.1f}m" if progress > 0 else "?"
        print0(f"step {step:05d} ({pct_done:.2f}%) | loss: {debiased_smooth_loss:.6f} | lrm: {lrm:.2f} | dt: {dt * 1000:.2f}ms | tok/sec: {tok_per_sec:,} | mfu: {mfu:.2f} | epoch: {epoch_progress.current_epoch} | total time: {total_training_time/60:.2f}m | eta: {eta}")
        if step % 10 == 0:
            wandb_run.log({
                "step": step,
                "total_training_flops": flops_so_far,
                "total_training_time": total_training_time,
                "train/loss": debiased_smooth_loss,
                "train/lrm": lrm,
                "train/dt": dt,
                "train/tok_per_sec": tok_per_sec,
                "train/mfu": mfu,
                "train/epoch": epoch_progress.current_epoch,
            })

        # Python's cyclic GC can pause for ~500ms at a time; after setup we freeze what
        # exists and turn it off (main() turns it back on when training returns)
        if step == 1:
            gc.collect()
            gc.freeze()
            gc.disable()
        elif step % 5000 == 0:
            gc.collect()

    print0(f"Peak memory usage: {get_max_memory() / 1024 / 1024:.2f}MiB")
    print0(f"Total training time: {total_training_time/60:.2f}m")
    print0(f"Minimum validation bpb: {min_val_bpb:.4f}")
    wandb_run.finish()
    return {
        "step": step,
        "val_bpb": val_bpb,
        "min_val_bpb": min_val_bpb,
        "train_losses": train_losses,
        "checkpoint_dir": checkpoint_dir,
        "total_training_time": total_training_time,
    }


def main(argv=None):
    """Command-line entry: parse flags, train, and turn bad input into one line on stderr."""
    args = build_parser().parse_args(argv)
    gc_was_enabled = gc.isenabled()
    try:
        return train_sft(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        if os.environ.get("NANOCHAT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
    finally:
        compute_cleanup()
        # the training loop switches the GC off; callers in the same process get it back
        if gc_was_enabled and not gc.isenabled():
            gc.unfreeze()
            gc.enable()


if __name__ == "__main__":
    main()
