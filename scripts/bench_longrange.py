"""
How much of the held-out natural text only distant context can predict by copying: a ceiling
indicator for the testbed's natural NLL gap (figures, not tests).

    python -m scripts.bench_longrange [--split test] [--budget 128] [--history 1024] [--ngram 3]

At the harness's natural-text candidate positions (every --stride tokens, at least --deepest deep,
as megacontext.eval draws them), for each of the next --horizon tokens: is the token the
continuation of its preceding --ngram tokens somewhere in the last --budget tokens ("near"), or
only in the older history [t - history, t - budget) ("far only")? A model that copies perfectly
gains on the far-only tokens and nowhere else when its recent window shrinks from the full history
to W; a model that does not copy gains little anywhere. Per source; the last line is

    far-only copyable share: SOURCE X.XXX, ...

With --model-tag (a base checkpoint under $NANOCHAT_BASE_DIR/base_checkpoints), the same tokens
are also scored by that model twice, by the harness's own `full` and `recency` methods
(megacontext.eval.Harness: BOS + the last `history` or `budget` tokens + the horizon), and the NLL gap recency - full (nats/token) is
printed for each class of token: far-only copyable, copyable near, neither (on a seeded sample
of --model-positions positions per source). It says whether the
model copies from distant natural text: a copier gains nats on the far-only tokens; the class's
share times its gap is its part of the testbed's natural gap.

Exact match of token ids (no hashing): an (n+1)-gram is packed into one int64, so the vocabulary
must satisfy vocab^(n+1) < 2^63.
"""

import random
import argparse

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--budget", type=int, default=128, help="W: the recent window, tokens")
    p.add_argument("--history", type=int, default=1024, help="the full history, tokens")
    p.add_argument("--ngram", type=int, default=3, help="tokens of context that must match before the copied token")
    p.add_argument("--horizon", type=int, default=32, help="tokens judged per position (the harness's H)")
    p.add_argument("--deepest", type=int, default=2048, help="first position (the harness's 16 x W)")
    p.add_argument("--stride", type=int, default=256, help="spacing of positions (the harness's stride)")
    p.add_argument("--model-tag", default=None, help="also score the tokens with this base checkpoint (full vs recency)")
    p.add_argument("--device-type", default="cpu", help="cpu | cuda | mps, with --model-tag")
    p.add_argument("--batch-rows", type=int, default=16, help="rows per forward, with --model-tag")
    p.add_argument("--model-positions", type=int, default=64, help="positions per source the model scores (a seeded sample)")
    return p.parse_args(argv)


def packed_grams(tokens, n, vocab):
    """int64 id of the (n+1)-gram ending at each position (-1 for the first n positions)."""
    if vocab ** (n + 1) >= 2 ** 63:
        raise ValueError(f"--ngram {n} with a {vocab}-token vocabulary does not fit an int64; lower --ngram")
    a = tokens.astype(np.int64)
    grams = np.full(len(a), -1, dtype=np.int64)
    packed = np.zeros(len(a) - n, dtype=np.int64)
    for k in range(n + 1):
        packed = packed * vocab + a[k:len(a) - n + k]
    grams[n:] = packed
    return grams


def token_classes(arrays, vocab, budget, history, n, horizon, deepest, stride):
    """[(doc index, t, classes (horizon,) of 'near' | 'far' | 'none')] at every judged position."""
    out = []
    for d, a in enumerate(arrays):
        g = packed_grams(a, n, vocab)
        for t in range(deepest, len(a) - horizon + 1, stride):
            classes = []
            for j in range(t, t + horizon):
                # grams wholly inside the window: ending at k with k - n >= window start, k < j
                if (g[j - budget + n:j] == g[j]).any():
                    classes.append("near")
                elif (g[j - history + n:j - budget + n] == g[j]).any():
                    classes.append("far")
                else:
                    classes.append("none")
            out.append((d, t, classes))
    return out


