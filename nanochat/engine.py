"""
Inference engine: fast batched sampling from a GPT with a KV cache, plus the calculator tool.

The engine speaks token ids only (a tokenizer is needed just for the tool-use state
machine). Engine.generate runs the prompt through the model once with batch size 1,
copies that KV cache into every row of a batch, then decodes one token per row per
step, streaming out (token_column, token_masks) as it goes.

Tool use: when a row emits <|python_start|> ... <|python_end|>, the expression in
between is evaluated by a tiny restricted calculator and its result is *forced* into
that row as <|output_start|> result <|output_end|> (mask 0 = forced, 1 = sampled).
A row is finished when it emits <|assistant_end|> or <|bos|>.

Quick self-check against the naive model.generate: python -m nanochat.engine
"""

import signal
import threading
import warnings
from collections import deque
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from nanochat.common import COMPUTE_DTYPE

# -----------------------------------------------------------------------------
# Calculator tool

@contextmanager
def timeout(duration, formula):
    """Raise inside the block if it runs longer than `duration` seconds (SIGALRM based).

    Signals can only be installed from the main thread; elsewhere (e.g. a web server's
    worker thread) the block simply runs without a time limit. That is acceptable
    because use_calculator only lets through short arithmetic and str.count calls.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def timeout_handler(signum, frame):
        raise Exception(f"'{formula}': timed out after {duration} seconds")

    previous_handler = signal.signal(signal.SIGALRM, timeout_handler)
    signal.alarm(duration)
    try:
        yield
    finally:
        # cancel the pending alarm first, then give the caller its own handler back
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous_handler)


def eval_with_timeout(formula, max_time=3):
    """eval() a formula with no builtins and a time limit; None on any failure."""
    try:
        with timeout(max_time, formula):
            with warnings.catch_warnings():
                # e.g. "2 (3)" warns that an int is not callable before failing: stay quiet
                warnings.simplefilter("ignore", SyntaxWarning)
                return eval(formula, {"__builtins__": {}}, {})
    except Exception as e:  # noqa: F841 - upstream's name; the alarm is already cancelled by timeout()
        # a model that misuses the calculator just gets no output back
        return None



def use_calculator(expr):
    """
    Evaluate what the model wrote between <|python_start|> and <|python_end|>.
    Two kinds of expression are accepted, anything else gives None:
    - plain arithmetic on numbers (thousands separators are dropped, ** is refused
      since 9**9**9 would hang the process), and
    - string letter counting such as "strawberry".count("r").
    """
    expr = expr.replace(",", "")

    # arithmetic
    if all([x in "0123456789*+-/.() " for x in expr]):
        if "**" in expr:
            return None
        return eval_with_timeout(expr)

    # string letter counting: only these characters, none of these words
    allowed_chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"()._ "
    if not all([x in allowed_chars for x in expr]):
        return None
    dangerous_patterns = ['__', 'import', 'exec', 'eval', 'compile', 'open', 'file',
                          'input', 'raw_input', 'globals', 'locals', 'vars', 'dir',
                          'getattr', 'setattr', 'delattr', 'hasattr']
    expr_lower = expr.lower()
    if any(pattern in expr_lower for pattern in dangerous_patterns):
        return None
    # .count() is the only method we let through for now
    if '.count(' not in expr:
        return None
    return eval_with_timeout(expr)

# -----------------------------------------------------------------------------
# KV cache

class KVCache:
    """
    Pre-allocated keys/values for every layer, laid out the way Flash Attention 3's
    flash_attn_with_kvcache wants them: (n_layers, B, T, H, D), i.e. time before heads.

    The attention kernel (FA3 or our SDPA fallback) writes the new k/v into the cache
    in place at position cache_seqlens; the model calls advance(T) once its last layer
    has run. cache_seqlens is per row (int32, as FA3 requires) but the engine keeps all
    rows at the same position. prev_embedding holds the last token's normalized
    embedding, which the model's "smear" needs when it decodes one token at a time.
    """

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device, dtype):
        self.batch_size = batch_size
        self.max_seq_len = seq_len
        self.n_layers = num_layers
        self.n_heads = num_heads
        self.head_dim = head_dim
        shape = (num_layers, batch_size, seq_len, num_heads, head_dim)
        self.k_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.prev_embedding = None  # written by GPT.forward

    def reset(self):
        """Forget everything: position back to 0 (old k/v are simply overwritten later)."""
        self.cache_seqlens.zero_()
        self.prev_embedding = None

    def get_pos(self):
        """Number of tokens already in the cache (rows move in lockstep, read row 0)."""
        return self.cache_seqlens[0].item()

    def get_layer_cache(self, layer_idx):
        """(k, v) views of one layer, each (B, T, H, D); writes go straight into the cache."""
        return self.k_cache[layer_idx], self.v_cache[layer_idx]

    def advance(self, num_tokens):
        """Move every row's position forward by num_tokens."""
        self.cache_seqlens += num_tokens

    def truncate(self, pos, prev_embedding):  # hook: MegaContext's runtime rewinds to the first slot its working context changed
        assert 0 <= pos <= self.get_pos() and (pos == 0) == (prev_embedding is None), "truncate(pos, the pre-smear embedding of slot pos-1)"  # hook: truncate
        self.cache_seqlens.fill_(pos)  # hook: truncate (k/v past pos are overwritten by the next forward)
        self.prev_embedding = prev_embedding  # hook: truncate (what the smear of slot pos mixes in)

    def prefill(self, other):
        """
        Start this (empty) cache from the contents of another one, typically a batch-1
        prompt prefill that is broadcast here to batch_size sampling rows.
        """
        assert self.get_pos() == 0, "Cannot prefill a non-empty KV cache"
        assert (self.n_layers, self.n_heads, self.head_dim) == (other.n_layers, other.n_heads, other.head_dim), \
            "KV cache shapes differ (layers, kv heads, head dim)"
        assert self.max_seq_len >= other.max_seq_len, "destination KV cache is shorter than the source"
        other_pos = other.get_pos()
        # other's batch dim (1 in the engine) broadcasts over our rows
        self.k_cache[:, :, :other_pos, :, :] = other.k_cache[:, :, :other_pos, :, :]
        self.v_cache[:, :, :other_pos, :, :] = other.v_cache[:, :, :other_pos, :, :]
        self.cache_seqlens.fill_(other_pos)
        if other.prev_embedding is not None:
            # a real copy per row, the rows will diverge from the next token on
            self.prev_embedding = other.prev_embedding.expand(self.batch_size, -1, -1).clone()

