"""
MegaContext benchmarks (figures, not tests): ingest speed and memory, and gist quality (ΔNLL@H).

    python -m scripts.bench_megacontext ingest --model-tag cpu_tiny [--gistnet mc_000100.pt] [--tokens 1000000]
    python -m scripts.bench_megacontext delta-nll --model-tag cpu_tiny --gistnet PATH/mc_000100.pt
    python -m scripts.bench_megacontext decode [--model-tag TAG] [--histories 1000,100000,1000000]
    python -m scripts.bench_megacontext step --config configs/megacontext_cpu.yaml [--rounds 10]

ingest and delta-nll read the base model from $NANOCHAT_BASE_DIR/base_checkpoints/<tag> (decode
does when --model-tag is given, else it builds a random GPT from flags) and print their figures; --record also appends them as a dated section (commit, device, command) to
docs/benchmarks.md. Flags are parsed before torch is imported; bad input (a missing model
tag or GistNet file) is one 'error:' line (NANOCHAT_DEBUG=1 for the traceback).

ingest: streams a document of --tokens tokens (the val shards' text, repeated as needed) into a
  fresh MegaContext Tree, reporting gisting tok/s next to the base model's forward tok/s on the
  same device, and the process RSS after each quarter of the document (flat = memory does not
  grow with document length, because the tree lives in memory-mapped .ctx files).
delta-nll: ΔNLL@H exactly as DESIGN.md section 6 on held-out windows of the val split, for the
  trained GistNet and the mean-pool baseline side by side, with NLL_full, NLL_drop and the
  fraction of the drop recovered.
decode: the runtime's decode cost as a function of history length (megacontext/runtime.py). Trees
  of each --histories length are built first (random token ids, mean-pool gists: cheap, and the
  cost of a decode does not depend on the values), then one worker process per history opens
  its tree and a MegaContextRuntime at the same W and K, and the workers decode in turns (rounds
  x histories x {KV reuse, full recompute}, the history order rotated per round), so load on a
  shared machine hits them alike. Per history: decode tok/s (wall time of generate(), refocus and
  KV recompute included), refocus (extend + LensNet + allocator) as a share of decode time, the
  share of KV slots recomputed per refocus, the speedup of KV reuse over recomputing the whole
  WC at every refocus, and the worker's peak RSS. --lensnet random (default) uses an untrained
  LensNet with a random head: its choices mean nothing, but it acts, so its latency and the
  recompute share under changing focus are real; none = frozen focus. The last line is
  `decode tok/s 1M/1k: X.XX, peak RSS 1M/1k: Y.YY` (largest history over smallest).
step: the cost of one end-to-end MegaContext training step (megacontext/end_to_end.py, the run
  config's `megacontext:` section and model shape) against one vanilla step over the same rows:
  B x WCs-per-row rows of 1 + W + H - 1 positions, forward + backward + optimizer step of the whole
  base model. The same model (compiled unless NANOCHAT_COMPILE=0) runs both, interleaved
  (vanilla, then each phase, per round; warm-up rounds first), so load on a shared machine hits
  them alike. Per phase it prints the median step time, the ratio to vanilla and where the time
  goes (gists, WC layouts + LensNet refocus, base model forward/backward, LensNet loss, optimizer).
  The last line is `step cost ratio megacontext/vanilla: X.XX` for the phase that costs most.
"""

import os
import math
import sys
import time
import argparse
import tempfile
import multiprocessing
import statistics
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
        f"{'n/a' if math.isnan(r['recovered_lod1']) else format(r['recovered_lod1'], '.3f')} | {r['delta_lod2']:.4f} | {r['n_positions']} |" for name, r in rows)
    section = header("MegaContext ΔNLL@H") + f"""
Base model `{args.model_tag}`, context C = {args.context_tokens} tokens, horizon H = {args.horizon}, held-out windows
of the val split (one position per window). Units: nats/token. ΔNLL@H(L) = NLL_L − NLL_full;
recovered = 1 − ΔNLL/ΔNLL_drop (DESIGN.md section 6). LOD2 equals LOD1 unless C ≥ 1056.

| GistNet | NLL_full | NLL_drop | ΔNLL_drop | ΔNLL@H LOD1 | recovered LOD1 | ΔNLL@H LOD2 | positions |
|---|---|---|---|---|---|---|---|
{lines}
"""
    record(section, args.record)


