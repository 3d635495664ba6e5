"""
Decode benchmark: what the KV cache buys. Generates from a randomly initialised GPT (built
from flags, no checkpoint or tokenizer needed) at a few context lengths, two ways:

- cached: nanochat.engine.Engine, one prefill over the prompt and then one token per
  forward against the KV cache, so each new token costs about the same;
- naive:  GPT.generate, which re-runs the whole context for every token, so each token
  costs as much as a prefill of the full context.

For each it reports time to first token, steady decode tok/s (tokens after the first over
the time after the first), and per-token latency as a function of the generated-token
index, in quarters of the generation (with the cache this must stay flat: a rising curve
means something re-reads or re-allocates per step). Random weights are fine: the cost of a
forward does not depend on the values, and greedy decoding keeps the run deterministic.

CPU-sized defaults (a few minutes on 2 cores; naive decoding at 8k context is the slow part):

    python -m scripts.bench_decode

On a GPU the model computes in nanochat's COMPUTE_DTYPE (bf16 on Ampere and newer), exactly
as in training and serving; a d20-sized model for example:

    python -m scripts.bench_decode --depth=20 --vocab-size=32768 --cached-tokens=512 --naive-tokens=32

It prints the figures; --record also appends them as a dated section to docs/benchmarks.md.
Flags are parsed before torch is imported, so a typo is rejected at once.
"""

import sys
import time
import argparse
import datetime
import statistics

from scripts.bench_common import (REPO_ROOT, DOCS_PATH, add_record_flag, record_section, describe_machine, git_commit,
                                  load_average, machine_line, run_cli)

# -----------------------------------------------------------------------------
# Helpers (pure ones are tested in tests/test_bench.py)

class NoToolsTokenizer:
    """
    The few tokenizer methods Engine touches, for a model with no real vocabulary. Special
    tokens get ids no model can emit, so the calculator tool and end-of-row logic never
    trigger and every run generates exactly the requested number of tokens.
    """
    def encode_special(self, text):
        return -1

    def get_bos_token_id(self):
        return -1

    def encode(self, text):
        raise RuntimeError("NoToolsTokenizer cannot encode text (the tool path should never run here)")

    def decode(self, ids):
        raise RuntimeError("NoToolsTokenizer cannot decode tokens (the tool path should never run here)")


