"""Specification of megacontext/runtime.py and its KV-cache seam (KVCache.truncate, the smear
of a chunk appended to a non-empty cache): decoding through the runtime with the focus frozen
at all-LOD0 gives exactly the plain Engine's tokens; a truncate + recompute after the WC
changed equals a from-scratch forward over the new WC; a chunked prefill equals one full
prefill; a tree on disk is continued; an empty history decodes from BOS; bad trees are
refused with one line; a SIGKILL mid-stream leaves a tree that reopens with a prefix of the
stream; the CLI streams a file and writes telemetry."""
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_probe import exit_before_torch
from megacontext.allocator import Refocus
from megacontext.base_inputs import gist_inputs
from megacontext.gistnet import GistNet, GistNetConfig, token_embeddings
from megacontext.runtime import MegaContextRuntime, open_tree
from megacontext.telemetry import Telemetry, read_jsonl
from megacontext.tree import MegaContextTree
from megacontext.working_context import WorkingContext
from nanochat.common import COMPUTE_DTYPE
from nanochat.engine import Engine, KVCache
from nanochat.gpt import GPT, GPTConfig

REPO = Path(__file__).resolve().parent.parent
VOCAB = 300
BOS = 290


def tiny_model(seed=0):
    """A random GPT with every weight perturbed (smear, value embeddings, sliding windows all act)."""
    cfg = GPTConfig(sequence_len=512, vocab_size=VOCAB, n_layer=3, n_head=4, n_kv_head=2, n_embd=64,
                    window_pattern="SSL")
    torch.manual_seed(seed)
    with torch.device("meta"):
        m = GPT(cfg)
    m.to_empty(device=torch.device("cpu"))
    m.init_weights()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in sorted(m.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)
        m.smear_lambda.fill_(0.7)
    return m.eval()


class TinyTokenizer:
    """BOS inside the vocab (slot 0 embeds it); the tool/turn specials above it, never sampled."""

    def get_bos_token_id(self):
        return BOS

    def encode_special(self, name):
        return {"<|bos|>": BOS}.get(name, 1000 + len(name))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def gistnet():
    return GistNet(GistNetConfig(n_embd=64, head="mean"))


def stream(n, seed=0):
    return np.random.default_rng(seed).integers(0, BOS, size=n).tolist()


def engine_tokens(model, prompt, n, **kw):
    """Engine.generate's tokens; it stops early only if the model emits BOS."""
    out = [col[0] for col, _ in Engine(model, TinyTokenizer()).generate([BOS] + prompt, max_tokens=n, **kw)]
    assert len(out) == n or out[-1] == BOS
    return out


def runtime(model, gistnet, path, W=256, K=32, **kw):
    tree = open_tree(path, model, gistnet, model_name="tiny", durable=False)
    return MegaContextRuntime(model, TinyTokenizer(), tree, budget_tokens=W, refocus_every=K, **kw)


def scratch_logits(model, tree, wc):
    """A cache-free forward over [BOS] + the WC's slots (to_tensors builds them independently)."""
    t = wc.to_tensors(tree, lambda ids: token_embeddings(model, ids))
    idx = torch.cat([torch.tensor([BOS]), t["token_ids"]]).view(1, -1)
    mask = torch.cat([torch.tensor([False]), t["gist_mask"]]).view(1, -1)
    vectors = torch.cat([torch.zeros(1, 64), t["inputs_embeds"].float()]).unsqueeze(0)
    with torch.no_grad(), gist_inputs(model, mask, vectors):
        return model(idx)[0]

# -----------------------------------------------------------------------------
# the KV-cache seam (nanochat/gpt.py, nanochat/engine.py)


