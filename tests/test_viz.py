"""Specification of megacontext/viz.py (and the WC layout the runtime's telemetry now records):
a recorded run log streams as an exact sequence of messages that match the runtime's own WCs,
scores and actions, the same over the WebSocket and server-sent events and on every replay; a
live runtime's refocus reaches a connected client before the next refocus; the tree endpoints
give each node's span, family and detokenized LOD0 text, and a gist's nearest token embeddings;
malformed JSONL lines are skipped and counted, an unfinished last line waits for its writer,
out-of-range nodes are 404 with a JSON reason, a client that leaves does not stop the server;
bad command lines are one 'error:' line; and the page, in headless Chromium, draws the strip
(glyphs per LOD, aggregated for a 1M-token memory), opens the explorer on click and plays.

python -m pytest tests/test_viz.py -q
"""

import html
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from hypothesis import given, settings, strategies as st

from megacontext import viz
from megacontext.allocator import AllocatorConfig, FocusAllocator
from megacontext.gistnet import GistNet, GistNetConfig
from megacontext.lensnet import LensNet, LensNetConfig
from megacontext.runtime import MegaContextRuntime, open_tree
from megacontext.telemetry import Telemetry, read_jsonl, rounded_scores, wc_entries, wc_layout
from megacontext.tree import MegaContextTree
from megacontext.working_context import WorkingContext
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer

CHROMIUM = "/usr/bin/chromium"
W, K = 128, 32  # 1,300 tokens of history at W = 128 need LOD2 gists too


def tiny_model(vocab, seed=0):
    cfg = GPTConfig(sequence_len=512, vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="L")
    torch.manual_seed(seed)
    with torch.device("meta"):
        m = GPT(cfg)
    m.to_empty(device=torch.device("cpu"))
    m.init_weights()
    return m.eval()


