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
"""
import random

import torch
import torch.distributed as dist

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