def cache_for(model, seq_len):
    c = model.config
    return KVCache(1, c.n_kv_head, seq_len, c.n_embd // c.n_head, c.n_layer, "cpu", COMPUTE_DTYPE)


def test_chunked_prefill_onto_a_non_empty_cache_equals_one_full_prefill(model):
    ids = torch.tensor([stream(150, seed=3)])
    mask = torch.zeros(1, 150, dtype=torch.bool)
    mask[0, [5, 6, 70, 100]] = True  # gists inside chunks and at a chunk's first slot
    vectors = torch.randn(1, 150, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with gist_inputs(model, mask, vectors):
            full = model(ids)
        cache, pieces = cache_for(model, 160), []
        for a, b in [(0, 60), (60, 61), (61, 70), (70, 150)]:
            with gist_inputs(model, mask[:, a:b], vectors[:, a:b]):
                pieces.append(model(ids[:, a:b], kv_cache=cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_truncate_then_recompute_equals_a_fresh_cache(model):
    a, b = torch.tensor([stream(80, seed=4)]), torch.tensor([stream(30, seed=5)])
    with torch.no_grad():
        cache = cache_for(model, 128)
        model(a, kv_cache=cache)
        prev = cache.prev_embedding
        model(torch.tensor([stream(20, seed=6)]), kv_cache=cache)  # a suffix to be replaced
        cache.truncate(80, prev)
        assert cache.get_pos() == 80
        rewritten = model(b, kv_cache=cache)
        fresh = model(torch.cat([a, b], dim=1))[:, 80:]
    torch.testing.assert_close(rewritten, fresh, atol=1e-5, rtol=0)
    with pytest.raises(AssertionError):
        cache.truncate(200, prev)  # beyond what the cache holds
    with pytest.raises(AssertionError):
        cache.truncate(10, None)  # the smear's input of slot 9 is needed

# -----------------------------------------------------------------------------
# exactness against the plain Engine (frozen focus, all LOD0)


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_k=50, seed=7)])
def test_frozen_focus_decodes_exactly_the_engines_tokens(model, gistnet, tmp_path, sampling):
    prompt = stream(20)
    rt = runtime(model, gistnet, tmp_path / "t")
    rt.feed(prompt)
    expected = engine_tokens(model, prompt, 70, **sampling)  # crosses two refocuses
    got = list(rt.generate(70, **sampling))
    assert got[:len(expected)] == expected
    assert rt.current_wc.levels.tolist() == [0] * len(rt.current_wc)
    rt.close()
    assert rt.tree.tokens().tolist() == prompt + got


def test_long_prompt_and_several_feeds_decode_the_engines_tokens(model, gistnet, tmp_path):
    p1, p2, p3 = stream(70, seed=1), stream(45, seed=2), stream(3, seed=3)  # longer than K = 32
    rt = runtime(model, gistnet, tmp_path / "t")
    rt.feed(p1)
    rt.feed(p2)
    first = list(rt.generate(10, temperature=0.0))
    rt.feed(p3)
    second = list(rt.generate(25, temperature=0.0))
    assert first[:len(e := engine_tokens(model, p1 + p2, 10, temperature=0.0))] == e
    assert second[:len(e := engine_tokens(model, p1 + p2 + first + p3, 25, temperature=0.0))] == e
    # the next-token logits agree with a cache-free forward over the whole sequence
    rt.close()  # the generated tokens reach the tree, where scratch_logits reads them
    full = scratch_logits(model, rt.tree, rt.current_wc)
    torch.testing.assert_close(rt.next_logits, full[-1], atol=1e-4, rtol=0)


def test_feed_scores_the_tokens_it_reads(model, gistnet, tmp_path):
    tokens = stream(100, seed=9)
    rt = runtime(model, gistnet, tmp_path / "t")
    nll = rt.feed(tokens, score=True)
    logits = scratch_logits(model, rt.tree, rt.current_wc)
    expected = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(tokens), reduction="sum").item()
    assert nll == pytest.approx(expected, rel=1e-5)

# -----------------------------------------------------------------------------
# refocus: budget keeping, KV reuse, a changed WC


class ScriptedAllocator:
    """Expands the first gist of the WC at every refocus, collapsing the oldest LOD0 block outside
    the tail to make room (a stand-in for LensNet's choice)."""

    def refocus(self, wc, scores):
        gists = [i for i, e in enumerate(wc.entries) if e.level > 0]
        blocks = [i for i, e in enumerate(wc.entries) if e.level == 0 and wc.collapse_group(i) is not None]
        if not gists or not blocks:
            return Refocus(wc, [], 0)
        g, b = wc[gists[0]], wc[blocks[0]]
        return Refocus(wc.swap(blocks[0], gists[0]),
                       [("collapse", 1, b.index, -1.0), ("expand", g.level, g.index, 1.0)], 0)


