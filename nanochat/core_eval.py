"""
The CORE metric of the DCLM paper (https://arxiv.org/abs/2406.11794): in-context-learning
accuracy of a base model on a fixed set of tasks, each task scored in one of three ways.

- multiple_choice: one query, several candidate answers. Each "query + answer" is scored
  by the mean loss of the answer tokens; the lowest-loss answer is the prediction.
- schema: several candidate contexts, one shared continuation. Each "context +
  continuation" is scored by the mean loss of the continuation tokens; lowest wins.
- language_modeling: one context, one continuation; correct only if greedy argmax
  decoding reproduces every continuation token.

Few-shot examples are drawn from the same task data (never the item itself) with a
per-item seeded RNG, so the prompts are identical on every run and every rank.

Ours beside upstream's: the prompt text is assembled with plain string formatting (no
jinja2 dependency); it is byte-for-byte what upstream's Jinja templates produce
("<shot>\n\n" per few-shot example, then the item). Bad input (a direction, too few
examples for the shots) is one ValueError line. And at the end, the CORE driver (locating
the eval bundle, evaluate_core), which upstream keeps in scripts/base_eval.py; the library
must never import scripts/ (the wheel has none).
"""
import os
import csv
import json
import time
import random
import shutil
import zipfile
import tempfile

import yaml
import torch
import torch.distributed as dist

from nanochat.common import print0, get_base_dir, download_file_with_lock

# -----------------------------------------------------------------------------
# Prompt rendering

def render_prompts_mc(item, continuation_delimiter, fewshot_examples=None):
    """One prompt per choice: few-shot examples (with their gold answer), then query + choice."""
    fewshot_examples = fewshot_examples or []
    prefix = _fewshot_prefix(f"{example['query']}{continuation_delimiter}{example['choices'][example['gold']]}"
                             for example in fewshot_examples)
    prompts = [f"{prefix}{item['query']}{continuation_delimiter}{choice}" for choice in item['choices']]
    return prompts


def render_prompts_schema(item, continuation_delimiter, fewshot_examples=None):
    """One prompt per context option, each ending in the item's shared continuation."""
    fewshot_examples = fewshot_examples or []
    prefix = _fewshot_prefix(f"{example['context_options'][example['gold']]}{continuation_delimiter}{example['continuation']}"
                             for example in fewshot_examples)
    prompts = [f"{prefix}{context_option}{continuation_delimiter}{item['continuation']}"
               for context_option in item['context_options']]
    return prompts


def render_prompts_lm(item, continuation_delimiter, fewshot_examples=None):
    """
    Two prompts: [without the continuation, with it]. Contexts are stripped of surrounding
    whitespace (some datasets carry trailing spaces).
    """
    fewshot_examples = fewshot_examples or []
    prefix = _fewshot_prefix(f"{str(example['context']).strip()}{continuation_delimiter}{example['continuation']}"
                             for example in fewshot_examples)
    prompt_without = f"{prefix}{str(item['context']).strip()}{continuation_delimiter}"
    prompt_with = f"{prompt_without}{item['continuation']}"
    # stripped once more: a trailing space here would merge into the first continuation token
    # of prompt_with, and then "without" would no longer be a token prefix of "with"
    prompt_without = prompt_without.strip()
    return [prompt_without, prompt_with]


def _fewshot_prefix(shots):
    # ours: what upstream's template loop renders, each few-shot example followed by a blank line
    return "".join(f"{shot}\n\n" for shot in shots)

# -----------------------------------------------------------------------------
# Tokenizing and batching

def find_common_length(token_sequences, direction='left'):
    """Length of the prefix ('left') or suffix ('right') shared by all token sequences."""
    if direction not in ('left', 'right'):  # ours: a ValueError, not a KeyError
        raise ValueError(f"direction must be 'left' or 'right', got {direction!r}")
    min_len = min(len(seq) for seq in token_sequences)
    indices = {
        'left': range(min_len),
        'right': range(-1, -min_len-1, -1)
    }[direction]
    # the first position at which some sequence differs from the first one
    for i, idx in enumerate(indices):
        token = token_sequences[0][idx]
        if not all(seq[idx] == token for seq in token_sequences):
            return i
    return min_len


