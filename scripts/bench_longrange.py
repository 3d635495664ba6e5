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

Exact match of token ids (no hashing): an (n+1)-gram is packed into one int64, so the vocabulary
must satisfy vocab^(n+1) < 2^63.
"""

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


def copyable_shares(arrays, sources, vocab, budget, history, n, horizon, deepest, stride):
    """source -> (tokens judged, share copyable from the last `budget` tokens, share copyable only from older)."""
    counts = {}
    for a, src in zip(arrays, sources):
        g = packed_grams(a, n, vocab)
        for t in range(deepest, len(a) - horizon + 1, stride):
            for j in range(t, t + horizon):
                # grams wholly inside the window: ending at k with k - n >= window start, k < j
                near = (g[j - budget + n:j] == g[j]).any()
                far = not near and (g[j - history + n:j - budget + n] == g[j]).any()
                c = counts.setdefault(src, [0, 0, 0])
                c[0] += 1
                c[1] += int(near)
                c[2] += int(far)
    return {src: (tot, near / tot, far / tot) for src, (tot, near, far) in sorted(counts.items())}


def main(argv=None):
    args = parse_args(argv)
    if not 0 < args.budget < args.history <= args.deepest:
        raise ValueError(f"need 0 < --budget ({args.budget}) < --history ({args.history}) <= --deepest ({args.deepest})")
    from nanochat.tokenizer import get_tokenizer
    from megacontext.longdocs import load_corpus
    tok = get_tokenizer()
    corpus = load_corpus(tok, args.split)
    shares = copyable_shares(corpus.arrays, corpus.sources, tok.get_vocab_size(), args.budget, args.history,
                             args.ngram, args.horizon, args.deepest, args.stride)
    print(f"{args.split} split, W = {args.budget}, history {args.history}, {args.ngram}-token context, "
          f"{args.horizon} tokens every {args.stride} from {args.deepest} deep")
    for src, (tot, near, far) in shares.items():
        print(f"  {src:12s} {tot:7,d} tokens: copyable from the last {args.budget}: {near:.3f}, "
              f"only from [t-{args.history}, t-{args.budget}): {far:.3f}")
    print("far-only copyable share: " + ", ".join(f"{src} {far:.3f}" for src, (_, _, far) in shares.items()))


if __name__ == "__main__":
    from scripts.bench_common import run_cli
    run_cli(main)
