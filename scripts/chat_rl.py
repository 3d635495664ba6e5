"""
Reinforcement learning on GSM8K, starting from the SFT model.

Called "GRPO", but what remains after simplifying is close to plain REINFORCE:
  1) no KL penalty towards a reference model (no trust region);
  2) strictly on-policy, so no PPO importance ratio or clipping;
  3) the policy-gradient sum is normalized per token (DAPO style), not per sequence;
  4) the advantage is the reward minus the mean reward of the question's samples
     (no division by their standard deviation).

For each question we sample --num-samples answers, reward each 1/0 by whether its
final number is right, and push up the log-probability of the sampled tokens in
proportion to the advantage. Tokens the calculator tool forced and the prompt are
not trained on. Checkpoints go to <base_dir>/chatrl_checkpoints/<model_tag>/.

1 GPU:
    python -m scripts.chat_rl

8 GPUs:
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl -- --run=default

Offline: NANOCHAT_TASK_FIXTURES=tasks/fixtures reads GSM8K from the local fixture rows.
"""

import os
import sys
import argparse
import itertools

import torch
import torch.distributed as dist

from nanochat.common import compute_init, compute_cleanup, print0, get_base_dir, get_dist_info, DummyWandb, autodetect_device_type
from nanochat.checkpoint_manager import save_checkpoint, load_model
from nanochat.engine import Engine
from tasks.gsm8k import GSM8K

# -----------------------------------------------------------------------------
# CLI arguments