class ZeroLens:
    gistnet_identity = None

    def score_wc(self, wc, store, embed_fn, tail_gists=None, last_scores=None, last_change=None):
        assert len(last_scores) == len(last_change) == len(wc)
        return np.zeros(len(wc), dtype=np.float32)


def test_budget_keeping_collapses_oldest_and_the_cache_matches_a_fresh_forward(model, gistnet, tmp_path):
    W, K = 128, 32
    rt = runtime(model, gistnet, tmp_path / "t", W=W, K=K)
    rt.feed(stream(600))
    wc = rt.current_wc
    assert rt.wc.history_len == 576 and rt.wc.cost <= W  # the last refocus (every K = 32 tokens)
    assert wc.history_len == 600 and wc.cost <= W + K and wc.start == 0  # + the 24 tokens since
    assert wc.levels[0] > 0 and wc.levels[-1] == 0  # old history gisted, the tail raw
    assert rt.last["budget_collapses"] >= 1 and 0 < rt.last["recomputed_slots"] <= 1 + wc.cost
    torch.testing.assert_close(rt.next_logits, scratch_logits(model, rt.tree, wc)[-1], atol=1e-4, rtol=0)
    list(rt.generate(40, temperature=0.0))  # decoding past W + the refocus keeps it within 1 + W + K
    assert rt.current_wc.cost <= W + K
    torch.testing.assert_close(rt.next_logits, scratch_logits(model, rt.tree, rt.current_wc)[-1], atol=1e-4, rtol=0)


def test_a_changed_wc_recomputes_from_its_first_difference_only(model, gistnet, tmp_path):
    W, K = 192, 32
    tree = open_tree(tmp_path / "t", model, gistnet, model_name="tiny", durable=False)
    tree.ingest(stream(800))
    rt = MegaContextRuntime(model, TinyTokenizer(), tree, budget_tokens=W, refocus_every=K, lensnet=ZeroLens(),
                            allocator=ScriptedAllocator())
    before = rt.current_wc
    list(rt.generate(K, temperature=0.0))  # one refocus: extend + the scripted expand
    after = rt.wc
    assert rt.last["actions"] == 2 and after.levels.tolist() != before.levels.tolist()
    k = WorkingContext.from_entries(before.entries, before.history_len, None).extend(after.history_len) \
        .first_difference(after)
    assert rt.last["recomputed_slots"] == 1 + after.cost - (1 + after.slot_offsets[k])
    assert rt.last["reusable_slots"] > 0
    torch.testing.assert_close(rt.next_logits, scratch_logits(model, tree, after)[-1], atol=1e-4, rtol=0)


def test_without_kv_reuse_every_refocus_recomputes_everything_and_agrees(model, gistnet, tmp_path):
    a = runtime(model, gistnet, tmp_path / "a", W=128)
    b = runtime(model, gistnet, tmp_path / "b", W=128, reuse_kv=False)
    tokens = stream(300)
    a.feed(tokens)
    b.feed(tokens)
    assert b.last["recomputed_slots"] == 1 + b.wc.cost  # at the last refocus
    assert a.last["recomputed_slots"] < 1 + a.wc.cost
    assert list(a.generate(20, temperature=0.0)) == list(b.generate(20, temperature=0.0))

# -----------------------------------------------------------------------------
# trees on disk, bad input


def test_a_tree_on_disk_is_continued(model, gistnet, tmp_path):
    history = stream(500)
    with open_tree(tmp_path / "t", model, gistnet, model_name="tiny") as tree:  # as megacontext.ingest leaves it
        tree.ingest(history)
    rt = runtime(model, gistnet, tmp_path / "t", W=128)
    assert rt.current_wc == WorkingContext.recency(500, 128)
    first = int(scratch_logits(model, rt.tree, rt.current_wc)[-1].argmax())
    new = list(rt.generate(10, temperature=0.0))
    assert new[0] == first
    rt.close()
    rt.tree.close()
    with MegaContextTree.open(tmp_path / "t") as tree:
        assert tree.num_tokens == 510 and tree.tokens().tolist() == history + new


