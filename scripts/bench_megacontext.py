"""
MegaContext benchmarks (figures, not tests): ingest speed and memory, and gist quality (ΔNLL@H).

    python -m scripts.bench_megacontext ingest --model-tag cpu_tiny [--gistnet mc_000100.pt] [--tokens 1000000]
    python -m scripts.bench_megacontext delta-nll --model-tag cpu_tiny --gistnet PATH/mc_000100.pt

Both read the base model from $NANOCHAT_BASE_DIR/base_checkpoints/<tag> and print their
figures; --record also appends them as a dated section (commit, device, command) to
docs/benchmarks.md. Flags are parsed before torch is imported; bad input (a missing model
tag or GistNet file) is one 'error:' line (NANOCHAT_DEBUG=1 for the traceback).

ingest: streams a document of --tokens tokens (the val shards' text, repeated as needed) into a
  fresh MegaContext Tree, reporting gisting tok/s next to the base model's forward tok/s on the
  same device, and the process RSS after each quarter of the document (flat = memory does not
  grow with document length, because the tree lives in memory-mapped .ctx files).
delta-nll: ΔNLL@H exactly as DESIGN.md section 6 on held-out windows of the val split, for the
  trained GistNet and the mean-pool baseline side by side, with NLL_full, NLL_drop and the
  fraction of the drop recovered.
"""

import os
import sys
import time
import argparse
import tempfile
from datetime import date

from scripts.bench_common import (REPO_ROOT, DOCS_PATH, add_record_flag, record_section, describe_machine, git_commit,
                                  load_average, machine_line, run_cli)

TRAIN_GISTNET = "python -m nanochat.train --config configs/gistnet_cpu_tiny.yaml"


def check_gistnet_path(path):
    if path not in (None, "mean") and not os.path.isfile(path):
        raise FileNotFoundError(f"--gistnet {path} not found; train one with `{TRAIN_GISTNET}` "
                                f"(it writes base_checkpoints/<tag>_gistnet/mc_XXXXXX.pt) or pass --gistnet mean")


def load_gistnet(path, n_embd, device):
    """A trained GistNet from an mc_XXXXXX.pt (or {config, state_dict}) file; 'mean' = the baseline."""
    import torch
    from megacontext.gistnet import GistNet, GistNetConfig
    if path in (None, "mean"):
        return GistNet(GistNetConfig(n_embd=n_embd, head="mean")).to(device).init_weights(), "mean"
    check_gistnet_path(path)
    blob = torch.load(path, map_location=device)
    blob = blob.get("gistnet", blob) if isinstance(blob, dict) else blob
    if not (isinstance(blob, dict) and "config" in blob and "state_dict" in blob):
        raise ValueError(f"--gistnet {path} holds no GistNet (expected an mc_XXXXXX.pt written by `{TRAIN_GISTNET}`)")
    gistnet = GistNet(GistNetConfig(**blob["config"])).to(device)
    gistnet.load_state_dict(blob["state_dict"])
    return gistnet.eval(), os.path.basename(path)


def val_tokens(tokenizer, count):
    """At least `count` tokens of held-out text (the val shard), repeated if the shard is short."""
    import torch
    from nanochat.dataset import parquets_iter_batched
    bos = tokenizer.get_bos_token_id()
    ids = []
    while len(ids) < count:
        for texts in parquets_iter_batched("val"):
            for doc in tokenizer.encode(texts, prepend=bos):
                ids.extend(doc)
            if len(ids) >= count:
                break
    return torch.tensor(ids[:count], dtype=torch.long)


def record(section, enabled):
    print(section)
    if enabled:
        record_section(section, DOCS_PATH)


def header(title):
    """Section heading plus the machine line and command, in bench_train's format."""
    load = load_average()
    return (f"## {title} ({date.today().isoformat()}, commit {git_commit(REPO_ROOT)})\n\n"
            f"Device: {machine_line(describe_machine(sys.executable))}; load average {load[0]:.2f}.\n"
            f"Command: `python -m scripts.bench_megacontext {' '.join(sys.argv[1:])}`\n")

# -----------------------------------------------------------------------------


