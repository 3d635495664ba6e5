"""
Inference benchmark: what a trained checkpoint costs to run. Measures time to first
token, per-token decode latency, throughput, memory, and how close decoding gets to
the hardware's bandwidth / compute ceilings, sweeping over the decode batch size.

Why a separate eval: quality metrics (CORE, bpb, ...) say nothing about serving cost,
and architecture choices such as GQA or sliding windows mostly show up here.

The two regimes of inference:
- prefill pushes the whole prompt through at once: large matmuls, compute-bound, so
  its efficiency is MFU (achieved FLOP/s over peak FLOP/s);
- decode makes one token per row per step and must re-read every weight and the KV
  cache each time: memory-bandwidth-bound, so batching rows is almost free until the
  matmuls fill up. Its efficiency is MBU (bytes moved per second over peak bandwidth).
The batch-size sweep traces the latency / throughput trade-off between the two.

Output: a human-readable card and table; the LAST line of stdout is one JSON document
with everything in it, for scripts:

    result = json.loads(subprocess.run([...], capture_output=True, text=True).stdout.splitlines()[-1])

Examples:

    # a base checkpoint on one GPU
    python -m scripts.infer_bench -i base -g d12

    # the SFT model, custom sweep
    python -m scripts.infer_bench -i sft --batch-sizes 1,4,16,64 --decode-tokens 512

    # just the machine-readable summary
    python -m scripts.infer_bench -i base -g d12 | tail -1 | jq .sweep

    # CPU (no GPU present): a tiny model, small numbers; timings work, peak-hardware
    # ratios (MBU/MFU) read 0 because the CPU's peaks are unknown
    python -m scripts.infer_bench -i base --prompt-tokens 64 --decode-tokens 16 --batch-sizes 1,2
"""

import argparse
import json
import platform
import sys
import time

import torch

from nanochat.common import compute_init, compute_cleanup, autodetect_device_type, get_peak_bandwidth, get_peak_flops
from nanochat.checkpoint_manager import load_model
from nanochat.engine import Engine

# -----------------------------------------------------------------------------
# Device helpers: CUDA gives exact timing and peak-memory numbers; on CPU/MPS the
# timings still work (synchronize where needed) and peak memory is reported as None.

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def device_description(device):
    """(name used for the peak-number lookup, total memory in bytes)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device), torch.cuda.get_device_properties(device).total_memory
    import psutil
    name = f"{device.type}: {platform.processor() or platform.machine()}"
    return name, psutil.virtual_memory().total

# -----------------------------------------------------------------------------
# Measurement
# (FLOPs and KV-cache bytes per token are properties of the architecture and live on
# the GPT model: estimate_decode_flops, estimate_prefill_flops, kv_bytes_per_token, kv_read_bytes)

def weight_bytes(model):
    """Bytes of all parameters as stored; every decode step reads each of them once."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def bench_generate(engine, prompt_tokens, batch_size, decode_tokens, temperature):
    """One timed generation: TTFT, the time of every decode step, and peak memory."""
    device = engine.model.get_device()
    reset_peak_memory(device)
    synchronize(device)

    stream = engine.generate(prompt_tokens, num_samples=batch_size,
                             max_tokens=decode_tokens, temperature=temperature)
    # The first next() is the batch-1 prompt prefill, the copy of its KV cache into
    # batch_size rows and the first sampled token: time to first token.
    t_start = time.perf_counter()
    next(stream)
    synchronize(device)
    ttft = time.perf_counter() - t_start

    # Each later next() is one decode step over all rows.
    step_times = []
    while True:
        t0 = time.perf_counter()
        try:
            next(stream)
        except StopIteration:
            break
        synchronize(device)
        step_times.append(time.perf_counter() - t0)

    return dict(ttft=ttft, step_times=step_times, peak_vram=peak_memory(device))


