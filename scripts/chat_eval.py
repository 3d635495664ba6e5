"""
Evaluate a chat model (after SFT or RL) on the ChatCORE tasks and print its accuracies.

Two kinds of task:
  categorical  multiple choice (ARC-Easy, ARC-Challenge, MMLU): one batched forward pass,
               then the answer is the choice letter with the highest logit at the
               position where the assistant starts to speak. No sampling.
  generative   open-ended (GSM8K, HumanEval): sample completions with the Engine and
               grade them with the task (an exact final number, or passing unit tests).
When all five tasks are evaluated, their accuracies are also folded into one number,
ChatCORE: the mean accuracy after centering each task on its random-guess baseline,
so 0 means "no better than chance" and 1 means "perfect".

Examples:

    python -m scripts.chat_eval -i sft -a ARC-Easy
    python -m scripts.chat_eval -i sft -a 'GSM8K|HumanEval' -x 50
    torchrun --nproc_per_node=8 -m scripts.chat_eval -- -i sft

Task data is downloaded from the HuggingFace hub on first use; with
NANOCHAT_TASK_FIXTURES=tasks/fixtures it is read from the small local fixture files instead.
Besides printing, rank 0 writes the numbers to <base_dir>/chat_eval/<source>_<tag>_<step>.json
(an addition of ours, read by scripts/report_card.py).

Ours beside upstream's: a CLI in main(argv) (tests call it) with one-line errors for a
task typo, a missing checkpoint or task data; the results file above; and a ValueError
when there is nothing to evaluate. The upstream-shaped functions come first.
"""

import os
import sys
import json
import argparse
from functools import partial
import torch
import torch.distributed as dist

from nanochat.common import compute_init, compute_cleanup, get_dist_info, print0, autodetect_device_type, get_base_dir
from nanochat.checkpoint_manager import load_model, find_largest_model, find_last_step
from nanochat.engine import Engine

from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.arc import ARC
from tasks.gsm8k import GSM8K

# -----------------------------------------------------------------------------
# Generative evaluation: one problem at a time, sample, grade

def run_generative_eval(task_object, tokenizer, model, engine, num_samples, max_new_tokens, temperature, top_k, max_problems=None):
    """
    Fraction of problems where at least one of num_samples sampled completions is graded
    correct (pass@num_samples). Under torchrun, rank r takes problems r, r+W, r+2W, ...
    """
    ddp, ddp_rank, ddp_local_rank, ddp_world_size = get_dist_info()
    device = model.get_device()

    num_problems = len(task_object) if max_problems is None else min(len(task_object), max_problems)

    num_passed, total = 0, 0
    for i in range(ddp_rank, num_problems, ddp_world_size):
        conversation = task_object[i]

        encoded_prompt = tokenizer.render_for_completion(conversation)
        results, _ = engine.generate_batch(
            encoded_prompt,
            num_samples=num_samples,
            max_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
        )
        # each sequence starts with the prompt; only what follows it is the model's answer
        prefix_length = len(encoded_prompt)
        completions = [tokenizer.decode(result_tokens[prefix_length:]) for result_tokens in results]
        outcomes = [task_object.evaluate(conversation, completion) for completion in completions]
        passed = any(outcomes)

        total += 1
        num_passed += int(passed)

        # a progress counter that rewrites its own console line
        print(f"\r\033[KRank {ddp_rank} | {num_passed}/{total} ({100*num_passed/total:.2f}%)", end='', flush=True)

    # end the progress line
    print()

    # every rank graded its own share of problems: add the counts up
    if ddp:
        num_passed_tensor = torch.tensor([num_passed], dtype=torch.long, device=device)
        total_tensor = torch.tensor([total], dtype=torch.long, device=device)
        dist.all_reduce(num_passed_tensor, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_tensor, op=dist.ReduceOp.SUM)
        num_passed = num_passed_tensor.item()
        total = total_tensor.item()

    if total == 0:  # ours: a ValueError instead of a ZeroDivisionError
        raise ValueError(f"{type(task_object).__name__} has no problems to evaluate "
                         f"(max_problems={max_problems}); pass a positive -x/--max-problems")
    print0("=" * 50)
    print0(f"Final: {num_passed}/{total} ({100*num_passed/total:.2f}%)")

    return num_passed/total

# -----------------------------------------------------------------------------
# Categorical evaluation: no sampling needed, so whole batches of problems go through
# one forward pass and we read off the logits of the allowed answer letters.