def bench_ingest(args, model, tokenizer, device):
    import psutil
    import torch
    from megacontext.gistnet import token_embeddings
    from megacontext.tree import MegaContextTree
    gistnet, gist_name = load_gistnet(args.gistnet, model.config.n_embd, device)
    tokens = val_tokens(tokenizer, args.tokens)
    proc = psutil.Process()

    # the base model's own forward speed on the same device, as a yardstick
    T = model.config.sequence_len
    batch = tokens[:(len(tokens) // T) * T][:8 * T].view(-1, T).to(device)
    with torch.no_grad():
        model(batch[:1])  # warm up
        t0 = time.time()
        model(batch)
        forward_tok_s = batch.numel() / (time.time() - t0)

    def embed_fn(ids):
        return token_embeddings(model, ids)

    def gist_fn(x, level):
        with torch.no_grad():
            return gistnet(x, level)

    rss = []
    with tempfile.TemporaryDirectory() as tree_dir:
        tree = MegaContextTree.create(os.path.join(tree_dir, "tree"), model_name="bench", embedding_dim=model.config.n_embd,
                                      gistnet_name=gist_name, embed_fn=embed_fn, gist_fn=gist_fn, durable=False,
                                      batch_blocks=args.batch_blocks, device=device)
        quarter = len(tokens) // 4
        t0 = time.time()
        for i in range(4):
            for start in range(i * quarter, (i + 1) * quarter, 65536):
                tree.ingest(tokens[start:min(start + 65536, (i + 1) * quarter)].tolist())
            rss.append(proc.memory_info().rss / 2**20)
        ingest_s = time.time() - t0
        n_lod1, n_lod2 = tree.num_gists(1), tree.num_gists(2)
        tree.close()
    ingest_tok_s = 4 * quarter / ingest_s
    section = header("MegaContext ingest") + f"""
| document | GistNet | LOD1 / LOD2 gists | ingest tok/s | base forward tok/s | RSS after 1/4, 2/4, 3/4, 4/4 (MiB) |
|---|---|---|---|---|---|
| {4 * quarter:,} tokens | {gist_name} | {n_lod1:,} / {n_lod2:,} | {ingest_tok_s:,.0f} | {forward_tok_s:,.0f} | {', '.join(f'{r:.0f}' for r in rss)} |
"""
    record(section, args.record)


def bench_delta_nll(args, model, tokenizer, device):
    import torch
    from megacontext.losses import evaluate_delta_nll
    window = args.context_tokens + args.horizon
    tokens = val_tokens(tokenizer, window * args.positions)
    documents = list(tokens.view(args.positions, window))
    rows = []
    for spec in dict.fromkeys([args.gistnet, "mean"]):  # the baseline once, even when it is the one asked for
        gistnet, name = load_gistnet(spec, model.config.n_embd, device)
        with torch.no_grad():
            r = evaluate_delta_nll(model, gistnet, documents, context_tokens=args.context_tokens,
                                   horizon=args.horizon, stride=window)
        rows.append((name, r))
        print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()})
    lines = "\n".join(
        f"| {name} | {r['nll_full']:.4f} | {r['nll_drop']:.4f} | {r['delta_drop']:.4f} | {r['delta_lod1']:.4f} | "
        f"{r['recovered_lod1']:.3f} | {r['delta_lod2']:.4f} | {r['n_positions']} |" for name, r in rows)
    section = header("MegaContext ΔNLL@H") + f"""
Base model `{args.model_tag}`, context C = {args.context_tokens} tokens, horizon H = {args.horizon}, held-out windows
of the val split (one position per window). Units: nats/token. ΔNLL@H(L) = NLL_L − NLL_full;
recovered = 1 − ΔNLL/ΔNLL_drop (DESIGN.md section 6). LOD2 equals LOD1 unless C ≥ 1056.

| GistNet | NLL_full | NLL_drop | ΔNLL_drop | ΔNLL@H LOD1 | recovered LOD1 | ΔNLL@H LOD2 | positions |
|---|---|---|---|---|---|---|---|
{lines}
"""
    record(section, args.record)


def build_parser():
    parser = argparse.ArgumentParser(description="MegaContext benchmarks")
    parser.add_argument("what", choices=["ingest", "delta-nll"])
    parser.add_argument("--model-tag", type=str, required=True, help="base checkpoint tag under base_checkpoints/")
    parser.add_argument("--step", type=int, default=None, help="base checkpoint step (default: last)")
    parser.add_argument("--gistnet", type=str, default="mean", help="trained GistNet (mc_XXXXXX.pt) or 'mean'")
    parser.add_argument("--tokens", type=int, default=1_000_000, help="ingest: document length in tokens")
    parser.add_argument("--batch-blocks", type=int, default=256, help="ingest: blocks gisted per GistNet call")
    parser.add_argument("--context-tokens", type=int, default=224, help="delta-nll: context C (multiple of 32)")
    parser.add_argument("--horizon", type=int, default=32, help="delta-nll: horizon H")
    parser.add_argument("--positions", type=int, default=64, help="delta-nll: held-out windows")
    parser.add_argument("--device-type", type=str, default="", choices=["", "cuda", "cpu", "mps"],
                        help="cuda|cpu|mps (empty = autodetect)")
    add_record_flag(parser)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_gistnet_path(args.gistnet)  # before the slow part
    import torch  # after the flags are checked: a typo costs no torch import
    from nanochat.common import get_base_dir, autodetect_device_type
    from nanochat.checkpoint_manager import load_model_from_dir
    device = torch.device(args.device_type or autodetect_device_type())
    model, tokenizer, _ = load_model_from_dir(os.path.join(get_base_dir(), "base_checkpoints"), device, "eval",
                                              model_tag=args.model_tag, step=args.step)
    (bench_ingest if args.what == "ingest" else bench_delta_nll)(args, model, tokenizer, device)


if __name__ == "__main__":
    run_cli(main)
