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
The prompt text is assembled with plain string formatting; it is byte-for-byte what the
reference Jinja templates produce ("<shot>\n\n" per few-shot example, then the item).

Ours at the end: the CORE driver (locating the eval bundle, evaluate_core), which upstream
keeps in scripts/base_eval.py; the library must never import scripts/ (the wheel has none).
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


def _fewshot_prefix(shots):
    """Each rendered few-shot example is followed by a blank line."""
    return "".join(f"{shot}\n\n" for shot in shots)


def render_prompts_mc(item, continuation_delimiter, fewshot_examples=None):
    """One prompt per choice: few-shot examples (with their gold answer), then query + choice."""
    shots = [f"{ex['query']}{continuation_delimiter}{ex['choices'][ex['gold']]}" for ex in (fewshot_examples or [])]
    prefix = _fewshot_prefix(shots)
    return [f"{prefix}{item['query']}{continuation_delimiter}{choice}" for choice in item['choices']]


def render_prompts_schema(item, continuation_delimiter, fewshot_examples=None):
    """One prompt per context option, each ending in the item's shared continuation."""
    shots = [f"{ex['context_options'][ex['gold']]}{continuation_delimiter}{ex['continuation']}"
             for ex in (fewshot_examples or [])]
    prefix = _fewshot_prefix(shots)
    return [f"{prefix}{option}{continuation_delimiter}{item['continuation']}" for option in item['context_options']]


def render_prompts_lm(item, continuation_delimiter, fewshot_examples=None):
    """
    Two prompts: [without the continuation, with it]. Contexts are stripped of surrounding
    whitespace (some datasets carry trailing spaces), and the prompt without the continuation
    is stripped once more: a trailing space there would merge into the first continuation
    token in the other prompt, and then "without" would no longer be a token prefix of "with".
    """
    shots = [f"{str(ex['context']).strip()}{continuation_delimiter}{ex['continuation']}"
             for ex in (fewshot_examples or [])]
    head = f"{_fewshot_prefix(shots)}{str(item['context']).strip()}{continuation_delimiter}"
    prompt_without = head.strip()
    prompt_with = f"{head}{item['continuation']}"
    return [prompt_without, prompt_with]

# -----------------------------------------------------------------------------
# Tokenizing and batching


def find_common_length(token_sequences, direction='left'):
    """Length of the prefix ('left') or suffix ('right') shared by all token sequences."""
    if direction not in ('left', 'right'):
        raise ValueError(f"direction must be 'left' or 'right', got {direction!r}")
    shortest = min(len(seq) for seq in token_sequences)
    for n in range(shortest):
        pos = n if direction == 'left' else -1 - n
        token = token_sequences[0][pos]
        if any(seq[pos] != token for seq in token_sequences):
            return n
    return shortest


def stack_sequences(tokens, pad_token_id):
    """(B, T_max) long tensor of the sequences, right-padded with pad_token_id."""
    longest = max(len(seq) for seq in tokens)
    input_ids = torch.full((len(tokens), longest), pad_token_id, dtype=torch.long)
    for row, seq in enumerate(tokens):
        input_ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    return input_ids


def batch_sequences_mc(tokenizer, prompts):
    """Choices share the query, so the answers start where the common token prefix ends."""
    tokens = tokenizer(prompts, prepend=tokenizer.get_bos_token_id())
    answer_start = find_common_length(tokens, direction='left')
    return tokens, [answer_start] * len(prompts), [len(seq) for seq in tokens]


def batch_sequences_schema(tokenizer, prompts):
    """Options share the continuation, so it is the common token suffix of every prompt."""
    tokens = tokenizer(prompts, prepend=tokenizer.get_bos_token_id())
    suffix_len = find_common_length(tokens, direction='right')
    end_indices = [len(seq) for seq in tokens]
    return tokens, [end - suffix_len for end in end_indices], end_indices