def tiny_lensnet(identity, seed=0):
    """A LensNet with random weights everywhere (an untrained one scores 0 and never acts)."""
    lens = LensNet(LensNetConfig(n_embd=64, d_model=32, n_layer=1, n_head=2), gistnet_identity=identity).init_weights(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in lens.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return lens.eval()


def document(tokenizer, n_tokens):
    text = Path(json.__file__).with_name("decoder.py").read_text() * 4
    return tokenizer.encode(text)[:n_tokens]


def receive(ws, timeout_s=20.0):
    """The next WebSocket message, failing (not hanging) when none comes."""
    box = []
    t = threading.Thread(target=lambda: box.append(ws.receive_json()), daemon=True)
    t.start()
    t.join(timeout_s)
    assert box, f"no message within {timeout_s} s"
    return box[0]


def receive_until(ws, kind, timeout_s=20.0):
    out = []
    while not out or out[-1]["type"] != kind:
        out.append(receive(ws, timeout_s))
    return out


@pytest.fixture(scope="module")
def tokenizer(upstream_fixtures):
    return RustBPETokenizer.from_directory(str(upstream_fixtures / "tokenizer"))


@pytest.fixture(scope="module")
def parts(tokenizer):
    model = tiny_model(tokenizer.get_vocab_size())
    gistnet = GistNet(GistNetConfig(n_embd=64, head="mean"))
    return SimpleNamespace(model=model, gistnet=gistnet, lensnet=tiny_lensnet(gistnet.identity()))


def start_runtime(parts, tokenizer, memory, telemetry):
    tree = open_tree(memory, parts.model, parts.gistnet, model_name="tiny", durable=False)
    allocator = FocusAllocator(AllocatorConfig(tau_expand=0.0, tau_collapse=0.0, max_changes=6, cooldown=1))
    rt = MegaContextRuntime(parts.model, tokenizer, tree, budget_tokens=W, refocus_every=K, lensnet=parts.lensnet,
                            allocator=allocator, telemetry=telemetry)
    return tree, rt


def snapshot(rt):
    """What the runtime itself says about its last refocus."""
    return {"entries": [tuple(e) for e in rt.wc.entries], "scores": rounded_scores(rt.focus.last_scores),
            "actions": rt.last["actions"], "swap_rate": rt.last["swap_rate"], "history": rt.history_len}


@pytest.fixture(scope="module")
def recorded(parts, tokenizer, tmp_path_factory):
    """A real runtime run (tiny random model, random LensNet) over 1,300 tokens of text: its tree,
    its telemetry JSONL and the runtime's own state after every refocus."""
    root = tmp_path_factory.mktemp("viz")
    saved = os.environ.get("MEGACONTEXT_ARTIFACT_ROOT")
    os.environ["MEGACONTEXT_ARTIFACT_ROOT"] = str(root / "artifacts")
    try:
        memory = root / "memory"
        telemetry = Telemetry("vizrec", config={"memory": str(memory)})
        tree, rt = start_runtime(parts, tokenizer, memory, telemetry)
        ids = document(tokenizer, 1300)
        states = []
        for a in range(0, len(ids), K):
            rt.feed(ids[a:a + K])
            if len(ids[a:a + K]) == K:
                states.append(snapshot(rt))
        rt.close()
        tree.close()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a random LensNet leaves the seed's targets
            telemetry.close()
    finally:
        if saved is None:
            os.environ.pop("MEGACONTEXT_ARTIFACT_ROOT", None)
        else:
            os.environ["MEGACONTEXT_ARTIFACT_ROOT"] = saved
    return SimpleNamespace(memory=memory, log=Path(telemetry.path), logs=Path(telemetry.path).parent, ids=ids,
                           states=states, records=read_jsonl(telemetry.path))


@pytest.fixture(scope="module")
def view(recorded, tokenizer):
    v = viz.MemoryView(recorded.memory, tokenizer)
    yield v
    v.close()


@pytest.fixture(scope="module")
def client(view, recorded):
    with TestClient(viz.create_app(view, recorded.log, poll_s=0.05)) as c:
        yield c


def ws_messages(client, url="/ws"):
    with client.websocket_connect(url) as ws:
        return receive_until(ws, "end")


def sse_messages(client, url="/api/stream"):
    with client.stream("GET", url) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        out = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))
                if out[-1]["type"] == "end":
                    return out
    return out

# -----------------------------------------------------------------------------
# The WC layout in telemetry


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5000), st.integers(64, 600), st.integers(0, 2**31 - 1))
def test_wc_layout_round_trips_every_entry(history, budget, seed):
    wc = WorkingContext.random_mix(seed, history, budget)
    layout = wc_layout(wc)
    assert wc_entries(layout) == [tuple(e) for e in wc.entries]
    assert len(layout["runs"]) <= len(wc) and layout["end"] == history and layout["start"] == wc.start
    assert json.loads(json.dumps(layout)) == layout


def test_refocus_records_carry_the_runtime_wc_scores_and_actions(recorded):
    frames = [r for r in recorded.records if r["event"] == "refocus"]
    assert len(frames) == len(recorded.states) == len(recorded.ids) // K
    for r, s in zip(frames, recorded.states):
        assert wc_entries(r["wc"]) == s["entries"]
        assert r["scores"] == s["scores"] and len(r["scores"]) == len(wc_entries(r["scored_wc"]))
        assert len(r["actions_list"]) == r["actions"] == s["actions"]
    kinds = {a[0] for r in frames for a in r["actions_list"]}
    levels = {e[0] for r in frames for e in wc_entries(r["wc"])}
    assert kinds == {"expand", "collapse"} and levels == {0, 1, 2}  # the run exercises everything the page draws

# -----------------------------------------------------------------------------
# The stream