def test_empty_history_decodes_from_bos_like_the_engine(model, gistnet, tmp_path):
    telemetry = Telemetry("empty", enabled=False)
    rt = runtime(model, gistnet, tmp_path / "t", telemetry=telemetry)
    assert rt.history_len == 0 and rt.next_logits is None
    rt.feed([])
    expected = engine_tokens(model, [], 40, temperature=0.0)
    assert list(rt.generate(40, temperature=0.0))[:len(expected)] == expected
    assert telemetry.summary()["fallbacks"] == ["empty history: generate() decodes from BOS alone"]


def test_bad_trees_and_tokens_are_refused_with_one_line(model, gistnet, tmp_path):
    tree = open_tree(tmp_path / "t", model, gistnet, model_name="tiny")
    tree.ingest(stream(40))
    # another writer holds the tree
    with pytest.raises(RuntimeError, match="already open for appending by another writer"):
        open_tree(tmp_path / "t", model, gistnet, model_name="tiny")
    tree.begin_source({"path": "doc.txt"})
    with pytest.raises(ValueError, match="unfinished ingest of doc.txt"):
        MegaContextRuntime(model, TinyTokenizer(), tree, budget_tokens=128)
    tree.end_source()
    tree.close()
    with MegaContextTree.open(tmp_path / "t", readonly=True) as ro:
        with pytest.raises(ValueError, match="read-only"):
            MegaContextRuntime(model, TinyTokenizer(), ro, budget_tokens=128)
    tree = open_tree(tmp_path / "t", model, gistnet, model_name="tiny")
    with pytest.raises(ValueError, match="cannot hold the LOD0 tail"):
        MegaContextRuntime(model, TinyTokenizer(), tree, budget_tokens=40)
    with pytest.raises(ValueError, match="rotary"):
        MegaContextRuntime(model, TinyTokenizer(), tree, budget_tokens=6000)
    lens = ZeroLens()
    lens.gistnet_identity = "gistnet-other"
    with pytest.raises(ValueError, match="LensNet was trained on gists of gistnet-other"):
        MegaContextRuntime(model, TinyTokenizer(), tree, budget_tokens=128, lensnet=lens, allocator=ScriptedAllocator())
    rt = MegaContextRuntime(model, TinyTokenizer(), tree, budget_tokens=128)
    with pytest.raises(ValueError, match=r"token ids must be in 0..299"):
        rt.feed([5, 300])
    assert tree.num_tokens == 40  # nothing of the refused feed reached the tree
    with pytest.raises(FileNotFoundError, match="no MegaContext tree"):
        open_tree(tmp_path / "none", model, gistnet, model_name="tiny", create=False)


KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import numpy as np
from test_runtime import tiny_model, TinyTokenizer, stream, GistNet, GistNetConfig
from megacontext.runtime import MegaContextRuntime, open_tree
model = tiny_model()
tree = open_tree({path!r}, model, GistNet(GistNetConfig(n_embd=64, head="mean")), model_name="tiny")
rt = MegaContextRuntime(model, TinyTokenizer(), tree, budget_tokens=128, refocus_every=32)
tokens = stream(200000, seed=11)
for i in range(0, len(tokens), 50):
    rt.feed(tokens[i:i + 50])
    print("fed", i + 50, flush=True)