def stack_sequences(tokens, pad_token_id):
    """(B, T_max) long tensor of the sequences, right-padded with pad_token_id."""
    bsz, seq_len = len(tokens), max(len(x) for x in tokens)
    input_ids = torch.full((bsz, seq_len), pad_token_id, dtype=torch.long)
    for i, x in enumerate(tokens):
        input_ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
    return input_ids


def batch_sequences_mc(tokenizer, prompts):
    # the choices share the query, so the answers start where the common token prefix ends
    tokens = tokenizer(prompts, prepend=tokenizer.get_bos_token_id())
    answer_start_idx = find_common_length(tokens, direction='left')
    start_indices = [answer_start_idx] * len(prompts)
    end_indices = [len(x) for x in tokens]
    return tokens, start_indices, end_indices


def batch_sequences_schema(tokenizer, prompts):
    # the options share the continuation, so it is the common token suffix of every prompt
    tokens = tokenizer(prompts, prepend=tokenizer.get_bos_token_id())
    suffix_length = find_common_length(tokens, direction='right')
    end_indices = [len(x) for x in tokens]
    start_indices = [ei - suffix_length for ei in end_indices]
    return tokens, start_indices, end_indices


def batch_sequences_lm(tokenizer, prompts):
    # [without, with] the continuation; the short one only marks where the continuation starts
    tokens = tokenizer(prompts, prepend=tokenizer.get_bos_token_id())
    tokens_without, tokens_with = tokens
    start_idx, end_idx = len(tokens_without), len(tokens_with)
    assert start_idx < end_idx, "prompt without is supposed to be a prefix of prompt with"
    assert tokens_without == tokens_with[:start_idx], "prompt without is supposed to be a prefix of prompt with"
    # so only the full prompt is forwarded: a batch of 1
    return [tokens_with], [start_idx], [end_idx]

# -----------------------------------------------------------------------------
# Scoring

@torch.no_grad()
def forward_model(model, input_ids):
    """
    Forward a (B, T) batch. Returns (losses, predictions), both (B, T): losses[:, t] is the
    cross-entropy of predicting input_ids[:, t+1] (NaN in the last column, which has no
    next token) and predictions[:, t] is the argmax token at position t.
    """
    batch_size, seq_len = input_ids.size()
    outputs = model(input_ids)
    # the target at position t is the input at t+1; the wrapped-around last column is masked below
    target_ids = torch.roll(input_ids, shifts=-1, dims=1)
    losses = torch.nn.functional.cross_entropy(
        outputs.view(batch_size * seq_len, -1),
        target_ids.view(batch_size * seq_len),
        reduction='none'
    ).view(batch_size, seq_len)
    losses[:, -1] = float('nan')
    predictions = outputs.argmax(dim=-1)
    return losses, predictions