def parse_int_list(text):
    """'1024,8192' -> [1024, 8192], with a clear error for anything else."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers like 1024,8192, got {text!r}") from None
    if not values or any(v < 2 for v in values):
        raise ValueError(f"context lengths must be integers >= 2, got {text!r}")
    return values


def timed_stream(stream):
    """Consume a token generator; return the perf_counter time at which each token arrived."""
    times = []
    for _ in stream:
        times.append(time.perf_counter())
    return times


def latency_profile(start, times):
    """
    From the start time and the arrival time of each token: time to first token (s), the
    per-token latencies after it (s), steady tok/s, and the median latency in each quarter
    of the generation plus last-quarter/first-quarter (1.0 = perfectly flat).
    """
    if len(times) < 2:
        raise ValueError("need at least 2 generated tokens to measure decode latency")
    gaps = [b - a for a, b in zip(times, times[1:])]
    quarters, flatness = quarter_medians(gaps)
    return {
        "ttft_s": times[0] - start,
        "tok_per_sec": len(gaps) / (times[-1] - times[0]),
        "latencies_s": gaps,
        "quarter_median_s": quarters,
        "flatness": flatness,
    }


def quarter_medians(gaps):
    """Median latency in each quarter of the generation, and last quarter / first quarter."""
    n = len(gaps)
    quarters = []
    for q in range(4):
        # with fewer than 4 gaps a quarter borrows its nearest gap rather than being empty
        lo = min(q * n // 4, n - 1)
        hi = max((q + 1) * n // 4, lo + 1)
        quarters.append(statistics.median(gaps[lo:hi]))
    return quarters, quarters[-1] / quarters[0]


def combine_profiles(profiles):
    """
    Several runs of the same measurement -> one: the median TTFT and tok/s, and per
    generated-token index the median latency over runs (so a single stall from another
    process on a shared machine does not show up as a bump in the curve).
    """
    gaps = [statistics.median(g) for g in zip(*(p["latencies_s"] for p in profiles))]
    quarters, flatness = quarter_medians(gaps)
    return {
        "ttft_s": statistics.median(p["ttft_s"] for p in profiles),
        "tok_per_sec": statistics.median(p["tok_per_sec"] for p in profiles),
        "latencies_s": gaps,
        "quarter_median_s": quarters,
        "flatness": flatness,
        "repeats": len(profiles),
    }


def format_rows(rows, markdown=False):
    header = ["context", "decoding", "tokens", "TTFT (ms)", "decode tok/s", "latency by token index, quarters (ms)", "last/first quarter", "cache speedup"]
    body = []
    for r in rows:
        body.append([
            f"{r['context']:,}", r["mode"], str(r["tokens"]), f"{r['ttft_s'] * 1000:.1f}", f"{r['tok_per_sec']:.2f}",
            " / ".join(f"{q * 1000:.1f}" for q in r["quarter_median_s"]), f"{r['flatness']:.2f}",
            f"{r['speedup']:.1f}x" if r.get("speedup") else "",
        ])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in body])
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(c) for c in body])

# -----------------------------------------------------------------------------

def build_model(args, device):
    """A randomly initialised GPT sized like base_train sizes it (model_dim = depth * aspect_ratio, rounded to heads)."""
    import torch
    from nanochat.gpt import GPT, GPTConfig
    base_dim = args.depth * args.aspect_ratio
    model_dim = ((base_dim + args.head_dim - 1) // args.head_dim) * args.head_dim
    num_heads = model_dim // args.head_dim
    sequence_len = max(args.contexts) + max(args.cached_tokens, args.naive_tokens)
    config = GPTConfig(sequence_len=sequence_len, vocab_size=args.vocab_size, n_layer=args.depth,
                       n_head=num_heads, n_kv_head=num_heads, n_embd=model_dim, window_pattern=args.window_pattern)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    model.eval()
    return model


def measure(model, engine, prompt, mode, num_tokens):
    """Generate num_tokens greedily after `prompt` with the Engine (cached) or GPT.generate (naive)."""
    start = time.perf_counter()
    if mode == "cached":
        stream = engine.generate(prompt, num_samples=1, max_tokens=num_tokens, temperature=0.0)
    else:
        stream = model.generate(prompt, max_tokens=num_tokens, temperature=0.0)
    times = timed_stream(stream)
    if len(times) != num_tokens:
        raise RuntimeError(f"{mode} decoding produced {len(times)} tokens instead of {num_tokens}")
    return latency_profile(start, times)


def build_parser():
    parser = argparse.ArgumentParser(description="Decode tok/s with the KV cache (Engine) vs naive (GPT.generate)")
    parser.add_argument("--depth", type=int, default=4, help="transformer depth")
    parser.add_argument("--aspect-ratio", type=int, default=64, help="model_dim = depth * aspect_ratio")
    parser.add_argument("--head-dim", type=int, default=128, help="attention head dimension")
    parser.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size (prompts are random token ids)")
    parser.add_argument("--window-pattern", type=str, default="L", help="sliding window pattern, as in base_train")
    parser.add_argument("--contexts", type=str, default="1024,8192", help="prompt lengths, comma-separated")
    parser.add_argument("--cached-tokens", type=int, default=64, help="tokens generated with the KV cache per context")
    parser.add_argument("--naive-tokens", type=int, default=6, help="tokens generated without a cache (each costs a full forward)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement; medians are reported")
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the weights and the random prompts")
    add_record_flag(parser)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.contexts = parse_int_list(args.contexts)
    if args.cached_tokens < 2 or args.naive_tokens < 2:
        raise ValueError("--cached-tokens and --naive-tokens must be at least 2 (latency is measured between tokens)")
    if args.repeats < 1:
        raise ValueError("--repeats must be at least 1")
    import torch  # after the flags are checked: a typo costs no torch import
    from nanochat.common import autodetect_device_type, COMPUTE_DTYPE
    from nanochat.engine import Engine
    device_type = args.device_type or autodetect_device_type()
    device = torch.device(device_type)
    torch.manual_seed(args.seed)
    model = build_model(args, device)
    engine = Engine(model, NoToolsTokenizer())
    g = torch.Generator().manual_seed(args.seed)
    print(f"model: depth {args.depth}, n_embd {model.config.n_embd}, heads {model.config.n_head}, vocab {args.vocab_size}, "
          f"sequence_len {model.config.sequence_len}, dtype {COMPUTE_DTYPE}, device {device}", flush=True)

    # warm-up: first calls pay for kernel selection and allocator growth, not decoding
    warm = torch.randint(0, args.vocab_size, (min(64, min(args.contexts)),), generator=g).tolist()
    measure(model, engine, warm, "cached", 4)
    measure(model, engine, warm, "naive", 2)

    prompts = {c: torch.randint(0, args.vocab_size, (c,), generator=g).tolist() for c in args.contexts}
    cases = [(c, mode, n) for c in args.contexts for mode, n in (("cached", args.cached_tokens), ("naive", args.naive_tokens))]
    profiles = {case: [] for case in cases}
    load_start = load_average()[0]
    # Repeats are the outer loop: a burst of load from another process then spoils one run
    # of several rows (and the median drops it) rather than every run of one row.
    for r in range(1, args.repeats + 1):
        for case in cases:
            context, mode, n = case
            print(f"[repeat {r}/{args.repeats}] context {context:,}: {mode}, {n} tokens ...", flush=True)
            profiles[case].append(measure(model, engine, prompts[context], mode, n))
    rows = []
    for context in args.contexts:
        cached, naive = [dict(combine_profiles(profiles[case]), context=case[0], mode=case[1], tokens=case[2])
                         for case in cases if case[0] == context]
        cached["speedup"] = cached["tok_per_sec"] / naive["tok_per_sec"]
        rows += [cached, naive]
    load_end = load_average()[0]

    print()
    print(format_rows(rows))
    machine = describe_machine(sys.executable)
    print(f"machine: {machine_line(machine)}; load average (1 min) {load_start:.2f} at start, {load_end:.2f} at end")

    if args.record:
        command = "python -m scripts.bench_decode " + " ".join(sys.argv[1:] if argv is None else argv)
        section = (
            f"### Decode with and without the KV cache, {datetime.date.today().isoformat()}\n\n"
            f"- commit: {git_commit(REPO_ROOT) or 'unknown'}\n"
            f"- device: {machine_line(machine)}\n"
            f"- model: random init, depth {args.depth}, n_embd {model.config.n_embd}, {model.config.n_head} heads, "
            f"vocab {args.vocab_size}, window pattern {args.window_pattern}, dtype {COMPUTE_DTYPE}; greedy, batch 1; "
            f"median of {args.repeats} runs per row\n"
            f"- command: `{command.strip()}`\n"
            f"- load average (1 min): {load_start:.2f} at start, {load_end:.2f} at end (shared machine)\n\n"
            f"{format_rows(rows, markdown=True)}\n"
        )
        record_section(section, DOCS_PATH)
    return rows


if __name__ == "__main__":
    run_cli(main)