# -----------------------------------------------------------------------------
# Sampling

@torch.inference_mode()
def sample_next_token(logits, rng, temperature=1.0, top_k=None):
    """
    Pick one next token per row from logits (B, vocab_size); returns (B, 1) ids.
    temperature 0 is greedy argmax and does not touch rng; otherwise optional top-k
    filtering, then softmax(logits / temperature) and one multinomial draw from rng.
    """
    if temperature < 0.0:
        raise ValueError(f"temperature must be non-negative, got {temperature}")
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    if top_k is not None and top_k > 0:
        k = min(top_k, logits.size(-1))
        vals, idx = torch.topk(logits, k, dim=-1)
        vals = vals / temperature
        probs = F.softmax(vals, dim=-1)
        choice = torch.multinomial(probs, num_samples=1, generator=rng)  # index into the top k
        return idx.gather(1, choice)
    else:
        logits = logits / temperature
        probs = F.softmax(logits, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=rng)

# -----------------------------------------------------------------------------
# Generation

class RowState:
    """Book-keeping for one row (one sample) while the engine decodes."""

    def __init__(self, current_tokens=None):
        self.current_tokens = current_tokens or []  # prompt + everything emitted so far
        self.forced_tokens = deque()   # tool output waiting to be injected, one per step
        self.in_python_block = False   # between <|python_start|> and <|python_end|>?
        self.python_expr_tokens = []   # the calculator expression being written
        self.completed = False         # emitted <|assistant_end|> or <|bos|>