# -----------------------------------------------------------------------------
# decode: the runtime's cost per token against history length


def _history_label(n):
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else (
        f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n))


class _BosOnly:
    """The runtime needs only the BOS id from a tokenizer (the random model has none)."""

    def __init__(self, bos):
        self.bos = bos

    def get_bos_token_id(self):
        return self.bos


def _decode_model(spec, device):
    """(model, tokenizer): the checkpoint of --model-tag, or a random GPT sized by the flags (the
    same weights in every process: init_weights draws from the seeded global RNG)."""
    import torch
    from nanochat.gpt import GPT, GPTConfig
    if spec["model_tag"]:
        from nanochat.common import get_base_dir
        from nanochat.checkpoint_manager import load_model_from_dir
        model, tokenizer, _ = load_model_from_dir(os.path.join(get_base_dir(), "base_checkpoints"), device, "eval",
                                                  model_tag=spec["model_tag"], step=spec["step"])
        return model, tokenizer
    torch.manual_seed(spec["seed"])
    dim = spec["depth"] * spec["aspect_ratio"]
    dim = -(-dim // spec["head_dim"]) * spec["head_dim"]
    config = GPTConfig(sequence_len=spec["sequence_len"], vocab_size=spec["vocab_size"], n_layer=spec["depth"],
                       n_head=dim // spec["head_dim"], n_kv_head=dim // spec["head_dim"], n_embd=dim,
                       window_pattern="L")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model.eval(), _BosOnly(spec["vocab_size"] - 1)


def _focus(spec, n_embd, device):
    """(lensnet, allocator) for --lensnet: none, random (untrained, random head) or a checkpoint."""
    if spec["lensnet"] == "none":
        return None, None
    import torch
    from megacontext.allocator import FocusAllocator
    from megacontext.lensnet import LensNet, LensNetConfig, load_lensnet
    if spec["lensnet"] == "random":
        lensnet = LensNet(LensNetConfig(n_embd=n_embd)).init_weights(seed=spec["seed"])
        with torch.no_grad():  # init_weights zeroes the head (scores 0 = no action): give it random weights
            g = torch.Generator().manual_seed(spec["seed"])
            lensnet.head.weight.copy_(torch.randn(lensnet.head.weight.shape, generator=g))
        lensnet = lensnet.to(device).eval()
    else:
        lensnet = load_lensnet(spec["lensnet"], n_embd, device)
        lensnet.gistnet_identity = None  # the bench's trees are mean-pooled
    return lensnet, FocusAllocator()


def _decode_worker(conn, spec, tree_dir):
    """One history: open its tree and a runtime, then decode on request; replies with figures."""
    import resource
    import torch
    from megacontext.gistnet import GistNet, GistNetConfig
    from megacontext.runtime import MegaContextRuntime, open_tree
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    model, tokenizer = _decode_model(spec, device)
    tree = open_tree(tree_dir, model, GistNet(GistNetConfig(n_embd=model.config.n_embd, head="mean")),
                     model_name="bench", durable=False)
    lensnet, allocator = _focus(spec, model.config.n_embd, device)
    rt = MegaContextRuntime(model, tokenizer, tree, budget_tokens=spec["budget"], refocus_every=spec["refocus_every"],
                            lensnet=lensnet, allocator=allocator)
    conn.send({"entries": len(rt.wc), "lod": [int((rt.wc.levels == lv).sum()) for lv in range(3)]})
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    while (msg := conn.recv()) is not None:
        reuse, n = msg
        rt.reuse_kv = reuse
        seen, refocus_s, recompute_s, recomputed, total, refocuses = rt.last, 0.0, 0.0, 0, 0, 0
        sync()
        t0 = time.perf_counter()
        for _ in rt.generate(n, temperature=0.0):
            if rt.last is not seen:  # a refocus just ran
                seen = rt.last
                refocuses += 1
                refocus_s += seen["refocus_s"]
                recompute_s += seen["recompute_s"]
                recomputed += seen["recomputed_slots"]
                total += 1 + seen["cost"]
        sync()
        wall = time.perf_counter() - t0
        conn.send({"tokens": n, "wall_s": wall, "refocus_s": refocus_s, "recompute_s": recompute_s,
                   "refocuses": refocuses, "recomputed_slots": recomputed, "wc_slots": total,
                   "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    rt.close()
    tree.close()


def _build_trees(spec, histories, root, device):
    """A tree of n random tokens per history, mean-pool gists; returns seconds per tree."""
    import numpy as np
    import torch
    from megacontext.gistnet import GistNet, GistNetConfig
    from megacontext.runtime import open_tree
    torch.set_num_threads(spec["threads"])
    model, _ = _decode_model(spec, device)
    gistnet = GistNet(GistNetConfig(n_embd=model.config.n_embd, head="mean"))
    rng = np.random.default_rng(spec["seed"])
    seconds = {}
    for n in histories:
        t0 = time.time()
        with open_tree(os.path.join(root, str(n)), model, gistnet, model_name="bench", durable=False) as tree:
            for a in range(0, n, 1 << 16):
                tree.ingest(rng.integers(0, model.config.vocab_size - 1, size=min(1 << 16, n - a)))
        seconds[n] = time.time() - t0
    return seconds


def bench_decode(args):
    histories = sorted({int(h) for h in args.histories.split(",")})
    device = args.device_type or ("cuda" if _cuda_available() else "cpu")
    spec = dict(model_tag=args.model_tag, step=args.step, seed=args.seed, depth=args.depth,
                aspect_ratio=args.aspect_ratio, head_dim=args.head_dim, vocab_size=args.vocab_size,
                sequence_len=args.sequence_len, budget=args.budget, refocus_every=args.refocus_every,
                lensnet=args.lensnet, threads=args.threads, device=device)
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as root:
        import torch
        t0 = time.time()
        build_s = _build_trees(spec, histories, root, torch.device(device))
        print(f"built trees of {', '.join(f'{n:,}' for n in histories)} tokens (random ids, mean-pool gists) "
              f"in {time.time() - t0:.0f}s", flush=True)
        workers = {}
        for n in histories:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_decode_worker, args=(child, spec, os.path.join(root, str(n))), daemon=True)
            proc.start()
            workers[n] = (proc, parent)
        try:
            layout = {n: workers[n][1].recv() for n in histories}
            for n in histories:  # warm-up: first forwards allocate and fill caches
                workers[n][1].send((True, args.refocus_every))
                workers[n][1].recv()
            results = {(n, reuse): [] for n in histories for reuse in (True, False)}
            for r in range(args.rounds):
                order = histories[r % len(histories):] + histories[:r % len(histories)]
                for reuse in (True, False):
                    for n in order:
                        workers[n][1].send((reuse, args.decode_tokens))
                        results[(n, reuse)].append(workers[n][1].recv())
                print(f"round {r + 1}/{args.rounds} done", flush=True)
        finally:
            for proc, conn in workers.values():
                try:
                    conn.send(None)
                except OSError:
                    pass
                proc.join(timeout=30)
                if proc.is_alive():
                    proc.kill()

    def total(n, reuse, key):
        return sum(x[key] for x in results[(n, reuse)])

    rows, figures = [], {}
    for n in histories:
        # the median turn: a shared machine's load comes in bursts that a pooled mean would absorb unevenly
        tok_s = statistics.median(x["tokens"] / x["wall_s"] for x in results[(n, True)])
        full_tok_s = statistics.median(x["tokens"] / x["wall_s"] for x in results[(n, False)])
        refocus_share = total(n, True, "refocus_s") / total(n, True, "wall_s")
        recomputed = total(n, True, "recomputed_slots") / max(total(n, True, "wc_slots"), 1)
        rss = max(x["peak_rss_mib"] for x in results[(n, True)] + results[(n, False)])
        refocus_ms = 1000 * total(n, True, "refocus_s") / max(total(n, True, "refocuses"), 1)
        recompute_ms = {reuse: 1000 * total(n, reuse, "recompute_s") / max(total(n, reuse, "refocuses"), 1)
                        for reuse in (True, False)}
        figures[n] = (tok_s, rss)
        lod = layout[n]["lod"]
        rows.append(f"| {n:,} | {build_s[n]:.1f} | {lod[0]}/{lod[1]}/{lod[2]} | {tok_s:,.1f} | "
                    f"{1000 / tok_s:.2f} | {refocus_ms:.2f} | {refocus_share:.1%} | {recomputed:.1%} | "
                    f"{recompute_ms[True]:.1f} / {recompute_ms[False]:.1f} | {full_tok_s:,.1f} | "
                    f"{tok_s / full_tok_s:.2f}x | {rss:,.0f} |")
    model = f"`{args.model_tag}`" if args.model_tag else (
        f"random GPT (depth {args.depth}, n_embd {-(-args.depth * args.aspect_ratio // args.head_dim) * args.head_dim}, "
        f"vocab {args.vocab_size})")
    lensnet = {"random": "untrained LensNet with a random head + FocusAllocator defaults",
               "none": "none (frozen focus: budget keeping only)"}.get(args.lensnet, f"LensNet `{args.lensnet}`")
    section = header("MegaContext decode vs history") + f"""
Model: {model}; W = {args.budget}, K = {args.refocus_every}; focus: {lensnet}; trees of random token ids with
mean-pool gists; {args.rounds} rounds x {args.decode_tokens} greedy tokens per history and mode, interleaved;
{args.threads} torch thread(s) per worker. tok/s: median over rounds, refocus and KV recompute included. Recomputed = KV slots recomputed
per refocus / slots held; "full" = the whole WC recomputed at every refocus.

| history | tree build s | WC LOD0/1/2 at start | decode tok/s | ms/token | refocus ms | refocus / decode | recomputed | KV recompute ms per refocus, reuse / full | full-recompute tok/s | KV reuse speedup | peak RSS MiB |
|---|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""
    record(section, args.record)
    lo, hi = histories[0], histories[-1]
    print(f"decode tok/s {_history_label(hi)}/{_history_label(lo)}: {figures[hi][0] / figures[lo][0]:.2f}, "
          f"peak RSS {_history_label(hi)}/{_history_label(lo)}: {figures[hi][1] / figures[lo][1]:.2f}")


def bench_step(args):
    """End-to-end step vs vanilla step over the same WC rows (module docstring)."""
    import torch
    from nanochat import hooks
    from nanochat.common import autodetect_device_type, print0
    from nanochat.tokenizer import get_tokenizer
    from nanochat.train import build_model_meta, build_parser as train_parser
    from megacontext.end_to_end import EndToEndVariant
    defaults = vars(train_parser().parse_args([]))
    settings, variant_name, variant_config = hooks.load_run_config(args.config, {}, defaults, {"data": {}})
    if variant_name != "megacontext" or "phases" not in variant_config:
        raise ValueError(f"{args.config} is not an end-to-end MegaContext config (variant: megacontext with phases)")
    settings["device_type"] = args.device_type or settings["device_type"] or autodetect_device_type()
    device = torch.device(settings["device_type"])
    run_args = argparse.Namespace(**settings)
    torch.manual_seed(0)
    tokenizer = get_tokenizer()
    model = build_model_meta(run_args, settings["depth"], tokenizer.get_vocab_size())
    model.to_empty(device=device)
    model.init_weights()
    variant = EndToEndVariant(dict(variant_config, run_name="bench_step"))
    groups = variant.build(model, dict(settings, model_tag="bench_step"), resuming=False)
    model.requires_grad_(True)  # the vanilla step trains the whole base; each phase sets its own below
    compiled = torch.compile(model, dynamic=False) if os.environ.get("NANOCHAT_COMPILE", "1") != "0" else model
    optimizer = model.setup_optimizer()
    hooks.add_param_groups(optimizer, groups)
    loader = variant.train_loader(tokenizer, settings["device_batch_size"], settings["max_seq_len"], device, None)
    rows = variant.wcs_per_row * settings["device_batch_size"]
    T = variant.row_length
    gen = torch.Generator(device="cpu").manual_seed(0)
    idx = torch.randint(0, tokenizer.get_vocab_size(), (rows, T), generator=gen).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    from contextlib import nullcontext

    def vanilla_step():
        for p in model.parameters():
            p.requires_grad_(True)
        with variant.lora.disabled() if variant.lora is not None else nullcontext():  # the plain GPT
            compiled(idx, idx).backward()
        hooks.before_optimizer_step(None, optimizer, torch.zeros(()), 0, "")
        optimizer.step()
        hooks.after_optimizer_step(optimizer)

    def mc_step(step, train):
        for p in model.parameters():
            p.requires_grad_("base" in train)
        batch = next(loader)
        t = time.time()
        loss, metrics = variant.loss(compiled, batch[:2], step)
        sync()
        t_loss = time.time() - t
        t = time.time()
        loss.backward()
        sync()
        t_backward = time.time() - t
        t = time.time()
        hooks.before_optimizer_step(variant, optimizer, loss.detach(), step, "")
        optimizer.step()
        hooks.after_optimizer_step(optimizer)
        sync()
        return dict(loss_s=t_loss, backward_s=t_backward, optimizer_s=time.time() - t, wcs_s=metrics["wcs_s"],
                    lens_s=metrics["lens_s"], tokens=metrics["tokens"])

    # one step index inside each distinct phase (the trains-set decides the cost)
    starts, seen, offset = [], set(), 0
    for name, steps, train in variant.phases:
        if train not in seen:
            seen.add(train)
            starts.append((name, offset, train))
        offset += steps
    times = {"vanilla": []}
    parts = {name: [] for name, _, _ in starts}
    times.update({name: [] for name, _, _ in starts})
    print0(f"{rows} rows x {T} positions per step; phases {', '.join(n for n, _, _ in starts)}; "
           f"{args.warmup} warm-up + {args.rounds} timed rounds")
    for round_ in range(args.warmup + args.rounds):
        sync()
        t = time.time()
        vanilla_step()
        sync()
        if round_ >= args.warmup:
            times["vanilla"].append(time.time() - t)
        for name, step, train in starts:
            sync()
            t = time.time()
            split = mc_step(step, train)
            sync()
            if round_ >= args.warmup:
                times[name].append(time.time() - t)
                parts[name].append(split)
    variant.finish()
    base = statistics.median(times["vanilla"])
    lines = [header("MegaContext training step vs vanilla"),
             f"Rows per step: {rows} x {T} positions (B={settings['device_batch_size']} rows x {variant.wcs_per_row} WCs); "
             f"vanilla = forward + backward + optimizer of the whole base model on the same shape.\n",
             "| step | median s | / vanilla | loss() s (of which WC layouts + refocus, LensNet loss) | backward s | optimizer s |",
             "|---|---:|---:|---|---:|---:|",
             f"| vanilla | {base:.3f} | 1.00 | | | |"]
    worst = 0.0
    for name, _, train in starts:
        med = statistics.median(times[name])
        pm = {k: statistics.median(p[k] for p in parts[name]) for k in ("loss_s", "backward_s", "optimizer_s", "wcs_s", "lens_s")}
        worst = max(worst, med / base)
        lines.append(f"| {name} [{'+'.join(sorted(train))}] | {med:.3f} | {med / base:.2f} | {pm['loss_s']:.3f} "
                     f"({pm['wcs_s']:.3f}, {pm['lens_s']:.3f}) | {pm['backward_s']:.3f} | {pm['optimizer_s']:.3f} |")
    lines.append(f"\nstep cost ratio megacontext/vanilla: {worst:.2f}")
    record("\n".join(lines) + "\n", args.record)


def _cuda_available():
    import torch
    return torch.cuda.is_available()


def build_parser():
    parser = argparse.ArgumentParser(description="MegaContext benchmarks")
    parser.add_argument("what", choices=["ingest", "delta-nll", "decode", "step"])
    parser.add_argument("--config", type=str, default="configs/megacontext_cpu.yaml",
                        help="step: an end-to-end run config (variant: megacontext with phases)")
    parser.add_argument("--warmup", type=int, default=2, help="step: untimed rounds first (compilation)")
    parser.add_argument("--model-tag", type=str, default=None,
                        help="base checkpoint tag under base_checkpoints/ (required for ingest and delta-nll; "
                             "decode: default a random GPT from the flags below)")
    parser.add_argument("--step", type=int, default=None, help="base checkpoint step (default: last)")
    parser.add_argument("--gistnet", type=str, default="mean", help="trained GistNet (mc_XXXXXX.pt) or 'mean'")
    parser.add_argument("--tokens", type=int, default=1_000_000, help="ingest: document length in tokens")
    parser.add_argument("--batch-blocks", type=int, default=256, help="ingest: blocks gisted per GistNet call")
    parser.add_argument("--context-tokens", type=int, default=224, help="delta-nll: context C (multiple of 32)")
    parser.add_argument("--horizon", type=int, default=32, help="delta-nll: horizon H")
    parser.add_argument("--positions", type=int, default=64, help="delta-nll: held-out windows")
    parser.add_argument("--histories", type=str, default="1000,100000,1000000", help="decode: history lengths (tokens)")
    parser.add_argument("--budget", type=int, default=128, help="decode: working-context budget W")
    parser.add_argument("--refocus-every", type=int, default=32, help="decode: K, tokens between refocuses")
    parser.add_argument("--decode-tokens", type=int, default=64, help="decode: tokens per history, mode and round")
    parser.add_argument("--rounds", type=int, default=8, help="decode, step: interleaved rounds (medians are reported)")
    parser.add_argument("--lensnet", type=str, default="random", help="decode: random | none | a LensNet tag or mc file")
    parser.add_argument("--threads", type=int, default=1, help="decode: torch threads per process")
    parser.add_argument("--depth", type=int, default=4, help="decode, random model: depth")
    parser.add_argument("--aspect-ratio", type=int, default=64, help="decode, random model: n_embd = depth * aspect_ratio")
    parser.add_argument("--head-dim", type=int, default=64, help="decode, random model: head dimension")
    parser.add_argument("--vocab-size", type=int, default=32768, help="decode, random model: vocabulary")
    parser.add_argument("--sequence-len", type=int, default=1088, help="decode, random model: sequence_len")
    parser.add_argument("--seed", type=int, default=0, help="decode: weights and token ids")
    parser.add_argument("--device-type", type=str, default="", choices=["", "cuda", "cpu", "mps"],
                        help="cuda|cpu|mps (empty = autodetect)")
    add_record_flag(parser)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.what == "decode":
        histories = [h for h in args.histories.split(",") if h.strip()]
        if not histories or not all(h.strip().isdigit() and int(h) > 0 for h in histories):
            parser.error(f"--histories must be positive token counts, comma-separated, got {args.histories!r}")
        if min(args.rounds, args.decode_tokens, args.budget, args.refocus_every, args.threads) < 1:
            parser.error("--rounds, --decode-tokens, --budget, --refocus-every and --threads must be >= 1")
        return bench_decode(args)
    if args.what == "step":
        if not os.path.isfile(args.config):
            parser.error(f"--config {args.config} not found (see configs/megacontext_cpu.yaml)")
        return bench_step(args)
    if args.model_tag is None:
        parser.error(f"{args.what} needs --model-tag (a checkpoint under base_checkpoints/)")
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
