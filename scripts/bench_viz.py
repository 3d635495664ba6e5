"""
Visualizer benchmark: how fast megacontext.viz answers its tree endpoints, and how much memory
the server holds, for a small and a 1M-token memory.

For each size it builds a tree in a temp dir (real text from the standard library's sources,
tokenized with the project tokenizer, gisted by a mean pool over a random token table: the
endpoints read the same bytes whatever made the gists) and a run log of --frames refocus
records (recency WCs of budget 1024 over a history growing to the full size, random scores).
Then it starts `python -m megacontext.viz` on it in a subprocess, as a user would, and times
over HTTP (one keep-alive connection, nodes drawn uniformly over the whole tree, so most reads
touch cold pages):
    node      GET /api/node/{level}/{index}           metadata (LOD0, LOD1, LOD2 mixed)
    text0/1/2 GET /api/node/{level}/{index}/text      LOD0 text of a block, a LOD1, a LOD2 span
    stream    GET /api/stream                         the whole run log, first byte to "end"
and reads the server's resident memory (VmRSS, and its peak VmHWM) before and after. The
nearest-token search is timed in-process over the 1M tree against a (tokenizer vocab, dim) table.
Figures are printed (p50 / p95 / max ms); nothing outside the temp dir is written.

    python -m scripts.bench_viz [--tokens 1000000] [--small 32768] [--dim 256] [--requests 300]
                                [--frames 2000] [--tokenizer-dir DIR]
"""

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

parser = argparse.ArgumentParser(description="Benchmark megacontext.viz's tree endpoints and memory")
parser.add_argument("--tokens", type=int, default=1_000_000, help="history of the big memory (default 1M)")
parser.add_argument("--small", type=int, default=32_768, help="history of the small memory, for the RSS comparison")
parser.add_argument("--dim", type=int, default=256, help="gist width (the CPU preset's n_embd: 256; d20: 1280)")
parser.add_argument("--requests", type=int, default=300, help="requests per endpoint kind")
parser.add_argument("--frames", type=int, default=2000, help="refocus records in each run log")
parser.add_argument("--tokenizer-dir", default=None, help="default $NANOCHAT_BASE_DIR/tokenizer")
args = parser.parse_args()

import logging

import numpy as np
import torch

from megacontext.telemetry import wc_layout
from megacontext.tree import MegaContextTree
from megacontext.working_context import WorkingContext
from nanochat.common import get_base_dir
from nanochat.tokenizer import RustBPETokenizer
from scripts.bench_common import rss_mib

logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
tokenizer_dir = args.tokenizer_dir or os.path.join(get_base_dir(), "tokenizer")
if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.pkl")):
    sys.exit(f"error: no tokenizer in {tokenizer_dir}; set NANOCHAT_BASE_DIR or pass --tokenizer-dir")
tokenizer = RustBPETokenizer.from_directory(tokenizer_dir)

# -----------------------------------------------------------------------------
# Memories and run logs