def build_parser():
    parser = argparse.ArgumentParser(description="Reinforcement learning on GSM8K")
    # Logging
    parser.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb logging)")
    # Runtime
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    # Model loading
    parser.add_argument("--model-tag", type=str, default=None, help="model tag to load from")
    parser.add_argument("--model-step", type=int, default=None, help="model step to load from")
    # Training horizon
    parser.add_argument("--num-epochs", type=int, default=1, help="number of epochs over GSM8K")
    # Batch sizes / sampling
    parser.add_argument("--device-batch-size", type=int, default=8, help="max batch size per forward pass")
    parser.add_argument("--examples-per-step", type=int, default=16, help="total examples per optimization step across all ranks")
    parser.add_argument("--num-samples", type=int, default=16, help="number of samples per example/question")
    # Generation
    parser.add_argument("--max-new-tokens", type=int, default=256, help="max tokens to generate per sample")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--top-k", type=int, default=50, help="top-k sampling (0 = disabled)")
    # Optimization
    parser.add_argument("--embedding-lr", type=float, default=0.2, help="learning rate for embedding parameters (Adam)")
    parser.add_argument("--unembedding-lr", type=float, default=0.004, help="learning rate for unembedding parameters (Adam)")
    parser.add_argument("--matrix-lr", type=float, default=0.02, help="learning rate for matrix parameters (Muon)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="weight decay for embedding/unembedding parameters (Adam)")
    parser.add_argument("--init-lr-frac", type=float, default=0.05, help="initial LR as fraction of base LR")
    # Evaluation / checkpointing
    parser.add_argument("--eval-every", type=int, default=60, help="evaluate pass@k every N steps")
    parser.add_argument("--eval-examples", type=int, default=400, help="number of examples for pass@k evaluation")
    parser.add_argument("--save-every", type=int, default=60, help="save checkpoint every N steps")
    return parser

# -----------------------------------------------------------------------------
# Evaluation: pass@k on GSM8K


def run_gsm8k_eval(task, tokenizer, engine,
                   max_examples=None,
                   num_samples=1,
                   max_completion_tokens=256,
                   temperature=0.0,
                   top_k=50):
    """
    Yield one record per evaluated problem: {"idx": i, "outcomes": [{"is_correct": ...}, ...]}
    with one outcome per sample. Under torchrun each rank yields only its own problems
    (r, r+W, ...); adding the counts up across ranks is the caller's job.
    """
    _, ddp_rank, _, ddp_world_size = get_dist_info()
    max_examples = min(max_examples, len(task)) if max_examples is not None else len(task)
    for idx in range(ddp_rank, max_examples, ddp_world_size):
        conversation = task[idx]
        tokens = tokenizer.render_for_completion(conversation)
        prefix_length = len(tokens)
        generated_token_sequences, _ = engine.generate_batch(
            tokens,
            num_samples=num_samples,
            max_tokens=max_completion_tokens,
            temperature=temperature,
            top_k=top_k,
        )
        outcomes = []
        for sample_tokens in generated_token_sequences:
            generated_text = tokenizer.decode(sample_tokens[prefix_length:])
            outcomes.append({"is_correct": task.evaluate(conversation, generated_text)})
        yield {"idx": idx, "outcomes": outcomes}

# -----------------------------------------------------------------------------
# Training


def train_rl(args):
    """Run RL with parsed flags. Returns a summary dict (steps, mean rewards, losses, checkpoint dir)."""
    user_config = vars(args).copy()

    device_type = autodetect_device_type() if args.device_type == "" else args.device_type
    ddp, ddp_rank, ddp_local_rank, ddp_world_size, device = compute_init(device_type)
    master_process = ddp_rank == 0  # logs and saves

    # bad sampling settings would otherwise surface later as an empty batch or a silent no-op
    if args.device_batch_size < 1 or args.num_samples < 1 or args.num_samples % args.device_batch_size != 0:
        raise ValueError(f"--num-samples={args.num_samples} must be a positive multiple of "
                         f"--device-batch-size={args.device_batch_size} (samples are drawn that many at a time)")
    if args.examples_per_step % ddp_world_size != 0:
        raise ValueError(f"--examples-per-step={args.examples_per_step} must be divisible by the number of "
                         f"ranks ({ddp_world_size})")

    if args.run == "dummy" or not master_process:
        wandb_run = DummyWandb()
    else:
        import wandb  # only needed (and only slow to import) when actually logging
        wandb_run = wandb.init(project="nanochat-rl", name=args.run, config=user_config)

    model, tokenizer, meta = load_model("sft", device, phase="eval", model_tag=args.model_tag, step=args.model_step)
    engine = Engine(model, tokenizer)  # samples the rollouts

    train_task = GSM8K(subset="main", split="train")
    val_task = GSM8K(subset="main", split="test")
    num_steps = (len(train_task) // args.examples_per_step) * args.num_epochs
    print0(f"Calculated number of steps: {num_steps}")
    if num_steps == 0:
        raise ValueError(f"0 training steps: GSM8K train has {len(train_task)} examples, fewer than "
                         f"--examples-per-step={args.examples_per_step} (or --num-epochs={args.num_epochs} is 0); "
                         f"lower --examples-per-step")

    step = 0  # the loop below advances it; the rollout generator reads it for its seeds

    @torch.no_grad()
    def get_batch():
        """
        Endless rollouts, one training question at a time: yields (sequences, inputs,
        targets, rewards, advantages) for that question's num_samples samples.
        """
        # pads the samples to a common length; it never reaches the loss (target -1)
        assistant_end = tokenizer.encode_special("<|assistant_end|>")
        rank_indices = range(ddp_rank, len(train_task), ddp_world_size)  # each rank has its own questions
        for example_idx in itertools.cycle(rank_indices):
            conversation = train_task[example_idx]
            # the prompt: everything up to and including <|assistant_start|>
            tokens = tokenizer.render_for_completion(conversation)
            prefix_length = len(tokens)

            # sample device_batch_size at a time, to bound memory
            model.eval()
            generated_token_sequences = []
            masks = []
            num_sampling_steps = args.num_samples // args.device_batch_size
            for sampling_step in range(num_sampling_steps):
                # a distinct seed for every (step, question, chunk); ints hash the same in every process
                seed = hash((step, example_idx, sampling_step)) & 0x7FFFFFFF
                sequences_batch, masks_batch = engine.generate_batch(
                    tokens,
                    num_samples=args.device_batch_size,
                    max_tokens=args.max_new_tokens,
                    temperature=args.temperature,
                    top_k=args.top_k,
                    seed=seed,
                )
                generated_token_sequences.extend(sequences_batch)
                masks.extend(masks_batch)

            rewards = []
            for sample_tokens in generated_token_sequences:
                generated_text = tokenizer.decode(sample_tokens[prefix_length:])
                rewards.append(train_task.reward(conversation, generated_text))

            # right-pad to a rectangle; padding gets mask 0
            max_length = max(len(seq) for seq in generated_token_sequences)
            padded_sequences = [seq + [assistant_end] * (max_length - len(seq)) for seq in generated_token_sequences]
            padded_masks = [mask + [0] * (max_length - len(mask)) for mask in masks]
            ids = torch.tensor(padded_sequences, dtype=torch.long, device=device)
            mask_ids = torch.tensor(padded_masks, dtype=torch.long, device=device)
            inputs = ids[:, :-1]
            targets = ids[:, 1:].clone()  # a copy, because the next line writes into it
            # The Engine's mask is 0 on the prompt and on tokens the calculator forced, so
            # only tokens the policy itself sampled are trained on.
            targets[mask_ids[:, 1:] == 0] = -1
            rewards = torch.tensor(rewards, dtype=torch.float, device=device)
            # advantage = reward minus the mean over this question's samples (no std scaling)
            mu = rewards.mean()
            advantages = rewards - mu
            yield generated_token_sequences, inputs, targets, rewards, advantages

    optimizer = model.setup_optimizer(
        unembedding_lr=args.unembedding_lr,
        embedding_lr=args.embedding_lr,
        matrix_lr=args.matrix_lr,
        weight_decay=args.weight_decay,
    )
    # start from a small fraction of the base learning rates
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * args.init_lr_frac
        group["initial_lr"] = group["lr"]

    def get_lr_multiplier(it):
        # linear decay to zero over the run
        return 1.0 - it / num_steps

    print0(f"Total sequences per step: {args.examples_per_step * args.num_samples}")
    examples_per_rank = args.examples_per_step // ddp_world_size
    print0(f"Calculated examples per rank: {examples_per_rank}")

    batch_iterator = get_batch()
    mean_rewards, losses = [], []
    checkpoint_dir = None
    for step in range(num_steps):

        # pass@k on the test split, for k = 1..device_batch_size
        if step % args.eval_every == 0:
            model.eval()
            passk = torch.zeros(args.device_batch_size, device=device)
            records = list(run_gsm8k_eval(val_task, tokenizer, engine, num_samples=args.device_batch_size,
                                          max_examples=args.eval_examples, temperature=1.0))
            for k in range(1, args.device_batch_size + 1):
                passk[k - 1] = sum(any(o["is_correct"] for o in r["outcomes"][:k]) for r in records)
            num_records = torch.tensor(len(records), dtype=torch.long, device=device)
            if ddp:
                dist.all_reduce(num_records, op=dist.ReduceOp.SUM)
                dist.all_reduce(passk, op=dist.ReduceOp.SUM)
            passk = passk / num_records.item()
            print_passk = [f"Pass@{k}: {passk[k - 1].item():.4f}" for k in range(1, args.device_batch_size + 1)]
            print0(f"Step {step} | {', '.join(print_passk)}")
            wandb_run.log({
                "step": step,
                **{f"pass@{k}": passk[k - 1].item() for k in range(1, args.device_batch_size + 1)},
            })

        # rollouts and policy-gradient backward passes, gradients summed over examples
        rewards_list = []
        sequence_lengths = []
        for example_step in range(examples_per_rank):
            sequences_all, inputs_all, targets_all, rewards_all, advantages_all = next(batch_iterator)
            model.train()
            # the samples of one question may exceed device_batch_size: go in slices
            num_passes = inputs_all.size(0) // args.device_batch_size
            for pass_idx in range(num_passes):
                b0, b1 = pass_idx * args.device_batch_size, (pass_idx + 1) * args.device_batch_size
                inputs = inputs_all[b0:b1]
                targets = targets_all[b0:b1]
                rewards = rewards_all[b0:b1]
                advantages = advantages_all[b0:b1]
                # the model returns per-token NLL = -log p (0 where the target is -1)
                logp = -model(inputs, targets, loss_reduction='none').view_as(inputs)  # (B, T)
                pg_obj = (logp * advantages.unsqueeze(-1)).sum()
                # per-token normalization, and an average over the passes and examples of this step
                num_valid = (targets >= 0).sum().clamp(min=1)
                pg_obj = pg_obj / (num_valid * num_passes * examples_per_rank)
                # on-policy, so no importance ratio or clipping; we minimize the negative objective
                loss = -pg_obj
                loss.backward()
                losses.append(loss.item())
                print0(f"Step {step}/{num_steps} | Example step {example_step} | Pass {pass_idx} | loss: {loss.item():.6f} | Average reward: {rewards.mean().item()}")
            rewards_list.append(rewards_all.mean().item())
            sequence_lengths.extend(len(seq) for seq in sequences_all)

        mean_reward = sum(rewards_list) / len(rewards_list)
        mean_sequence_length = sum(sequence_lengths) / len(sequence_lengths)
        if ddp:
            mean_reward_tensor = torch.tensor(mean_reward, dtype=torch.float, device=device)
            mean_sequence_length_tensor = torch.tensor(mean_sequence_length, dtype=torch.float, device=device)
            dist.all_reduce(mean_reward_tensor, op=dist.ReduceOp.AVG)
            dist.all_reduce(mean_sequence_length_tensor, op=dist.ReduceOp.AVG)
            mean_reward = mean_reward_tensor.item()
            mean_sequence_length = mean_sequence_length_tensor.item()
        mean_rewards.append(mean_reward)
        print0(f"Step {step}/{num_steps} | Average reward: {mean_reward} | Average sequence length: {mean_sequence_length:.2f}")
        wandb_run.log({
            "step": step,
            "reward": mean_reward,
            "sequence_length": mean_sequence_length,
        })

        lrm = get_lr_multiplier(step)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
        optimizer.step()
        model.zero_grad(set_to_none=True)
        wandb_run.log({
            "step": step,
            "lrm": lrm,
        })

        # save every save_every steps (not at step 0) and always at the last step;
        # the optimizer state is not kept
        if master_process and ((step > 0 and step % args.save_every == 0) or step == num_steps - 1):
            depth = model.config.n_layer
            output_dirname = args.model_tag if args.model_tag else f"d{depth}"
            checkpoint_dir = os.path.join(get_base_dir(), "chatrl_checkpoints", output_dirname)
            save_checkpoint(
                checkpoint_dir,
                step,
                model.state_dict(),
                None,
                {"model_config": dict(model.config.__dict__)},
            )
            print(f"✅ Saved model checkpoint to {checkpoint_dir}")

    wandb_run.finish()
    return {"num_steps": num_steps, "mean_rewards": mean_rewards, "losses": losses, "checkpoint_dir": checkpoint_dir}


def main(argv=None):
    """Command-line entry: parse flags, train, and turn bad input into one line on stderr."""
    args = build_parser().parse_args(argv)
    try:
        return train_rl(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        if os.environ.get("NANOCHAT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
    finally:
        compute_cleanup()


if __name__ == "__main__":
    main()