def build_prompt(tokenizer, num_tokens):
    """A natural-language prompt of exactly num_tokens tokens. Random ids would time the
    same, but real text keeps greedy decoding from collapsing into early stops."""
    paragraph = ("The history of science is the study of the development of science, "
                 "including both the natural and social sciences. Science is a body of "
                 "empirical, theoretical, and practical knowledge about the natural world. ")
    # every token covers at least one character, so this is always long enough
    text = paragraph * (num_tokens // 10 + 1)
    tokens = tokenizer.encode(text, prepend="<|bos|>")
    if len(tokens) < num_tokens:
        raise RuntimeError(f"prompt text gave only {len(tokens)} tokens, fewer than the {num_tokens} asked for")
    return tokens[:num_tokens]


def parse_batch_sizes(text):
    try:
        sizes = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--batch-sizes must be comma-separated integers, e.g. 1,8,32 (got {text!r})") from None
    if not sizes or any(b < 1 for b in sizes):
        raise ValueError(f"--batch-sizes needs at least one size and every size >= 1 (got {text!r})")
    return sizes


def finite_or_none(x, ndigits=None):
    """JSON has no Infinity: unknown peaks (inf) become None so the last line stays valid."""
    if x == float("inf"):
        return None
    return round(x, ndigits) if ndigits is not None else x

# -----------------------------------------------------------------------------

def run(args):
    batch_sizes = parse_batch_sizes(args.batch_sizes)
    if args.decode_tokens < 2:
        raise ValueError(f"--decode-tokens must be at least 2 (one for TTFT, the rest are timed decode steps), got {args.decode_tokens}")
    if args.prompt_tokens < 1:
        raise ValueError(f"--prompt-tokens must be at least 1, got {args.prompt_tokens}")

    device_type = autodetect_device_type()
    ddp, ddp_rank, ddp_local_rank, ddp_world_size, device = compute_init(device_type)
    if ddp_world_size != 1:
        raise ValueError("infer_bench measures a single device; run it with python -m, not torchrun")

    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    config = model.config
    engine = Engine(model, tokenizer)

    # prompt + decode must fit in the context the model was trained for
    max_prompt = config.sequence_len - args.decode_tokens
    if max_prompt < 1:
        raise ValueError(f"--decode-tokens {args.decode_tokens} leaves no room for a prompt in this model's "
                         f"sequence_len={config.sequence_len}; use a smaller --decode-tokens")
    prompt_len = min(args.prompt_tokens, max_prompt)
    if prompt_len < args.prompt_tokens:
        print(f"note: clamping prompt to {prompt_len} tokens so prompt+decode fits sequence_len={config.sequence_len}")
    prompt_tokens = build_prompt(tokenizer, prompt_len)

    # ------------------------------------------------------------------------
    # Static card: what the architecture implies, before measuring anything
    device_name, total_vram = device_description(device)
    peak_bw = get_peak_bandwidth(device_name)
    peak_flops = get_peak_flops(device_name)
    w_bytes = weight_bytes(model)
    num_params = sum(p.numel() for p in model.parameters())
    kv_store = model.kv_bytes_per_token()
    context_mid = prompt_len + args.decode_tokens // 2  # a typical context length during decode
    kv_read = model.kv_read_bytes(context_mid)
    # best case at batch 1: each step must at least stream the weights and the KV cache once
    ceiling_bs1 = peak_bw / (w_bytes + kv_read)
    # how many full-context rows of KV cache fit beside the weights
    max_rows = int((total_vram - w_bytes) / (kv_store * config.sequence_len))

    print("=" * 100)
    print(f"Model: {args.source} {meta.get('model_tag', '')} (step {meta['step']}) | "
          f"depth {config.n_layer}, dim {config.n_embd}, heads {config.n_head}, kv heads {config.n_kv_head} (GQA)")
    print(f"{'GPU' if device.type == 'cuda' else 'Device'}: {device_name} | peak bandwidth {peak_bw/1e12:.2f} TB/s | peak compute {peak_flops/1e12:.0f} TFLOPS | VRAM {total_vram/2**30:.0f} GiB")
    print("-" * 100)
    dtype_counts = {}
    for p in model.parameters():
        dtype_name = str(p.dtype).replace("torch.", "")
        dtype_counts[dtype_name] = dtype_counts.get(dtype_name, 0) + p.numel()
    param_dtypes = ", ".join(f"{n:,} {dtype_name}" for dtype_name, n in sorted(dtype_counts.items()))
    print(f"Parameters: {num_params:,} ({param_dtypes}) | weight bytes as stored: {w_bytes/2**20:.0f} MiB")
    print(f"KV cache: {kv_store:,} bytes/token stored | {kv_read:,} bytes read/step at context {context_mid} "
          f"(window pattern {config.window_pattern})")
    print(f"Theoretical decode ceiling at batch 1: {ceiling_bs1:,.0f} tok/s | "
          f"max ~{max_rows:,} full-context rows in VRAM")
    print("=" * 100)

    # the card again, as data, for the final JSON line
    payload = {
        "source": args.source,
        "step": meta["step"],
        "model_config": meta["model_config"],
        "gpu": device_name,
        "peak_bandwidth_bytes_per_sec": finite_or_none(peak_bw),
        "total_vram_bytes": total_vram,
        "num_params": num_params,
        "param_dtypes": dtype_counts,
        "weight_bytes": w_bytes,
        "kv_bytes_per_token": kv_store,
        "kv_read_bytes_per_step": kv_read,
        "context_mid": context_mid,
        "peak_flops_per_sec": finite_or_none(peak_flops),
        "decode_flops_per_token": model.estimate_decode_flops(context_mid),
        "ceiling_bs1_tok_per_sec": finite_or_none(ceiling_bs1, 1),
        "max_full_context_rows": max_rows,
        "prompt_tokens": prompt_len,
        "decode_tokens": args.decode_tokens,
        "temperature": args.temperature,
        "sweep": [],
    }

    # ------------------------------------------------------------------------
    # Prefill: batch 1 and a single decode step, so TTFT is essentially the prefill.
    # Prefill is compute-bound: MFU is its distance from the roofline.
    bench_generate(engine, prompt_tokens, 1, 2, args.temperature)  # warmup
    prefill_time = bench_generate(engine, prompt_tokens, 1, 2, args.temperature)["ttft"]
    prefill_mfu = 100 * model.estimate_prefill_flops(prompt_len) / prefill_time / peak_flops
    prefill_tok_per_sec = prompt_len / prefill_time
    print(f"Prefill (batch 1, {prompt_len} tokens): {prefill_tok_per_sec:,.0f} tok/s | MFU {prefill_mfu:.1f}%")
    payload["prefill"] = {
        "tok_per_sec": round(prefill_tok_per_sec, 1),
        "mfu_percent": round(prefill_mfu, 2),
        "time_sec": round(prefill_time, 6),
    }

    # ------------------------------------------------------------------------
    # Decode sweep. Every step reads all weights plus every row's KV cache: MBU is the
    # distance from the bandwidth roofline (binding at small batch), MFU the distance
    # from the compute roofline (binding at large batch).
    header = f"{'batch':>6} {'TTFT ms':>9} {'TPOT ms':>9} {'tok/s':>10} {'MBU %':>7} {'MFU %':>7} {'VRAM GiB':>9} {'steps':>6}"
    print(header)
    print("-" * len(header))
    for batch_size in batch_sizes:
        # warmup: allocator, kernel autotuning, attention paths for this batch size
        bench_generate(engine, prompt_tokens, batch_size, 8, args.temperature)
        result = bench_generate(engine, prompt_tokens, batch_size, args.decode_tokens, args.temperature)
        step_times = result["step_times"]
        num_steps = len(step_times)
        if num_steps == 0:
            print(f"{batch_size:>6}  all rows terminated during warmup?! skipping")
            continue
        tpot = sorted(step_times)[num_steps // 2]  # median time per output token (one step)
        tok_per_sec = batch_size * num_steps / sum(step_times)
        bytes_per_step = w_bytes + batch_size * kv_read
        mbu = 100 * (bytes_per_step / tpot) / peak_bw
        flops_per_step = batch_size * model.estimate_decode_flops(context_mid)
        mfu = 100 * (flops_per_step / tpot) / peak_flops
        peak_vram = result["peak_vram"]
        vram_text = f"{peak_vram / 2**30:>9.2f}" if peak_vram is not None else f"{'-':>9}"
        note = "" if num_steps == args.decode_tokens - 1 else f" (early stop @ {num_steps})"
        print(f"{batch_size:>6} {result['ttft']*1e3:>9.1f} {tpot*1e3:>9.2f} {tok_per_sec:>10,.0f} "
              f"{mbu:>7.1f} {mfu:>7.2f} {vram_text} {num_steps:>6}{note}")
        payload["sweep"].append({
            "batch_size": batch_size,
            "ttft_sec": round(result["ttft"], 6),
            "tpot_sec": round(tpot, 6),
            "tok_per_sec": round(tok_per_sec, 1),
            "mbu_percent": round(mbu, 2),
            "mfu_percent": round(mfu, 4),  # tiny at small batch; keep the digits
            "peak_vram_bytes": peak_vram,  # None off CUDA
            "decode_steps": num_steps,
        })

    # the very last line of stdout: the whole run, machine-readable
    print("-" * len(header))
    print(json.dumps(payload))

    compute_cleanup()


def main():
    parser = argparse.ArgumentParser(description="Inference benchmark")
    parser.add_argument("-i", "--source", type=str, default="base", help="Checkpoint source: base|sft|rl")
    parser.add_argument("-g", "--model-tag", type=str, default=None, help="Model tag to load")
    parser.add_argument("-s", "--step", type=int, default=None, help="Step to load (default = last)")
    parser.add_argument("--prompt-tokens", type=int, default=2048, help="Prompt length for prefill")
    parser.add_argument("--decode-tokens", type=int, default=256, help="Tokens to generate per row")
    parser.add_argument("--batch-sizes", type=str, default="1,8,32,128", help="Comma-separated decode batch sizes")
    parser.add_argument("-t", "--temperature", type=float, default=0.0)
    args = parser.parse_args()
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"infer_bench: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