def batch_sequences_lm(tokenizer, prompts):
    """Only the full prompt is forwarded (batch of 1); the short one just marks where the continuation starts."""
    tokens_without, tokens_with = tokenizer(prompts, prepend=tokenizer.get_bos_token_id())
    start, end = len(tokens_without), len(tokens_with)
    assert start < end, "prompt without is supposed to be a prefix of prompt with"
    assert tokens_without == tokens_with[:start], "prompt without is supposed to be a prefix of prompt with"
    return [tokens_with], [start], [end]

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
    logits = model(input_ids)
    # the target at position t is the input at t+1; the wrapped-around last column is masked below
    targets = torch.roll(input_ids, shifts=-1, dims=1)
    losses = torch.nn.functional.cross_entropy(
        logits.view(batch_size * seq_len, -1),
        targets.view(batch_size * seq_len),
        reduction='none',
    ).view(batch_size, seq_len)
    losses[:, -1] = float('nan')
    predictions = logits.argmax(dim=-1)
    return losses, predictions


def _crop_to_max_seq_len(max_len, tokens, start_idxs, end_idxs):
    """Keep the last max_len tokens of over-long sequences, shifting the answer span left to match."""
    out_tokens, out_starts, out_ends = [], [], []
    for seq, start, end in zip(tokens, start_idxs, end_idxs):
        drop = max(len(seq) - max_len, 0)
        assert start - drop >= 0 and end - drop >= 0, "cropping would cut into the scored continuation"
        out_tokens.append(seq[drop:])
        out_starts.append(start - drop)
        out_ends.append(end - drop)
    return out_tokens, out_starts, out_ends


@torch.no_grad()
def evaluate_example(idx, model, tokenizer, data, device, task_meta):
    """Evaluate data[idx] under task_meta; returns True if the model gets it right."""
    item = data[idx]
    task_type = task_meta['task_type']
    num_fewshot = task_meta['num_fewshot']
    delimiter = task_meta['continuation_delimiter']

    # few-shot examples: a seeded draw that never includes the item itself
    fewshot_examples = []
    if num_fewshot > 0:
        if num_fewshot >= len(data):
            raise ValueError(f"{num_fewshot}-shot evaluation needs at least {num_fewshot + 1} examples but the task "
                             f"has {len(data)}; raise --max-per-task or lower num_fewshot")
        rng = random.Random(1234 + idx)
        others = [i for i in range(len(data)) if i != idx]
        fewshot_examples = [data[i] for i in rng.sample(others, num_fewshot)]

    if task_type == 'multiple_choice':
        prompts = render_prompts_mc(item, delimiter, fewshot_examples)
        tokens, start_idxs, end_idxs = batch_sequences_mc(tokenizer, prompts)
    elif task_type == 'schema':
        prompts = render_prompts_schema(item, delimiter, fewshot_examples)
        tokens, start_idxs, end_idxs = batch_sequences_schema(tokenizer, prompts)
    elif task_type == 'language_modeling':
        prompts = render_prompts_lm(item, delimiter, fewshot_examples)
        tokens, start_idxs, end_idxs = batch_sequences_lm(tokenizer, prompts)
    else:
        raise ValueError(f"Unsupported task type: {task_type!r}; expected multiple_choice, schema or language_modeling")

    # models with a hard context limit (e.g. GPT-2 wrappers) advertise it as max_seq_len
    max_seq_len = getattr(model, 'max_seq_len', None)
    if max_seq_len is not None:
        tokens, start_idxs, end_idxs = _crop_to_max_seq_len(max_seq_len, tokens, start_idxs, end_idxs)

    # BOS is a fine pad: padded positions lie after every scored span
    input_ids = stack_sequences(tokens, tokenizer.get_bos_token_id()).to(device)
    losses, predictions = forward_model(model, input_ids)

    if task_type == 'language_modeling':
        start, end = start_idxs[0], end_idxs[0]
        # the prediction made at position t is for token t+1
        predicted = predictions[0, start - 1:end - 1]
        actual = input_ids[0, start:end]
        return torch.all(predicted == actual).item()
    # multiple_choice / schema: the option whose scored span has the lowest mean loss wins
    mean_losses = [losses[row, start - 1:end - 1].mean().item()
                   for row, (start, end) in enumerate(zip(start_idxs, end_idxs))]
    return mean_losses.index(min(mean_losses)) == item['gold']


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
        correct[idx] = float(evaluate_example(idx, model, tokenizer, data, device, task_meta))
    if world_size > 1:
        dist.barrier()
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    return correct.mean().item()

# -----------------------------------------------------------------------------
# Ours: the CORE driver (eval bundle + evaluate_core), upstream's scripts/base_eval.py.
# It lives here because nanochat.train (a library module) runs CORE during training and
# the installed package has no scripts/; base_eval imports it from here.
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