def stdlib_tokens(n):
    """n token ids of real text: the standard library's own sources, tiled if they run out."""
    ids = []
    for path in sorted(Path(os.__file__).parent.glob("*.py")):
        ids.extend(tokenizer.encode(path.read_text(errors="replace")))
        if len(ids) >= n:
            break
    reps = -(-n // len(ids))
    return np.array((ids * reps)[:n], dtype=np.int64)


def build_memory(directory, n_tokens, dim):
    table = torch.randn(tokenizer.get_vocab_size(), dim, generator=torch.Generator().manual_seed(0))
    embed_fn = lambda ids: torch.nn.functional.embedding(ids, table)
    gist_fn = lambda x, level: x.mean(dim=1)
    ids = stdlib_tokens(n_tokens)
    with MegaContextTree.create(directory, model_name="bench", embedding_dim=dim, gistnet_name="mean",
                                embed_fn=embed_fn, gist_fn=gist_fn, durable=False) as tree:
        for a in range(0, n_tokens, 1 << 16):
            tree.ingest(ids[a:a + (1 << 16)])
    return ids


def write_run_log(path, memory, n_tokens, frames, budget=1024):
    rng = random.Random(0)
    with open(path, "w") as f:
        f.write(json.dumps({"event": "start", "run": "bench", "config": {"memory": str(memory)}}) + "\n")
        for k in range(frames):
            history = max(64, n_tokens * (k + 1) // frames)
            wc = WorkingContext.recency(history, budget)
            f.write(json.dumps({"event": "refocus", "step": k, "entries": len(wc), "swap_rate": 0.1, "residency": 0.9,
                                "budget_utilization": wc.cost / budget, "refocus_s": 0.002, "history_tokens": history,
                                "wc": wc_layout(wc), "scored_wc": wc_layout(wc),
                                "scores": [round(rng.uniform(-1, 1), 4) for _ in range(len(wc))],
                                "actions_list": [["expand", 1, 0, 0.5]]}) + "\n")
        f.write(json.dumps({"event": "end"}) + "\n")
    return os.path.getsize(path)

# -----------------------------------------------------------------------------
# The server, as a user starts it


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(ms):
    ms = sorted(ms)
    return f"p50 {statistics.median(ms):6.2f}  p95 {ms[int(0.95 * (len(ms) - 1))]:6.2f}  max {ms[-1]:6.2f} ms"


def bench_server(directory, log, n_tokens):
    import httpx
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "megacontext.viz", "--memory", str(directory), "--run-log", str(log),
                             "--port", str(port), "--tokenizer-dir", tokenizer_dir], cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=30) as client:
            deadline = time.time() + 120
            while True:
                try:
                    summary = client.get(url + "/api/memory").json()
                    break
                except httpx.HTTPError:
                    if proc.poll() is not None or time.time() > deadline:
                        raise SystemExit(f"error: the server did not start: {proc.stderr.read()[-2000:]}")
                    time.sleep(0.1)
            rss_start, _ = rss_mib(proc.pid)
            nodes = summary["nodes"]
            rng = random.Random(1)
            results = {}
            kinds = {"node": lambda: f"/api/node/{(lv := rng.choice([0, 1, 2] if nodes[2] else [0, 1]))}/{rng.randrange(nodes[lv])}",
                     "text0": lambda: f"/api/node/0/{rng.randrange(nodes[0])}/text",
                     "text1": lambda: f"/api/node/1/{rng.randrange(nodes[1])}/text",
                     "text2": lambda: f"/api/node/2/{rng.randrange(nodes[2])}/text" if nodes[2] else None}
            for kind, make in kinds.items():
                times = []
                for _ in range(args.requests):
                    path = make()
                    if path is None:
                        break
                    t0 = time.perf_counter()
                    r = client.get(url + path)
                    times.append(1000 * (time.perf_counter() - t0))
                    assert r.status_code == 200, (path, r.text)
                if times:
                    results[kind] = times
            t0, first, size = time.perf_counter(), None, 0
            with client.stream("GET", url + "/api/stream") as r:
                for line in r.iter_lines():
                    first = first or time.perf_counter()
                    size += len(line) + 1
                    if line.startswith("data: ") and json.loads(line[6:])["type"] == "end":
                        break
            stream_s = time.perf_counter() - t0
            rss_end, rss_peak = rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return summary, results, rss_start, rss_end, rss_peak, stream_s, size

# -----------------------------------------------------------------------------
# Run


print(f"megacontext.viz benchmark: tokenizer {tokenizer_dir}, gist dim {args.dim}, {args.requests} requests per kind, "
      f"{args.frames} frames per run log, {os.cpu_count()} CPUs")
with tempfile.TemporaryDirectory() as tmp:
    rows = []
    for label, n in (("small", args.small), ("big", args.tokens)):
        directory, log = Path(tmp) / f"mem_{label}", Path(tmp) / f"run_{label}.jsonl"
        t0 = time.perf_counter()
        build_memory(directory, n, args.dim)
        log_bytes = write_run_log(log, directory, n, args.frames)
        disk = sum(p.stat().st_size for p in directory.iterdir())
        print(f"\n{label}: {n:,} tokens, tree {disk / 2**20:.1f} MiB on disk, run log {log_bytes / 2**20:.1f} MiB "
              f"(built in {time.perf_counter() - t0:.1f} s)")
        summary, results, rss_start, rss_end, rss_peak, stream_s, size = bench_server(directory, log, n)
        print(f"  nodes per level {summary['nodes']}")
        for kind, times in results.items():
            print(f"  {kind:6s} {percentiles(times)}")
        print(f"  stream {args.frames} frames: {stream_s:.2f} s for {size / 2**20:.1f} MiB of events")
        print(f"  server RSS {rss_start:.0f} MiB at start, {rss_end:.0f} MiB after (peak {rss_peak:.0f} MiB)")
        rows.append((label, n, rss_end))

    # nearest tokens, in process: one gist against the whole token table
    from megacontext import viz
    view = viz.MemoryView(Path(tmp) / "mem_big", tokenizer)
    vocab = tokenizer.get_vocab_size()
    view.use_token_table(torch.randn(vocab, args.dim, generator=torch.Generator().manual_seed(2)))
    rng, times = random.Random(3), []
    for _ in range(min(args.requests, 100)):
        index = rng.randrange(view.tree.num_gists(1))
        t0 = time.perf_counter()
        view.nearest(1, index, 10)
        times.append(1000 * (time.perf_counter() - t0))
    view.close()
    print(f"\nnearest (in process, {vocab:,} x {args.dim} token table, torch threads {torch.get_num_threads()}): "
          f"{percentiles(times)}")
    (_, n_small, rss_small), (_, n_big, rss_big) = rows
    print(f"RSS after the same requests: {rss_small:.0f} MiB at {n_small:,} tokens, {rss_big:.0f} MiB at {n_big:,} "
          f"tokens ({n_big / n_small:.0f}x the history, {rss_big - rss_small:+.0f} MiB)")