@torch.no_grad()
def evaluate_example(idx, model, tokenizer, data, device, task_meta):
    """Evaluate data[idx] under task_meta; returns True if the model gets it right."""
    item = data[idx]
    task_type = task_meta['task_type']
    num_fewshot = task_meta['num_fewshot']
    continuation_delimiter = task_meta['continuation_delimiter']

    # few-shot examples: a seeded draw that never includes the item itself
    fewshot_examples = []
    if num_fewshot > 0:
        if num_fewshot >= len(data):  # ours: a ValueError naming the fix (random.sample would raise)
            raise ValueError(f"{num_fewshot}-shot evaluation needs at least {num_fewshot + 1} examples but the task "
                             f"has {len(data)}; raise --max-per-task or lower num_fewshot")
        rng = random.Random(1234 + idx)
        available_indices = [i for i in range(len(data)) if i != idx]
        fewshot_indices = rng.sample(available_indices, num_fewshot)
        fewshot_examples = [data[i] for i in fewshot_indices]

    if task_type == 'multiple_choice':
        prompts = render_prompts_mc(item, continuation_delimiter, fewshot_examples)
        tokens, start_idxs, end_idxs = batch_sequences_mc(tokenizer, prompts)
    elif task_type == 'schema':
        prompts = render_prompts_schema(item, continuation_delimiter, fewshot_examples)
        tokens, start_idxs, end_idxs = batch_sequences_schema(tokenizer, prompts)
    elif task_type == 'language_modeling':
        prompts = render_prompts_lm(item, continuation_delimiter, fewshot_examples)
        tokens, start_idxs, end_idxs = batch_sequences_lm(tokenizer, prompts)
    else:
        raise ValueError(f"Unsupported task type: {task_type!r}; expected multiple_choice, schema or language_modeling")

    # models with a hard context limit (e.g. GPT-2 wrappers) advertise it as max_seq_len:
    # keep the last max_tokens tokens of an over-long sequence and shift its scored span left
    if hasattr(model, 'max_seq_len') and model.max_seq_len is not None:
        max_tokens = model.max_seq_len
        new_tokens, new_start_idxs, new_end_idxs = [], [], []
        for t, s, e in zip(tokens, start_idxs, end_idxs):
            if len(t) > max_tokens:
                num_to_crop = len(t) - max_tokens
                new_tokens.append(t[-max_tokens:])
                new_start_idxs.append(s - num_to_crop)
                new_end_idxs.append(e - num_to_crop)
                assert s - num_to_crop >= 0, "cropping would cut into the scored continuation"
                assert e - num_to_crop >= 0, "cropping would cut into the scored continuation"
            else:
                new_tokens.append(t)
                new_start_idxs.append(s)
                new_end_idxs.append(e)
        tokens, start_idxs, end_idxs = new_tokens, new_start_idxs, new_end_idxs

    # BOS is a fine pad: padded positions lie after every scored span
    pad_token_id = tokenizer.get_bos_token_id()
    input_ids = stack_sequences(tokens, pad_token_id)
    input_ids = input_ids.to(device)

    losses, predictions = forward_model(model, input_ids)

    if task_type == 'language_modeling':
        # a batch of 1; the prediction made at position t is for token t+1
        si = start_idxs[0]
        ei = end_idxs[0]
        predicted_tokens = predictions[0, si-1:ei-1]
        actual_tokens = input_ids[0, si:ei]
        is_correct = torch.all(predicted_tokens == actual_tokens).item()
    elif task_type in ['multiple_choice', 'schema']:
        # the option whose scored span has the lowest mean loss wins
        mean_losses = [losses[i, si-1:ei-1].mean().item()
                        for i, (si, ei) in enumerate(zip(start_idxs, end_idxs))]
        pred_idx = mean_losses.index(min(mean_losses))
        is_correct = pred_idx == item['gold']
    else:
        raise ValueError(f"Unsupported task type: {task_type}")

    return is_correct