"""


def test_a_kill_mid_stream_leaves_a_tree_with_a_prefix_of_the_stream(model, gistnet, tmp_path):
    path = tmp_path / "t"
    script = KILL_SCRIPT.format(tests=str(REPO / "tests"), path=str(path))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)
    fed, deadline = 0, time.time() + 60
    while fed < 1000 and time.time() < deadline:  # a few refocuses in, then kill it mid-feed
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("fed "):
            fed = int(line.split()[1])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert fed >= 1000, proc.stderr.read()[-2000:]
    expected = stream(200000, seed=11)
    with open_tree(path, model, gistnet, model_name="tiny") as tree:  # verifies the CRCs, repairs gists
        n = tree.num_tokens
        assert fed - 50 <= n <= fed + 100  # what was acknowledged is there, at most the piece in flight more
        assert tree.tokens().tolist() == expected[:n]
        assert tree.num_gists(1) == n // 32 and tree.missing_gists == (0, 0)
        rt = MegaContextRuntime(model, TinyTokenizer(), tree, budget_tokens=128)  # and the runtime goes on
        rt.feed(expected[n:n + 40])
        assert tree.num_tokens == n + 40

# -----------------------------------------------------------------------------
# telemetry from the loop


def test_the_loop_writes_telemetry_per_refocus(model, gistnet, tmp_path, monkeypatch):
    monkeypatch.setenv("MEGACONTEXT_ARTIFACT_ROOT", str(tmp_path / "art"))
    monkeypatch.delenv("MEGACONTEXT_ENABLE_WANDB", raising=False)
    telemetry = Telemetry("rt", config={"budget_tokens": 128})
    rt = runtime(model, gistnet, tmp_path / "t", W=128, telemetry=telemetry)
    rt.feed(stream(320))
    list(rt.generate(64, temperature=0.0))
    rt.close()
    with pytest.warns(Warning):  # frozen focus: residency drops as the budget keeping collapses blocks
        summary = telemetry.close()
    records = read_jsonl(telemetry.path)
    refocus = [r for r in records if r["event"] == "refocus"]
    assert len(refocus) == (320 + 64) // 32
    assert all(r["budget_utilization"] <= 1.0 and sum(r["lod_histogram"]) == r["entries"] for r in refocus)
    assert refocus[-1]["history_tokens"] == 384 and refocus[-1]["budget_collapses"] >= 1
    assert sum(r["tokens"] for r in records if r["event"] == "decode") == 64
    assert summary["refocuses"] == len(refocus) and summary["decoded_tokens"] == 64
    assert 0 < summary["recomputed_share"] <= 1 and summary["warnings"]

# -----------------------------------------------------------------------------
# the CLI


def test_cli_flag_typo_is_rejected_before_torch_is_imported():
    out, err = exit_before_torch("megacontext.run", ["--config", "configs/runtime_cpu.yaml", "--budget_tokns=64"])
    assert out == "exit 2 False", out + err
    assert "unknown config key 'budget_tokns'" in err


def test_cli_missing_input_is_one_line_before_torch():
    out, err = exit_before_torch("megacontext.run", ["--config", "configs/runtime_cpu.yaml", "--input", "/nope.txt"])
    assert out == "exit 1 False", out + err
    assert err.strip().splitlines() == ["error: input file /nope.txt does not exist"]


def _run_cli(args, base, artifacts):
    env = dict({k: v for k, v in os.environ.items() if k != "NANOCHAT_DEBUG"}, PYTHONPATH=str(REPO),
               OMP_NUM_THREADS="1", NANOCHAT_BASE_DIR=str(base), MEGACONTEXT_ARTIFACT_ROOT=str(artifacts))
    r = subprocess.run([sys.executable, "-m", "megacontext.run", "--config", "configs/runtime_cpu.yaml", *args],
                       cwd=REPO, env=env, capture_output=True, timeout=300)
    # decoded by hand: text=True would turn the status line's carriage returns into newlines
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


def test_cli_continues_an_ingested_tree_and_writes_telemetry(fixture_base_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(textwrap.dedent("""\
        The quick brown fox jumps over the lazy dog. A long document streams through the loop,
        block after block, while the working context keeps the budget.
        """) * 6)
    memory = tmp_path / "memory"
    ingest_cfg = tmp_path / "ingest.yaml"
    ingest_cfg.write_text("source: base\nmodel_tag: d2\ngistnet: mean\ndevice_type: cpu\n")
    env = dict({k: v for k, v in os.environ.items() if k != "NANOCHAT_DEBUG"}, PYTHONPATH=str(REPO),
               OMP_NUM_THREADS="1", NANOCHAT_BASE_DIR=str(fixture_base_dir))
    r = subprocess.run([sys.executable, "-m", "megacontext.ingest", "--config", str(ingest_cfg), "--input", str(doc),
                        "--out", str(memory)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with MegaContextTree.open(memory, readonly=True) as tree:
        ingested = tree.num_tokens  # BOS + the document's tokens
    r = _run_cli(["--input", str(doc), "--model_tag=d2", "--gistnet=mean", f"--memory={memory}", "--generate=8"],
                 fixture_base_dir, tmp_path / "art")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    # the runtime read the same document again after a BOS, then generated 8 tokens
    with MegaContextTree.open(memory, readonly=True) as tree:
        assert tree.num_tokens == 2 * ingested + 8
        assert tree.tokens(ingested, 2 * ingested).tolist() == tree.tokens(0, ingested).tolist()
    held = 2 * ingested
    assert f"memory {memory}: {ingested:,} tokens held" in r.stdout
    assert f"\r{held:,} tokens | WC" in r.stdout and "LOD0/1/2" in r.stdout and "residency" in r.stdout
    assert f"read {ingested:,} tokens: NLL" in r.stdout and "generated 8 tokens" in r.stdout
    logs = list((tmp_path / "art" / "run_logs").glob("runtime-*.jsonl"))
    assert len(logs) == 1
    records = read_jsonl(logs[0])
    assert records[0]["event"] == "start" and records[-2]["event"] == "summary" and records[-1]["event"] == "end"
    assert sum(x["event"] == "refocus" for x in records) == records[-2]["refocuses"] >= ingested // 32


def test_cli_refuses_a_tree_another_process_is_writing(fixture_base_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("some text to stream\n" * 5)
    memory = tmp_path / "memory"
    identity = GistNet(GistNetConfig(n_embd=128, head="mean")).identity()  # what --gistnet=mean gives d2
    with MegaContextTree.create(memory, "base:d2@40", 128, identity):  # holds the writer's lock meanwhile
        r = _run_cli(["--input", str(doc), "--model_tag=d2", "--gistnet=mean", f"--memory={memory}"],
                     fixture_base_dir, tmp_path / "art")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "already open for appending by another writer" in last, r.stderr

# -----------------------------------------------------------------------------
# the decode benchmark (scripts/bench_megacontext.py decode) drives this loop


def test_bench_decode_flags_are_checked_before_torch_is_imported():
    out, err = exit_before_torch("scripts.bench_megacontext", ["decode", "--histories=1000,lots"])
    assert out == "exit 2 False", out + err
    assert "--histories must be positive token counts" in err


@pytest.mark.slow
def test_bench_decode_prints_its_ratios_last(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "scripts.bench_megacontext", "decode", "--histories=200,3000",
                        "--rounds=1", "--decode-tokens=16", "--depth=1", "--vocab-size=512", "--sequence-len=256",
                        "--lensnet=none"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert re.fullmatch(r"decode tok/s 3k/200: \d+\.\d\d, peak RSS 3k/200: \d+\.\d\d", lines[-1]), lines[-1]
    assert sum(line.startswith("| 200 |") or line.startswith("| 3,000 |") for line in lines) == 2


# -----------------------------------------------------------------------------
# gist-first decoding: a MegaPrediction planner


def planner_for(lod_mix, seed=0):
    from megacontext.megaprediction import MegaPrediction, MegaPredictionConfig, Planner
    return Planner(MegaPrediction(MegaPredictionConfig(n_embd=64)).init_weights(seed=seed).eval(), lod_mix)


def test_a_planner_puts_plan_slots_before_each_block_but_never_into_the_tree(model, gistnet, tmp_path):
    from megacontext.megaprediction import capture_hidden
    planner = planner_for([1, 2])
    prompt = stream(64, seed=5)  # two whole blocks: generate() starts at a block boundary
    rt = runtime(model, gistnet, tmp_path / "t", planner=planner)
    rt.feed(prompt)
    with torch.no_grad(), capture_hidden(model) as cap:
        model(torch.tensor([[BOS] + prompt]))
    plans = planner.plans(cap.hidden[0, -1:])[0]  # from the hidden state of the block's last token: LOD2, LOD1

    def with_plans(tokens_after):
        idx = torch.tensor([[BOS] + prompt + [0, 0] + tokens_after])
        mask = torch.zeros(idx.shape, dtype=torch.bool)
        mask[0, 65:67] = True
        vectors = torch.zeros(1, idx.size(1), 64)
        vectors[0, 65:67] = plans
        with torch.no_grad(), gist_inputs(model, mask, vectors):
            return model(idx)[0, -1]

    (first,) = list(rt.generate(1, temperature=0.0))
    assert first == int(with_plans([]).argmax()), "the block's first token is sampled after its plans"
    assert torch.allclose(rt.next_logits, with_plans([first]), atol=1e-4)
    with torch.no_grad():
        plain = model(torch.tensor([[BOS] + prompt + [first]]))[0, -1]
    assert not torch.allclose(rt.next_logits, plain, atol=1e-3), "the plans change what the model reads"
    got = list(rt.generate(60, temperature=0.0))  # across the refocus at 96 and the plans placed after it
    assert rt.kv.get_pos() == 1 + rt.current_wc.cost + 2, "only the plans of block 96 remain after that refocus"
    rt.refocus()  # the cache is rebuilt from the tree's WC: no plan slot is left
    assert rt.kv.get_pos() == 1 + rt.current_wc.cost
    assert torch.allclose(rt.next_logits, scratch_logits(model, rt.tree, rt.current_wc)[-1], atol=1e-4)
    rt.close()
    assert rt.tree.tokens().tolist() == prompt + [first] + got  # plans are never tree tokens


def test_a_planner_with_a_wrong_width_is_refused(model, gistnet, tmp_path):
    from megacontext.megaprediction import MegaPrediction, MegaPredictionConfig, Planner
    wrong = Planner(MegaPrediction(MegaPredictionConfig(n_embd=32)).init_weights(seed=0), [1])
    with pytest.raises(ValueError, match="heads have n_embd=32 but the model has 64"):
        runtime(model, gistnet, tmp_path / "t", planner=wrong)


class NeedleLens:
    """A stand-in LensNet: +1 for every entry whose span holds token `needle`, 0 elsewhere."""

    def __init__(self, needle):
        self.needle, self.calls = needle, 0

    def score_wc(self, wc, store, embed_fn, tail_gists=None, last_scores=None, last_change=None):
        self.calls += 1
        return np.array([1.0 if e.start <= self.needle < e.end else 0.0 for e in wc.entries], dtype=np.float32)


@pytest.mark.parametrize("rounds, level_after, calls", [(1, 1, 1), (2, 0, 2), (5, 0, 3)])
def test_refocus_rounds_take_a_fact_in_a_lod2_span_down_to_lod0(rounds, level_after, calls):
    from megacontext.allocator import AllocatorConfig, FocusAllocator
    from megacontext.runtime import Focus
    needle = 300  # in block 9 of the first LOD2 span (blocks 0-31)
    wc = WorkingContext.from_entries([(2, 0)] + [(1, k) for k in range(32, 62)] + [(0, 62), (0, 63)], 2048, 256)
    lens = NeedleLens(needle)
    focus = Focus(lens, FocusAllocator(AllocatorConfig(tau_expand=0.0)), rounds=rounds)
    result = focus.refocus(wc, None, None)
    holder = next(e for e in result.wc.entries if e.start <= needle < e.end)
    assert holder.level == level_after and lens.calls == calls  # rounds stop once a round changes nothing
    assert len(result.actions) == 2 - level_after and result.wc.cost <= 256
    assert len(focus.last_scores) == len(wc)  # telemetry's scores are those of the WC passed in
    with pytest.raises(ValueError, match="rounds must be an integer >= 1"):
        Focus(lens, FocusAllocator(), rounds=0)