def copyable_shares(judged, sources):
    """source -> (tokens judged, share copyable from the last `budget` tokens, share copyable only from older)."""
    counts = {}
    for d, _, classes in judged:
        c = counts.setdefault(sources[d], [0, 0, 0])
        c[0] += len(classes)
        c[1] += classes.count("near")
        c[2] += classes.count("far")
    return {src: (tot, near / tot, far / tot) for src, (tot, near, far) in sorted(counts.items())}


def model_gaps(model, tokenizer, arrays, sources, judged, budget, history, batch_rows):
    """source -> class -> (tokens, mean NLL recency - full) over the judged tokens, each method
    scored by the harness itself (megacontext.eval.Harness: BOS + the last `history` or `budget`
    tokens + the horizon)."""
    from megacontext.eval import DEFAULTS, Harness
    harness = Harness(model, tokenizer, dict(DEFAULTS, budget_tokens=budget, batch_rows=batch_rows))
    horizon = len(judged[0][2])
    histories = [arrays[d][t - history:t].astype(np.int64) for d, t, _ in judged]
    horizons = [arrays[d][t:t + horizon].astype(np.int64) for d, t, _ in judged]
    full = harness.run("full", histories, horizons)["nll"]
    recency = harness.run("recency", histories, horizons)["nll"]
    gaps = {}
    for k, (d, _, classes) in enumerate(judged):
        for j, cls in enumerate(classes):
            gaps.setdefault(sources[d], {}).setdefault(cls, []).append(float(recency[k][j] - full[k][j]))
    return {src: {cls: (len(v), float(np.mean(v))) for cls, v in sorted(by.items())} for src, by in sorted(gaps.items())}


def main(argv=None):
    args = parse_args(argv)
    if not 0 < args.budget < args.history <= args.deepest:
        raise ValueError(f"need 0 < --budget ({args.budget}) < --history ({args.history}) <= --deepest ({args.deepest})")
    from nanochat.tokenizer import get_tokenizer
    from megacontext.longdocs import load_corpus
    tok = get_tokenizer()
    corpus = load_corpus(tok, args.split)
    judged = token_classes(corpus.arrays, tok.get_vocab_size(), args.budget, args.history, args.ngram,
                           args.horizon, args.deepest, args.stride)
    shares = copyable_shares(judged, corpus.sources)
    print(f"{args.split} split, W = {args.budget}, history {args.history}, {args.ngram}-token context, "
          f"{args.horizon} tokens every {args.stride} from {args.deepest} deep")
    for src, (tot, near, far) in shares.items():
        print(f"  {src:12s} {tot:7,d} tokens: copyable from the last {args.budget}: {near:.3f}, "
              f"only from [t-{args.history}, t-{args.budget}): {far:.3f}")
    if args.model_tag:
        from nanochat.checkpoint_manager import load_model
        import torch
        model, _, _ = load_model("base", torch.device(args.device_type), phase="eval", model_tag=args.model_tag)
        if args.history + args.horizon + 1 > model.config.sequence_len:
            raise ValueError(f"--history {args.history} + --horizon {args.horizon} + BOS exceeds the model's "
                             f"sequence_len {model.config.sequence_len}; lower --history")
        rng = random.Random(0)
        by_source = {}
        for item in judged:
            by_source.setdefault(corpus.sources[item[0]], []).append(item)
        sample = [x for src in sorted(by_source) for x in rng.sample(by_source[src], min(args.model_positions, len(by_source[src])))]
        gaps = model_gaps(model, tok, corpus.arrays, corpus.sources, sample, args.budget, args.history, args.batch_rows)
        print(f"model {args.model_tag}: NLL gap recency - full (nats/token) by class of token")
        for src, by in gaps.items():
            total = sum(n for n, _ in by.values())
            overall = sum(n * g for n, g in by.values()) / total
            print(f"  {src:12s} all {overall:+.3f} | " + " | ".join(
                f"{cls} {g:+.3f} (share {n / total:.3f}, part {n * g / total:+.3f})" for cls, (n, g) in by.items()))
    print("far-only copyable share: " + ", ".join(f"{src} {far:.3f}" for src, (_, _, far) in shares.items()))


if __name__ == "__main__":
    from scripts.bench_common import run_cli
    run_cli(main)