def evaluate_task(model, tokenizer, data, device, task_meta):
    """
    Accuracy (fraction correct) of the model on every example of one task. Under
    torch.distributed each rank takes every world_size-th example and the per-example
    results are summed across ranks, so all ranks return the same accuracy.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    correct = torch.zeros(len(data), dtype=torch.float32, device=device)
    for idx in range(rank, len(data), world_size):
        is_correct = evaluate_example(idx, model, tokenizer, data, device, task_meta)
        correct[idx] = float(is_correct)
    if world_size > 1:
        dist.barrier()
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    mean_correct = correct.mean().item()
    return mean_correct

# -----------------------------------------------------------------------------
# Ours: the CORE driver (eval bundle + evaluate_core), upstream's scripts/base_eval.py,
# in its order and with its local names. It lives here because nanochat.train (a library
# module) runs CORE during training and the installed package has no scripts/; base_eval
# imports it from here.

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
EVAL_BUNDLE_ENV = "NANOCHAT_EVAL_BUNDLE_DIR"  # ours: point CORE at an unpacked bundle
# what a bundle directory must contain (the layout of the upstream eval_bundle.zip)
EVAL_BUNDLE_FILES = ("core.yaml", "eval_meta_data.csv", "eval_data")


def place_eval_bundle(file_path):
    """Unpack a downloaded eval_bundle.zip into <base_dir>/eval_bundle."""
    base_dir = get_base_dir()
    eval_bundle_dir = os.path.join(base_dir, "eval_bundle")
    # unpack somewhere private first so a half-extracted bundle never appears under its real name
    with tempfile.TemporaryDirectory() as tmpdir:
        with zipfile.ZipFile(file_path, 'r') as zip_ref:
            zip_ref.extractall(tmpdir)
        extracted_bundle_dir = os.path.join(tmpdir, "eval_bundle")
        if not os.path.isdir(extracted_bundle_dir):  # ours: a clear error for a wrong zip
            raise RuntimeError(f"{file_path} has no top-level eval_bundle/ folder; delete it so it is downloaded again")
        shutil.move(extracted_bundle_dir, eval_bundle_dir)
    print0(f"Placed eval_bundle directory at {eval_bundle_dir}")


def evaluate_core(model, tokenizer, device, max_per_task=-1, eval_bundle_dir=None):
    """
    Evaluate a base model on the CORE tasks.
    Returns {"results": {label: accuracy}, "centered_results": {label: centered accuracy},
    "core_metric": mean centered accuracy}. Centering maps the task's random-guess accuracy
    to 0 and perfect accuracy to 1. max_per_task > 0 evaluates a fixed random subset of
    each task (the same subset on every call). eval_bundle_dir (ours): see get_eval_bundle_dir.
    """
    eval_bundle_dir = get_eval_bundle_dir(eval_bundle_dir)  # ours: override, download, checks

    config_path = os.path.join(eval_bundle_dir, "core.yaml")
    data_base_path = os.path.join(eval_bundle_dir, "eval_data")
    eval_meta_data = os.path.join(eval_bundle_dir, "eval_meta_data.csv")

    with open(config_path, 'r', encoding='utf-8') as f:
        config = yaml.safe_load(f)
    tasks = config['icl_tasks']

    # random-guess accuracy of each task, in percent
    random_baselines = {}
    with open(eval_meta_data, 'r', encoding='utf-8') as f:
        reader = csv.DictReader(f)
        for row in reader:
            task_name = row['Eval Task']
            random_baseline = row['Random baseline']
            random_baselines[task_name] = float(random_baseline)

    results = {}
    centered_results = {}
    for task in tasks:
        start_time = time.time()
        label = task['label']
        task_meta = {
            'task_type': task['icl_task_type'],
            'dataset_uri': task['dataset_uri'],
            'num_fewshot': task['num_fewshot'][0],
            'continuation_delimiter': task.get('continuation_delimiter', ' ')
        }
        if label not in random_baselines:  # ours: a ValueError naming the missing row
            raise ValueError(f"task {label!r} from core.yaml has no row in {eval_bundle_dir}/eval_meta_data.csv; "
                             f"add its 'Random baseline' there")
        print0(f"Evaluating: {label} ({task_meta['num_fewshot']}-shot, type: {task_meta['task_type']})... ", end='')

        data_path = os.path.join(data_base_path, task_meta['dataset_uri'])
        data = _load_task_data(data_path)  # ours: one-line errors for a missing file or a bad line

        # a fixed shuffle makes max_per_task pick the same representative subset every time
        shuffle_rng = random.Random(1337)
        shuffle_rng.shuffle(data)
        if max_per_task > 0:
            data = data[:max_per_task]

        accuracy = evaluate_task(model, tokenizer, data, device, task_meta)
        results[label] = accuracy
        random_baseline = random_baselines[label]
        centered_result = (accuracy - 0.01 * random_baseline) / (1.0 - 0.01 * random_baseline)
        centered_results[label] = centered_result
        elapsed = time.time() - start_time
        print0(f"accuracy: {accuracy:.4f} | centered: {centered_result:.4f} | time: {elapsed:.2f}s")

    core_metric = sum(centered_results.values()) / len(centered_results)
    out = {
        "results": results,
        "centered_results": centered_results,
        "core_metric": core_metric
    }
    return out

# ours: locating the bundle, reading a task's data

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
    """One JSON object per line (blank lines skipped)."""
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
