"""
Checkpoint integrity overhead benchmark: what the SHA-256 checksums and the NaN/inf guard of
nanochat.checkpoint_manager.save_checkpoint cost, next to the training step time, at the CPU
preset (configs/cpu_tiny.yaml: d4, 256-token context, 8 x 256 micro-batches, 4096 tokens a step).

It builds the preset's model and optimizer, times a few real training steps (forward, backward,
optimizer step, on random tokens: the step time does not depend on the text), then times the
two additions on the state that a save would write:
    checksum   SHA-256 over the bytes of model_ and optim_ (what _HashingWriter hashes as it writes)
    nan scan   torch.isfinite over every floating tensor of the model and optimizer state
and a whole save_checkpoint for scale. Figures are medians over --repeats. It prints the cost
of one save as a fraction of one step, and of the preset's schedule (one save at the end of
num_iterations steps, or every --save-every steps). Nothing is written outside a temp dir.

    python -m scripts.bench_checkpoint [--steps 6] [--repeats 7] [--save-every N]
"""
import os
import io
import time
import hashlib
import argparse
import tempfile
import statistics

import torch
import yaml

from nanochat.gpt import GPT, GPTConfig
import nanochat.checkpoint_manager as cm

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=os.path.join(REPO_ROOT, "configs", "cpu_tiny.yaml"))
    parser.add_argument("--vocab-size", type=int, default=4096, help="the CPU preset's tokenizer size")
    parser.add_argument("--steps", type=int, default=6, help="timed training steps (after one warm-up)")
    parser.add_argument("--repeats", type=int, default=7, help="repeats of each checkpoint timing")
    parser.add_argument("--save-every", type=int, default=-1, help="-1: one save at the end, as the preset does")
    args = parser.parse_args()

    with open(args.config) as f:
        cfg = yaml.safe_load(f)
    depth, head_dim, seq = cfg["depth"], cfg["head_dim"], cfg["max_seq_len"]
    dim = ((depth * cfg["aspect_ratio"] + head_dim - 1) // head_dim) * head_dim
    config = GPTConfig(sequence_len=seq, vocab_size=args.vocab_size, n_layer=depth, n_head=dim // head_dim,
                       n_kv_head=dim // head_dim, n_embd=dim, window_pattern=cfg["window_pattern"])
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    optimizer = model.setup_optimizer()
    batch = cfg["device_batch_size"]
    accum = cfg["total_batch_size"] // (batch * seq)

    def train_step():
        for _ in range(accum):
            x = torch.randint(0, args.vocab_size, (batch, seq))
            loss = model(x, torch.roll(x, -1, dims=1))
            loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)

    train_step()  # warm-up, and it fills the optimizer state a save writes
    step_s = median_seconds(train_step, args.steps)

    model_sd, optim_sd = model.state_dict(), optimizer.state_dict()
    blobs = []
    for obj in (model_sd, optim_sd):
        buf = io.BytesIO()
        torch.save(obj, buf)
        blobs.append(buf.getvalue())
    nbytes = sum(len(b) for b in blobs)
    hash_s = median_seconds(lambda: [hashlib.sha256(b).hexdigest() for b in blobs], args.repeats)
    scan_s = median_seconds(lambda: (cm._first_non_finite(model_sd), cm._first_non_finite(optim_sd)), args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        meta = {"step": 1, "model_config": vars(config)}
        save_s = median_seconds(lambda: cm.save_checkpoint(tmp, 1, model_sd, optim_sd, meta), args.repeats)

    added = hash_s + scan_s
    steps_per_save = args.save_every if args.save_every > 0 else cfg["num_iterations"]
    print(f"config: {os.path.relpath(args.config, REPO_ROOT)} (d{depth}, n_embd={dim}, vocab {args.vocab_size}, "
          f"{cfg['total_batch_size']} tokens/step), torch threads {torch.get_num_threads()}")
    print(f"checkpoint bytes (model + optim): {nbytes / 1e6:.1f} MB")
    print(f"train step:        {step_s * 1e3:9.1f} ms (median of {args.steps})")
    print(f"sha256 checksums:  {hash_s * 1e3:9.2f} ms ({nbytes / hash_s / 1e9:.2f} GB/s)")
    print(f"nan/inf scan:      {scan_s * 1e3:9.2f} ms")
    print(f"whole save:        {save_s * 1e3:9.1f} ms (write + fsync + rename + checksums + scan + manifest)")
    print(f"checksum + scan per save = {100 * added / step_s:.2f}% of one step; "
          f"with one save every {steps_per_save} steps = {100 * added / (steps_per_save * step_s):.4f}% of step time "
          f"(requirement: <= 1%)")


if __name__ == "__main__":
    main()