class Engine:

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer  # only used by the tool-use state machine

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """
        Stream num_samples continuations of the prompt `tokens` (a list of ints).
        Yields (token_column, token_masks) once per step: the next token of every row,
        and whether it was sampled (1) or forced by the calculator tool (0). Rows that
        have finished keep receiving tokens; callers ignore them (see generate_batch).
        Stops after max_tokens steps, when all rows are finished, or when the model's
        KV cache is full (max_tokens=None: up to the model's sequence_len).
        """
        if not (isinstance(tokens, list) and len(tokens) > 0 and all(isinstance(t, int) for t in tokens)):  # ours: clear errors
            raise ValueError("Engine.generate expects the prompt as a non-empty list of int token ids")
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        device = self.model.get_device()
        # the cache holds what the attention layers produce, i.e. the compute dtype
        dtype = COMPUTE_DTYPE
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)

        # special tokens that drive the tool-use state machine and end rows
        get_special = lambda s: self.tokenizer.encode_special(s)
        python_start = get_special("<|python_start|>")
        python_end = get_special("<|python_end|>")
        output_start = get_special("<|output_start|>")
        output_end = get_special("<|output_end|>")
        assistant_end = get_special("<|assistant_end|>")
        bos = self.tokenizer.get_bos_token_id()

        # 1) one batch-1 forward over the whole prompt fills a prompt-sized cache
        m = self.model.config
        kv_model_kwargs = {"num_heads": m.n_kv_head, "head_dim": m.n_embd // m.n_head, "num_layers": m.n_layer}
        kv_cache_prefill = KVCache(
            batch_size=1,
            seq_len=len(tokens),
            device=device,
            dtype=dtype,
            **kv_model_kwargs,
        )
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        logits = self.model.forward(ids, kv_cache=kv_cache_prefill)
        # every row samples its own first token from the same distribution
        logits = logits[:, -1, :].expand(num_samples, -1)  # (num_samples, vocab_size)

        # 2) a cache with num_samples rows and room for the continuation, seeded from the prompt
        # (ours: with max_tokens=None, never shorter than the prompt)
        kv_length_hint = (len(tokens) + max_tokens) if max_tokens is not None else max(self.model.config.sequence_len, len(tokens))
        kv_cache_decode = KVCache(
            batch_size=num_samples,
            seq_len=kv_length_hint,
            device=device,
            dtype=dtype,
            **kv_model_kwargs,
        )
        kv_cache_decode.prefill(kv_cache_prefill)
        del kv_cache_prefill

        # 3) per-row state
        row_states = [RowState(tokens.copy()) for _ in range(num_samples)]

        # 4) decode loop: sample, apply forced tokens and tool logic, yield, feed back
        num_generated = 0
        while True:
            if max_tokens is not None and num_generated >= max_tokens:
                break
            if all(state.completed for state in row_states):
                break

            # every row draws a sample (even rows about to be forced), so the rng
            # stream does not depend on what the tool does
            next_ids = sample_next_token(logits, rng, temperature, top_k)  # (B, 1)
            sampled_tokens = next_ids[:, 0].tolist()

            token_column = []  # the next token of every row
            token_masks = []  # 1 = sampled, 0 = forced by the tool
            for i, state in enumerate(row_states):
                is_forced = len(state.forced_tokens) > 0
                token_masks.append(0 if is_forced else 1)
                next_token = state.forced_tokens.popleft() if is_forced else sampled_tokens[i]
                token_column.append(next_token)
                state.current_tokens.append(next_token)
                if next_token == assistant_end or next_token == bos:
                    state.completed = True
                # calculator tool state machine
                if next_token == python_start:
                    state.in_python_block = True
                    state.python_expr_tokens = []
                elif next_token == python_end and state.in_python_block:
                    state.in_python_block = False
                    if state.python_expr_tokens:
                        expr = self.tokenizer.decode(state.python_expr_tokens)
                        result = use_calculator(expr)
                        if result is not None:
                            result_tokens = self.tokenizer.encode(str(result))
                            state.forced_tokens.append(output_start)
                            state.forced_tokens.extend(result_tokens)
                            state.forced_tokens.append(output_end)
                    state.python_expr_tokens = []
                elif state.in_python_block:
                    state.python_expr_tokens.append(next_token)

            yield token_column, token_masks
            num_generated += 1

            # ours: skip the forward whose logits would never be used (the same stop tests
            # as at the top of the loop), and stop cleanly when the cache has no room left
            if max_tokens is not None and num_generated >= max_tokens:
                break
            if all(state.completed for state in row_states):
                break
            if kv_cache_decode.get_pos() >= kv_cache_decode.max_seq_len:
                break

            ids = torch.tensor(token_column, dtype=torch.long, device=device).unsqueeze(1)
            logits = self.model.forward(ids, kv_cache=kv_cache_decode)[:, -1, :]  # (B, vocab_size)

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """
        Run generate() to the end and return (results, masks): per row the prompt plus
        its generated tokens, and a 0/1 mask of the same length (prompt = 0, forced = 0,
        sampled = 1). A row's terminal token (<|assistant_end|> or <|bos|>) is left out.
        """
        assistant_end = self.tokenizer.encode_special("<|assistant_end|>")
        bos = self.tokenizer.get_bos_token_id()
        results = [tokens.copy() for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        completed = [False] * num_samples
        for token_column, token_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(token_column, token_masks)):
                if not completed[i]:
                    if token == assistant_end or token == bos:
                        completed[i] = True
                    else:
                        results[i].append(token)
                        masks[i].append(mask)
            if all(completed):
                break
        return results, masks


if __name__ == "__main__":
    # Self-check: the KV-cached engine must reproduce the naive, cache-free
    # model.generate token for token (greedy), and should be much faster.
    import time
    from nanochat.common import compute_init, autodetect_device_type
    from nanochat.checkpoint_manager import load_model

    device_type = autodetect_device_type()
    ddp, ddp_rank, ddp_local_rank, ddp_world_size, device = compute_init(device_type)
    model, tokenizer, meta = load_model("base", device, phase="eval")
    prompt_tokens = tokenizer.encode("The chemical formula of water is", prepend=tokenizer.get_bos_token_id())
    kwargs = dict(max_tokens=64, temperature=0.0)

    def sync():
        if device_type == "cuda":
            torch.cuda.synchronize()

    def stream_print(token_stream):
        out = []
        for token in token_stream:
            out.append(token)
            print(tokenizer.decode([token]), end="", flush=True)
        print()
        return out

    sync()
    t0 = time.time()
    reference = stream_print(model.generate(prompt_tokens, **kwargs))
    sync()
    print(f"Reference time: {time.time() - t0:.2f}s")

    engine = Engine(model, tokenizer)
    sync()
    t0 = time.time()
    fast = stream_print(column[0] for column, _ in engine.generate(prompt_tokens, num_samples=1, **kwargs))
    sync()
    print(f"Engine time: {time.time() - t0:.2f}s")

    for i, (a, b) in enumerate(zip(reference, fast)):
        if a != b:
            print(f"Mismatch at {i}: {a} != {b}")
            break
    print(f"Match: {reference == fast}")