def test_recorded_log_streams_the_exact_messages(client, recorded, view):
    messages = ws_messages(client)
    records = recorded.records
    assert [m["type"] for m in messages] == (["hello", "open"] + [{"start": "start", "refocus": "refocus", "decode": "decode",
                                             "summary": "summary", "end": "end"}[r["event"]] for r in records])
    assert messages[0] == {"type": "hello", "memory": view.summary()}
    assert messages[1] == {"type": "open", "run_log": str(recorded.log), "follow": False}
    assert [m["line"] for m in messages[2:]] == list(range(1, len(records) + 1))
    frames = [m for m in messages if m["type"] == "refocus"]
    assert [f["frame"] for f in frames] == list(range(len(recorded.states)))
    for f, s, r in zip(frames, recorded.states, [r for r in records if r["event"] == "refocus"]):
        assert wc_entries(f["wc"]) == s["entries"] and f["scores"] == s["scores"]
        assert f["actions"] == r["actions_list"] and len(f["actions"]) == s["actions"]
        assert f["figures"]["swap_rate"] == pytest.approx(s["swap_rate"]) and f["history_tokens"] == s["history"]
        assert f["figures"]["refocus_ms"] == pytest.approx(1000 * r["refocus_s"])
        assert f["figures"]["lod_histogram"] == [sum(e[0] == lv for e in s["entries"]) for lv in range(3)]
    assert messages[-1] == {"type": "end", "line": len(records), "lines": len(records), "skipped": 0,
                            "frames": len(frames), "pending_bytes": 0}


def test_the_same_messages_over_sse_and_on_every_replay(client):
    first = ws_messages(client)
    assert ws_messages(client) == first
    assert sse_messages(client) == first