def run_categorical_eval(task_object, tokenizer, model, batch_size, max_problems=None):
    """
    Fraction of multiple-choice problems where, among the problem's own letters, the
    model gives the highest logit to the correct one. The logits are read at the last
    prompt token (<|assistant_start|>), i.e. the prediction of the assistant's first token.
    """
    ddp, ddp_rank, ddp_local_rank, ddp_world_size = get_dist_info()
    device = model.get_device()
    # prompts differ in length; BOS fills the gap on the right, and since we only read
    # logits at each prompt's own last position, whatever sits after it cannot matter
    bos = tokenizer.get_bos_token_id()

    num_problems = len(task_object) if max_problems is None else min(len(task_object), max_problems)
    ceil_div = lambda x, y: -(-x // y)
    num_batches = ceil_div(num_problems, batch_size)

    letter_to_id_cache = {} # the same few letters come up over and over
    num_passed, total = 0, 0
    for i in range(ddp_rank, num_batches, ddp_world_size):
        i0, i1 = i * batch_size, min((i + 1) * batch_size, num_problems)

        conversations = [task_object[ii] for ii in range(i0, i1)]
        prompt_ids = [tokenizer.render_for_completion(conversation) for conversation in conversations]
        max_length = max(len(ids) for ids in prompt_ids)
        answer_time_positions = [len(ids) - 1 for ids in prompt_ids] # each prompt's last token predicts the answer
        padded_prompt_ids = [ids + [bos] * (max_length - len(ids)) for ids in prompt_ids]
        prompt_ids = torch.tensor(padded_prompt_ids, dtype=torch.long, device=device)

        with torch.no_grad():
            logits = model(prompt_ids) # (B, T, V)

        # restricting the argmax to the allowed letters makes the task much easier than
        # free generation, which is the usual convention for multiple-choice evals
        for idx, conversation in enumerate(conversations):
            letters = conversation['letters']
            letter_ids = []
            for letter in letters:
                if not letter in letter_to_id_cache:
                    encoded_letter = tokenizer.encode(letter)
                    if len(encoded_letter) != 1:  # ours: a ValueError naming the letter, not an assert
                        raise ValueError(f"answer letter {letter!r} encodes to {len(encoded_letter)} tokens, "
                                         f"but categorical evaluation needs each letter to be one token")
                    letter_to_id_cache[letter] = encoded_letter[0]
                letter_ids.append(letter_to_id_cache[letter])
            answer_pos = answer_time_positions[idx]
            focus_logits = logits[idx, answer_pos, letter_ids]
            argmax_letter_id = focus_logits.argmax(dim=-1).item()
            predicted_letter = letters[argmax_letter_id]
            outcome = task_object.evaluate(conversation, predicted_letter)
            num_passed += int(outcome)
            total += 1

    if ddp:
        num_passed_tensor = torch.tensor([num_passed], dtype=torch.long, device=device)
        total_tensor = torch.tensor([total], dtype=torch.long, device=device)
        dist.all_reduce(num_passed_tensor, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_tensor, op=dist.ReduceOp.SUM)
        num_passed = num_passed_tensor.item()
        total = total_tensor.item()

    if total == 0:  # ours
        raise ValueError(f"{type(task_object).__name__} has no problems to evaluate "
                         f"(max_problems={max_problems}); pass a positive -x/--max-problems")
    average = num_passed/total
    print0(f"Final: {num_passed}/{total} ({100*average:.2f}%)")
    return average

# -----------------------------------------------------------------------------

def run_chat_eval(task_name, model, tokenizer, engine,
                   batch_size=1, num_samples=1, max_new_tokens=512, temperature=0.0, top_k=50,
                   max_problems=None):
    """Accuracy of the model on one ChatCORE task (a name from ALL_TASKS)."""
    check_task_names([task_name])  # ours: a ValueError naming the choices, not a KeyError
    task_module = TASK_BUILDERS[task_name]
    task_object = task_module()
    if task_object.eval_type == 'generative':
        acc = run_generative_eval(task_object, tokenizer, model, engine, num_samples, max_new_tokens, temperature, top_k, max_problems=max_problems)
    elif task_object.eval_type == 'categorical':
        acc = run_categorical_eval(task_object, tokenizer, model, batch_size, max_problems=max_problems)
    else:
        raise ValueError(f"Unsupported task evaluation type: {task_object.eval_type}")
    return acc

# -----------------------------------------------------------------------------
# Ours: the task table at module level (chat_sft evaluates with it too), the checks that
# run before a model is loaded, and the CLI as a function

# the five ChatCORE tasks, in the order they are run by default
ALL_TASKS = ['ARC-Easy', 'ARC-Challenge', 'MMLU', 'GSM8K', 'HumanEval']
# accuracy of random guessing: 1 in 4 for the multiple-choice tasks, ~0 for open-ended ones
BASELINE_ACCURACIES = {
    'ARC-Easy': 0.25,
    'ARC-Challenge': 0.25,
    'MMLU': 0.25,
    'GSM8K': 0.0,
    'HumanEval': 0.0,
}
# how to build each task's evaluation split
TASK_BUILDERS = {
    'HumanEval': HumanEval,
    'MMLU': partial(MMLU, subset="all", split="test"),
    'ARC-Easy': partial(ARC, subset="ARC-Easy", split="test"),
    'ARC-Challenge': partial(ARC, subset="ARC-Challenge", split="test"),
    'GSM8K': partial(GSM8K, subset="main", split="test"),
}


def check_task_names(task_names):
    """Raise a ValueError naming any task we do not know, so a typo fails before a model is loaded."""
    unknown = [name for name in task_names if name not in TASK_BUILDERS]
    if unknown:
        raise ValueError(f"unknown task name(s) {', '.join(repr(n) for n in unknown)}; "
                         f"choose from {', '.join(ALL_TASKS)} (separate several with '|')")


def centered_accuracy(task_name, accuracy):
    """Map a task's random-guess accuracy to 0 and a perfect score to 1."""
    baseline_acc = BASELINE_ACCURACIES[task_name]
    return (accuracy - baseline_acc) / (1.0 - baseline_acc)


# where each -i/--source keeps its checkpoints, under the base dir (load_model's layout)
CHECKPOINT_DIRS = {"base": "base_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}


def _resolve_checkpoint(source, model_tag, step):
    """Fill in the model tag and step the way load_model would guess them, so we can name the results."""
    if source not in CHECKPOINT_DIRS:
        raise ValueError(f"unknown model source {source!r} for -i/--source; use sft or rl (or base)")
    checkpoints_dir = os.path.join(get_base_dir(), CHECKPOINT_DIRS[source])
    if model_tag is None:
        model_tag = find_largest_model(checkpoints_dir)
    if step is None:
        step = find_last_step(os.path.join(checkpoints_dir, model_tag))
    return model_tag, step


def build_parser():
    parser = argparse.ArgumentParser(description="Evaluate a chat model on the ChatCORE tasks")
    parser.add_argument('-i', '--source', type=str, required=True, help="Source of the model: sft|rl")
    parser.add_argument('-a', '--task-name', type=str, default=None, help="Task name. Default = all tasks. Use | to split multiple tasks.")
    parser.add_argument('-t', '--temperature', type=float, default=0.0)
    parser.add_argument('-m', '--max-new-tokens', type=int, default=512)
    parser.add_argument('-n', '--num-samples', type=int, default=1)
    parser.add_argument('-k', '--top-k', type=int, default=50)
    parser.add_argument('-b', '--batch-size', type=int, default=8, help='Batch size for categorical evaluation')
    parser.add_argument('-g', '--model-tag', type=str, default=None, help='Model tag to load')
    parser.add_argument('-s', '--step', type=int, default=None, help='Step to load')
    parser.add_argument('-x', '--max-problems', type=int, default=None, help='Max problems to evaluate')
    parser.add_argument('--device-type', type=str, default='', choices=['cuda', 'cpu', 'mps'], help='Device type for evaluation: cuda|cpu|mps. empty => autodetect')
    return parser


def main(argv=None):
    """Run the evaluation; returns {"results": {task: accuracy}, "chatcore": float or None}."""
    args = build_parser().parse_args(argv)
    task_names = ALL_TASKS if args.task_name is None else args.task_name.split('|')
    try:
        # everything that can fail on bad input, before the long part
        check_task_names(task_names)
        device_type = autodetect_device_type() if args.device_type == "" else args.device_type
        ddp, ddp_rank, ddp_local_rank, ddp_world_size, device = compute_init(device_type)
        model_tag, step = _resolve_checkpoint(args.source, args.model_tag, args.step)
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=model_tag, step=step)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        if os.environ.get("NANOCHAT_DEBUG"):
            raise
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        compute_cleanup()
        raise SystemExit(1)
    engine = Engine(model, tokenizer)

    try:
        results = {}
        for task_name in task_names:
            acc = run_chat_eval(
                task_name,
                model, tokenizer, engine,
                batch_size=args.batch_size,
                num_samples=args.num_samples,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                max_problems=args.max_problems,
            )
            results[task_name] = acc
            print0(f"{task_name} accuracy: {100 * acc:.2f}%")

        # ChatCORE only makes sense over the full set of tasks, like CORE for base models: the
        # mean centered accuracy, 0 at the random baseline and 1 at peak performance
        all_tasks_were_evaluated = all(task_name in results for task_name in ALL_TASKS)
        chatcore_metric = None
        if all_tasks_were_evaluated:
            centered_mean = 0
            for task_name, acc in results.items():
                centered_acc = centered_accuracy(task_name, acc)
                centered_mean += centered_acc
            chatcore_metric = centered_mean / len(results)
            print0(f"ChatCORE metric: {chatcore_metric:.4f}")

        if ddp_rank == 0:  # ours: the results file
            out_dir = os.path.join(get_base_dir(), "chat_eval")
            os.makedirs(out_dir, exist_ok=True)
            out_path = os.path.join(out_dir, f"{args.source}_{model_tag}_{step:06d}.json")
            record = {"source": args.source, "model_tag": model_tag, "step": step,
                      "results": results, "chatcore": chatcore_metric, "args": vars(args)}
            with open(out_path, "w", encoding="utf-8") as f:
                json.dump(record, f, indent=2)
            print0(f"Results written to: {out_path}")
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        # e.g. task data that cannot be downloaded, or a fixture file that is missing
        if os.environ.get("NANOCHAT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
    finally:
        compute_cleanup()
    return {"results": results, "chatcore": chatcore_metric}


if __name__ == "__main__":
    main()
