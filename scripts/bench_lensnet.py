"""
LensNet's cost next to the base model's (figures, not tests): scoring one WC vs one base-model
forward over the same WC.

    python -m scripts.bench_lensnet [--model-tag longctx_cpu] [--budget 128] [--history 1024] [--repeats 30]

The base model is the checkpoint $NANOCHAT_BASE_DIR/base_checkpoints/<--model-tag> when given, else a
random GPT of the testbed's shape (--depth 4, --aspect-ratio 64, --head-dim 64, --vocab-size 4096,
--max-seq-len 1088). The WC is WorkingContext.recency(--history, --budget) over random tokens, with
random gists (values do not change the cost); LensNet (untrained, --d-model/--n-layer/--n-head)
scores it with all LOD2 + the last 256 LOD1 gists as tail gists. Timed: LensNet.score_wc (entry
vectors, features, forward, masking) and one base forward over [BOS] + the WC's slots, the medians
of --repeats calls each, in turns, after a warm-up, in --threads threads. FLOPs: LensNet's forward (lensnet_flops)
vs the base forward (2 x matmul params x slots + causal attention). Last line:

    lensnet cost / base forward: X.X% (time), Y.Y% (flops)
"""

import argparse
import statistics
import time

from scripts.bench_common import run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-tag", default=None, help="base checkpoint tag (default: a random GPT of the shape below)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--aspect-ratio", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--max-seq-len", type=int, default=1088)
    p.add_argument("--budget", type=int, default=128, help="W, token-equivalents")
    p.add_argument("--history", type=int, default=1024, help="history length in tokens")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.budget < 64 or args.history < 1:
        raise ValueError("--repeats must be >= 1, --budget >= 64 and --history >= 1")
    return args


def interleaved_medians(fns, repeats):
    """Median seconds of each function, called in turns (so load on a shared machine hits them alike)."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def main(argv=None):
    args = parse_args(argv)
    import torch
    from nanochat.gpt import GPT, GPTConfig
    from megacontext.gistnet import token_embeddings
    from megacontext.lensnet import LensNet, LensNetConfig, lensnet_flops, tail_gists_of
    from megacontext.working_context import WorkingContext, TensorStore
    torch.set_num_threads(args.threads)

    # --- base model
    if args.model_tag:
        import os
        from nanochat.checkpoint_manager import build_model, find_last_step
        from nanochat.common import get_base_dir
        checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", args.model_tag)
        if not os.path.isdir(checkpoint_dir):
            raise FileNotFoundError(f"no base checkpoint {checkpoint_dir}; check --model-tag or NANOCHAT_BASE_DIR")
        model, _, _ = build_model(checkpoint_dir, find_last_step(checkpoint_dir), torch.device("cpu"), phase="eval")
    else:
        dim = args.depth * args.aspect_ratio
        dim = -(-dim // args.head_dim) * args.head_dim
        with torch.device("meta"):
            model = GPT(GPTConfig(sequence_len=args.max_seq_len, vocab_size=args.vocab_size, n_layer=args.depth,
                                  n_head=dim // args.head_dim, n_kv_head=dim // args.head_dim, n_embd=dim,
                                  window_pattern="L"))
        model.to_empty(device="cpu")
        model.init_weights()
    model.eval()
    cfg = model.config
    D = cfg.n_embd

    # --- the WC and its store
    g = torch.Generator().manual_seed(0)
    N = args.history
    tokens = torch.randint(0, cfg.vocab_size, (N,), generator=g)
    lod1 = torch.randn(N // 32, D, generator=g)
    lod2 = torch.randn(N // 1024, D, generator=g)
    store = TensorStore(tokens, lod1, lod2)
    wc = WorkingContext.recency(N, args.budget)
    tail = tail_gists_of(lod1, lod2, 256)
    lens = LensNet(LensNetConfig(n_embd=D, d_model=args.d_model, n_layer=args.n_layer, n_head=args.n_head)).init_weights(0).eval()
    embed = lambda ids: token_embeddings(model, ids)

    # --- timings
    from megacontext.base_inputs import gist_inputs
    inputs = wc.to_tensors(store, embed)
    T = 1 + len(inputs["token_ids"])
    idx = torch.cat([torch.zeros(1, dtype=torch.long), inputs["token_ids"]])[None]
    mask = torch.cat([torch.zeros(1, dtype=torch.bool), inputs["gist_mask"]])[None]
    vectors = torch.cat([torch.zeros(1, D), inputs["inputs_embeds"].float()])[None].to(inputs["inputs_embeds"].dtype)

    def base_forward():
        with torch.no_grad(), gist_inputs(model, mask, vectors):
            model(idx)

    def score():
        lens.score_wc(wc, store, embed, tail_gists=tail)

    t_base, t_lens = interleaved_medians([base_forward, score], args.repeats)
    n_tail = 0 if tail is None else len(tail)
    f_lens = lensnet_flops(lens.config, len(wc), n_tail)
    f_base = 2 * model.num_matmul_params() * T + cfg.n_layer * 2 * 2 * D * T * (T + 1) // 2

    print(f"base model: d{cfg.n_layer}, n_embd {D}, vocab {cfg.vocab_size}"
          f"{' (' + args.model_tag + ')' if args.model_tag else ' (random)'}; WC {wc} -> {T} slots with BOS")
    print(f"LensNet: d_model {args.d_model}, {args.n_layer} layers, {lens.num_params():,} params; "
          f"{len(wc)} entries, {n_tail} tail gists")
    print(f"base forward:   {t_base * 1e3:8.3f} ms  {f_base / 1e6:10.2f} MFLOP")
    print(f"LensNet score:  {t_lens * 1e3:8.3f} ms  {f_lens / 1e6:10.2f} MFLOP")
    print(f"lensnet cost / base forward: {100 * t_lens / t_base:.1f}% (time), {100 * f_lens / f_base:.1f}% (flops)")


if __name__ == "__main__":
    run_cli(main)