def test_a_live_runtime_reaches_the_client_within_one_refocus(parts, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("MEGACONTEXT_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    memory = tmp_path / "live"
    ids = document(tokenizer, 5 * K)
    # the tree exists before the viewer starts; its writer (the runtime) comes later
    with open_tree(memory, parts.model, parts.gistnet, model_name="tiny", durable=False) as tree:
        tree.ingest(ids[:K])
    logs = tmp_path / "artifacts" / "run_logs"
    logs.mkdir(parents=True)
    view = viz.MemoryView(memory, tokenizer)
    with TestClient(viz.create_app(view, logs, poll_s=0.05)) as c, c.websocket_connect("/ws") as ws:
        assert receive(ws)["type"] == "hello"
        assert receive(ws) == {"type": "waiting", "run_logs": str(logs), "memory": str(memory)}
        Telemetry("other", config={"memory": str(tmp_path / "elsewhere")}).close()  # another memory's log: ignored
        telemetry = Telemetry("live", config={"memory": str(memory)})
        tree, rt = start_runtime(parts, tokenizer, memory, telemetry)  # refocuses the tree's K tokens once
        assert receive(ws) == {"type": "open", "run_log": telemetry.path, "follow": True}
        assert receive(ws)["type"] == "start"
        for r in range(4):
            if r:
                rt.feed(ids[r * K:(r + 1) * K])  # K tokens: exactly one refocus
            m = receive(ws)
            # caught_up comes once, when the reader first meets the end of the log: after the first refocus
            # line, or before it when the viewer polls between the runtime's start and refocus lines (a loaded machine)
            caught_up_first = r == 0 and m["type"] == "caught_up"
            if caught_up_first:
                m = receive(ws)
            assert m["type"] == "refocus" and m["frame"] == r, m
            assert wc_entries(m["wc"]) == [tuple(e) for e in rt.wc.entries]  # before the next refocus happens
            if r == 0 and not caught_up_first:
                assert receive(ws)["type"] == "caught_up"
            last_block = (rt.history_len - 1) // 32
            text = c.get(f"/api/node/0/{last_block}/text").json()["text"]  # the reader follows the writer
            assert text == tokenizer.decode(ids[last_block * 32:rt.history_len])
        rt.close()
        tree.close()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            telemetry.close()
        tail = receive_until(ws, "end")
        assert [m["type"] for m in tail] == ["summary", "end"]
        # the directory's stream goes on with the memory's next run
        again = Telemetry("live", config={"memory": str(memory)})
        assert receive(ws) == {"type": "open", "run_log": again.path, "follow": True}
        assert receive(ws)["type"] == "start"
        again.close()
    view.close()


def log_with_bad_lines(recorded, path):
    lines = recorded.log.read_text().splitlines()
    refocus = [l for l in lines if json.loads(l)["event"] == "refocus"]
    path.write_text("\n".join([lines[0], refocus[0], "{not json", "[1, 2]", "", refocus[1], "\xff\xfe garbage"]) + "\n"
                    + refocus[2][:40])
    return refocus, lines[-1]


def test_malformed_lines_are_skipped_and_counted_and_a_torn_tail_waits(recorded, view, tmp_path):
    refocus, end = log_with_bad_lines(recorded, tmp_path / "bad.jsonl")
    with TestClient(viz.create_app(view, tmp_path / "bad.jsonl", poll_s=0.05)) as c, c.websocket_connect("/ws") as ws:
        got = receive_until(ws, "caught_up")
        assert [m["type"] for m in got] == ["hello", "open", "start", "refocus", "skipped", "skipped", "refocus",
                                            "skipped", "caught_up"]
        assert [m["line"] for m in got if m["type"] == "skipped"] == [3, 4, 6]
        assert "not JSON" in got[4]["reason"] and "not an object" in got[5]["reason"]
        assert [m["frame"] for m in got if m["type"] == "refocus"] == [0, 1]
        assert got[-1] == {"type": "caught_up", "lines": 6, "skipped": 3, "frames": 2, "pending_bytes": 40}
        with open(tmp_path / "bad.jsonl", "a") as f:  # the writer finishes its line, then the run ends
            f.write(refocus[2][40:] + "\n" + end + "\n")
        rest = receive_until(ws, "end")
        assert [m["type"] for m in rest] == ["refocus", "end"] and rest[0]["frame"] == 2
        assert rest[-1]["skipped"] == 3 and rest[-1]["lines"] == 8


def test_nan_and_inf_reach_the_client_as_null(view, tmp_path):
    (tmp_path / "nan.jsonl").write_text('{"event": "refocus", "swap_rate": NaN, "residency": Infinity, '
                                        '"wc": {"start": 0, "end": 5, "runs": [[0, 0, 1]]}}\n{"event": "end"}\n')
    with TestClient(viz.create_app(view, tmp_path / "nan.jsonl")) as c:
        frame = next(m for m in ws_messages(c) if m["type"] == "refocus")
    assert frame["figures"]["swap_rate"] is None and frame["figures"]["residency"] is None
    assert wc_entries(frame["wc"]) == [(0, 0, 0, 5)]


def test_a_client_that_leaves_does_not_stop_the_server(client, recorded):
    for _ in range(3):
        with client.websocket_connect("/ws") as ws:
            assert receive(ws)["type"] == "hello"  # and hang up mid-stream
    assert client.get("/api/memory").status_code == 200
    assert ws_messages(client)[-1]["type"] == "end"


def test_directory_logs_by_name_and_unknown_names(view, recorded):
    with TestClient(viz.create_app(view, recorded.logs)) as c:
        runs = c.get("/api/runs").json()
        assert runs["runs"] == [{"name": recorded.log.name, "this_memory": True}]
        assert ws_messages(c, f"/ws?log={recorded.log.name}")[-1]["type"] == "end"
        with c.websocket_connect("/ws?log=../../etc/passwd") as ws:
            assert receive(ws)["type"] == "hello"
            error = receive(ws)
            assert error["type"] == "error" and "is not a run log in" in error["message"]

# -----------------------------------------------------------------------------
# The tree endpoints


def test_text_under_every_kind_of_node_is_the_detokenized_span(client, recorded, tokenizer):
    n = len(recorded.ids)
    for level, index in [(0, 0), (0, 7), (0, (n - 1) // 32), (1, 3), (2, 0)]:
        meta = client.get(f"/api/node/{level}/{index}").json()
        start, end = index * 32 ** max(level, 1), min((index + 1) * 32 ** max(level, 1), n)
        assert (meta["start"], meta["end"], meta["tokens"]) == (start, end, end - start)
        text = client.get(f"/api/node/{level}/{index}/text").json()
        assert text["text"] == tokenizer.decode(recorded.ids[start:end]) and not text["truncated"]
    lod2 = client.get("/api/node/2/0").json()
    assert lod2["parent"] is None and lod2["children"] == [[1, i] for i in range(32)]
    lod1 = client.get("/api/node/1/33").json()
    assert lod1["parent"] is None  # its LOD2 gist would need 2,048 tokens; the tree has 1,300
    assert lod1["children"] == [[0, 33]] and lod1["previous"] == [1, 32] and lod1["next"] == [1, 34]
    assert client.get("/api/node/0/5").json()["parent"] == [1, 5]
    short = client.get("/api/node/2/0/text?max_tokens=10").json()
    assert short["truncated"] and short["text"] == tokenizer.decode(recorded.ids[:10])


def test_out_of_range_nodes_are_404_with_a_json_reason(client, recorded):
    blocks = -(-len(recorded.ids) // 32)
    for url, words in [(f"/api/node/0/{blocks}", f"has {blocks} LOD0 nodes"), ("/api/node/1/-1", "does not exist"),
                       ("/api/node/2/5/text", "LOD2 node 5 does not exist"), ("/api/node/3/0", "there is no level 3"),
                       (f"/api/node/1/{10**9}/nearest", "does not exist")]:
        r = client.get(url)
        assert r.status_code == 404 and r.headers["content-type"] == "application/json"
        assert words in r.json()["detail"] and "\n" not in r.json()["detail"]


def test_nearest_without_a_model_says_why(client):
    r = client.get("/api/node/1/0/nearest")
    assert r.status_code == 501 and "--model-tag" in r.json()["detail"]
    assert client.get("/api/memory").json()["nearest"] is False


def test_nearest_token_embeddings_of_a_gist(tmp_path, tokenizer):
    table = torch.randn(tokenizer.get_vocab_size(), 16, generator=torch.Generator().manual_seed(0))
    embed_fn = lambda ids: torch.nn.functional.embedding(ids, table)
    gist_fn = lambda x, level: x.mean(dim=1)
    with MegaContextTree.create(tmp_path / "t", model_name="m", embedding_dim=16, gistnet_name="mean",
                                embed_fn=embed_fn, gist_fn=gist_fn, durable=False) as tree:
        tree.ingest([7] * 32 + [300] * 32 + list(range(32)))  # block 0: token 7 only; block 1: token 300 only
    v = viz.MemoryView(tmp_path / "t", tokenizer, embeddings=table)
    with TestClient(viz.create_app(v)) as c:
        for index, token in [(0, 7), (1, 300)]:
            near = c.get(f"/api/node/1/{index}/nearest?k=3").json()["nearest"]
            assert near[0]["token_id"] == token and near[0]["cosine"] == pytest.approx(1.0, abs=1e-3)
            assert near[0]["text"] == tokenizer.decode([token]) and near[1]["cosine"] < 0.99
        r = c.get("/api/node/0/0/nearest")
        assert r.status_code == 404 and "is tokens, not a gist" in r.json()["detail"]
        assert c.get("/api/memory").json()["nearest"] is True
    v.close()


def test_the_reader_never_writes_or_locks_the_tree(recorded, tokenizer, parts):
    before = {p.name: p.read_bytes() for p in recorded.memory.iterdir()}
    v = viz.MemoryView(recorded.memory, tokenizer)
    v.node(2, 0), v.text(1, 3), v.follow(force=True)
    # a writer can open it while the viewer holds it open
    with open_tree(recorded.memory, parts.model, parts.gistnet, model_name="tiny", durable=False) as tree:
        assert tree.writable
    v.close()
    assert {p.name: p.read_bytes() for p in recorded.memory.iterdir()} == before

# -----------------------------------------------------------------------------
# The command line


def foreign_dir(d):
    (d / "foreign").mkdir()
    (d / "foreign" / "notes.txt").write_text("not a tree")
    return d / "foreign"


@pytest.mark.parametrize("make, words", [(lambda d: d / "nope", "is not a directory"),
                                         (foreign_dir, "missing LOD0.ctx")])
def test_bad_memory_dirs_are_one_line_and_nonzero(tmp_path, capsys, make, words, upstream_fixtures):
    code = viz.main(["--memory", str(make(tmp_path)), "--tokenizer-dir", str(upstream_fixtures / "tokenizer")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


def test_missing_run_log_and_tokenizer_are_one_line(recorded, tmp_path, capsys):
    assert viz.main(["--memory", str(recorded.memory), "--run-log", str(tmp_path / "x.jsonl")]) == 1
    assert "--run-log" in capsys.readouterr().err
    assert viz.main(["--memory", str(recorded.memory), "--run-log", str(recorded.log), "--tokenizer-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no tokenizer in" in err[0]


def test_default_host_is_loopback():
    args = viz.build_parser().parse_args(["--memory", "m"])
    assert args.host == "127.0.0.1" and args.port == 8765

# -----------------------------------------------------------------------------
# The page, in headless Chromium, against a real server


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def big_log(path, memory):
    """A frame of a 1M-token memory: 977 LOD2 gists, 28 LOD1, a 4-block tail (1,009 entries)."""
    n = 1_000_000
    layout = {"start": 0, "end": n, "runs": [[2, 0, 976], [1, 976 * 32, 28], [0, 976 * 32 + 28, 4]]}
    assert wc_entries(layout)[-1][3] == n
    path.write_text(json.dumps({"event": "start", "run": "big", "config": {"memory": str(memory)}}) + "\n"
                    + json.dumps({"event": "refocus", "wc": layout, "actions_list": []}) + "\n"
                    + json.dumps({"event": "end"}) + "\n")
    return len(wc_entries(layout))


@pytest.fixture(scope="module")
def server(view, recorded, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    shutil.copy(recorded.log, logs / "run.jsonl")
    entries = big_log(logs / "big.jsonl", tmp_path_factory.mktemp("elsewhere"))
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(viz.create_app(view, logs, poll_s=0.05), host="127.0.0.1", port=port,
                                       log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    assert uv.started
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", big_entries=entries)
    finally:
        uv.should_exit = True
        thread.join(timeout=10)


def test_page_is_served_and_self_contained(server):
    r = httpx.get(server.url + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'id="strip"' in r.text and "/api/stream" in r.text and "/ws" in r.text
    assert httpx.get(server.url + "/api/memory", timeout=10).json()["websocket"] is viz.websocket_available()
    assert "http://" not in r.text and "https://" not in r.text  # no external requests


def test_an_sse_client_that_leaves_does_not_stop_the_real_server(server):
    with httpx.stream("GET", server.url + "/api/stream?log=run.jsonl", timeout=10) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # hang up after the first message
    assert httpx.get(server.url + "/api/memory", timeout=10).json()["tokens"] > 0


@pytest.mark.skipif(not viz.websocket_available(), reason="uvicorn has no WebSocket library here (pip install websockets)")
def test_the_real_server_streams_over_a_websocket(server, client):
    from websockets.sync.client import connect
    with connect(server.url.replace("http://", "ws://") + "/ws?log=run.jsonl") as ws:
        got = [json.loads(ws.recv(timeout=20))]
        while got[-1]["type"] != "end":
            got.append(json.loads(ws.recv(timeout=20)))
    expected = ws_messages(client)
    assert [m["type"] for m in got] == [m["type"] for m in expected]
    assert [m for m in got if m["type"] == "refocus"] == [m for m in expected if m["type"] == "refocus"]
    # and leave after one message (the client's unread backlog holds the server's close frame back: no handshake wait)
    with connect(server.url.replace("http://", "ws://") + "/ws?log=run.jsonl", close_timeout=0.5) as ws:
        ws.recv(timeout=20)
    assert httpx.get(server.url + "/api/memory", timeout=10).status_code == 200


needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} not installed (apt-get install -y chromium)")


def page_dom(tmp_path, url):
    # server-sent events: Chromium's virtual time waits for them like any fetch, but not for a
    # WebSocket's messages, so a dump over one may come before the frames do
    url += "&transport=sse"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'p'}",
           "--window-size=1000,900", "--virtual-time-budget=6000", "--dump-dom", url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout


@needs_chromium
def test_page_draws_the_frame_and_opens_the_explorer_on_click(server, recorded, tokenizer, tmp_path):
    k = len(recorded.states) - 3
    entries = recorded.states[k]["entries"]
    click = next(j for j, e in enumerate(entries) if e[0] == 1)  # the first LOD1 glyph (no aggregation at this size)
    dom = page_dom(tmp_path, f"{server.url}/?log=run.jsonl&frame={k}&click={click}")
    assert f'data-frame="{k}"' in dom and f'data-frames="{len(recorded.states)}"' in dom
    assert "via server-sent events" in dom
    glyphs = re.findall(r'class="glyph lod(\d)[^"]*" [^>]*data-level="\d" data-index="(\d+)" data-count="(\d+)"', dom)
    assert [(int(lv), int(i)) for lv, i, _ in glyphs] == [(e[0], e[1]) for e in entries]
    for level in range(3):
        assert dom.count(f'class="glyph lod{level}') == sum(e[0] == level for e in entries)
    level, index, start, end = entries[click]
    assert f'data-level="{level}" data-index="{index}" data-state="open"' in dom
    pre = re.search(r'<pre id="node-text">(.*?)</pre>', dom, re.S).group(1)
    assert pre == html.escape(tokenizer.decode(recorded.ids[start:end]), quote=False)


@needs_chromium
def test_page_plays_and_the_scrubber_moves(server, recorded, tmp_path):
    last = len(recorded.states) - 1
    dom = page_dom(tmp_path, f"{server.url}/?log=run.jsonl&frame=0&play=1&speed=100")
    assert f'data-frame="{last}"' in dom
    assert re.search(rf'id="scrub" [^>]*max="{last}"', dom) and re.search(rf'id="scrub" [^>]*value="{last}"', dom)


@needs_chromium
def test_page_aggregates_the_far_history_of_a_1m_token_memory(server, tmp_path):
    dom = page_dom(tmp_path, f"{server.url}/?log=big.jsonl")
    counts = [int(c) for c in re.findall(r'class="glyph lod\d[^"]*" [^>]*data-count="(\d+)"', dom)]
    assert 16 <= len(counts) <= 1000 // 3 < server.big_entries  # far fewer glyphs than entries ...
    assert sum(counts) == server.big_entries                     # ... standing for every entry
    assert counts[-4:] == [1, 1, 1, 1] and max(counts) > 1        # the tail single, the far past merged


def test_an_overlong_line_is_skipped_without_being_held(tmp_path, monkeypatch):
    monkeypatch.setattr(viz, "READ_BYTES", 64)
    monkeypatch.setattr(viz, "MAX_LINE_BYTES", 100)
    path = tmp_path / "long.jsonl"
    path.write_text('{"event": "start", "run": "r"}\n{"event": "x", "pad": "' + "a" * 500 + '"}\n'
                    '{"loss": 1.5, "step": 3, "phase": "warmup"}\n{"event": "end"}\n')
    reader, messages = viz.RunLogReader(path), []
    while not reader.ended:
        messages += reader.poll()
        assert reader.pending_bytes <= 100 + 64  # never the whole line in memory
    reader.close()
    assert [m["type"] for m in messages] == ["start", "skipped", "metrics", "end"]
    assert messages[1]["line"] == 2 and "longer than 100 bytes" in messages[1]["reason"]
    assert messages[2] == {"type": "metrics", "line": 3, "event": None, "step": 3, "time": None, "values": {"loss": 1.5}}
    assert messages[3]["lines"] == 4 and messages[3]["skipped"] == 1
