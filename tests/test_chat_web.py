"""
Specification of scripts/chat_web.py: a real server on 127.0.0.1 (uvicorn in a background
thread, the fixture d2 model on CPU) answered over real HTTP. Streaming replies match the
engine's own generation, every limit and every malformed request gets a one-line 4xx, the
worker pool hands its worker back (also when a client walks away), sessions keep their
conversation between requests and are closed when idle, deleted, evicted or at shutdown, a
variant's session answers its own commands and reports its Working Context, and the page
renders, chats and re-renders a reloaded conversation in headless Chromium.

python -m pytest tests/test_chat_web.py -q
"""

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from contextlib import contextmanager
from types import SimpleNamespace

import asyncio

import httpx
import pytest
import torch
import uvicorn
from websockets.sync.client import connect

from nanochat import chat, hooks
from scripts import chat_web

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout_s=30.0):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@contextmanager
def serve(pool, variant=None, *flags):
    """create_app over `pool` with these extra flags, served by uvicorn on a free loopback port;
    leaving the block shuts the server down (its lifespan's shutdown included)."""
    port = free_port()
    args = chat_web.build_parser().parse_args(
        ["-i", "base", "-g", "d2", "--device-type", "cpu", "--host", "127.0.0.1", "-p", str(port), *flags])
    app = chat_web.create_app(args, pool, variant)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: uv.started), "uvicorn did not start"
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", pool=pool, engine=pool.workers[0].engine, app=app,
                              sessions=app.state.sessions)
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        assert not thread.is_alive(), "uvicorn did not shut down"


@pytest.fixture(scope="module")
def base_dir(upstream_fixtures, tmp_path_factory):
    """A writable copy of the fixture checkpoint, as NANOCHAT_BASE_DIR for this module."""
    base = tmp_path_factory.mktemp("chat_web") / "base"
    shutil.copytree(upstream_fixtures, base)
    for p in base.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    saved_base_dir = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = str(base)
    try:
        yield base
    finally:
        if saved_base_dir is None:
            os.environ.pop("NANOCHAT_BASE_DIR", None)
        else:
            os.environ["NANOCHAT_BASE_DIR"] = saved_base_dir


def load_pool():
    pool = chat_web.WorkerPool("cpu", 1)
    pool.load("base", model_tag="d2")
    return pool


@pytest.fixture(scope="module")
def server(base_dir):
    """The app over the fixture checkpoint (vanilla, default flags)."""
    with serve(load_pool()) as running:
        yield running


def post_events(server, payload, timeout=120):
    """POST /chat/completions and collect the server-sent events."""
    with httpx.stream("POST", server.url + "/chat/completions", json=payload, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return [json.loads(line[len("data: "):]) for line in r.iter_lines() if line.startswith("data: ")]


def greedy_text(engine, messages, max_tokens):
    session = chat.ChatSession(engine, max_tokens=max_tokens, temperature=0.0)
    session.load_messages(messages[:-1])
    session.add_user_message(messages[-1]["content"])
    return "".join(session.stream_reply())


def free_workers(server):
    return httpx.get(server.url + "/health", timeout=10).json()["available_workers"]

# -----------------------------------------------------------------------------
# Streaming


def test_streaming_reply_matches_the_engine(server):
    messages = [{"role": "user", "content": "The capital of France is"}]
    events = post_events(server, {"messages": messages, "temperature": 0.0, "max_tokens": 24})
    tokens = [e["token"] for e in events if "token" in e]
    assert len(tokens) > 1 and all(e.get("gpu") == 0 for e in events if "token" in e)
    assert events[-1] == {"done": True}
    assert "".join(tokens) == greedy_text(server.engine, messages, 24)


def test_multi_turn_history_and_dropped_turn_notice(server):
    long_turn = "the weather by the sea is mild and the mountains are tall " * 2
    messages = []
    for i in range(4):
        messages += [{"role": "user", "content": f"{i} {long_turn}"}, {"role": "assistant", "content": f"{i} ok"}]
    messages.append({"role": "user", "content": "and now?"})
    events = post_events(server, {"messages": messages, "temperature": 0.0, "max_tokens": 16})
    assert "160-token context" in events[0]["notice"]
    assert "".join(e["token"] for e in events if "token" in e) == greedy_text(server.engine, messages, 16)
    assert events[-1] == {"done": True}


def test_requests_queue_for_the_single_worker(server):
    messages = [{"role": "user", "content": "Hello"}]
    expected = greedy_text(server.engine, messages, 10)
    results = [None, None]

    def ask(i):
        events = post_events(server, {"messages": messages, "temperature": 0.0, "max_tokens": 10})
        results[i] = "".join(e["token"] for e in events if "token" in e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [expected, expected]
    assert free_workers(server) == 1


def test_worker_comes_back_when_the_client_leaves_midway(server):
    payload = {"messages": [{"role": "user", "content": "Tell me a long story"}], "max_tokens": 200}
    with httpx.stream("POST", server.url + "/chat/completions", json=payload, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # hang up after the first event
    assert wait_until(lambda: free_workers(server) == 1, timeout_s=30)
    events = post_events(server, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert events[-1] == {"done": True}


def test_health_and_stats(server):
    health = httpx.get(server.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["ready"] is True
    # on CPU: one worker and no GPU; the default reply length is what the 160-token model can give
    assert health["num_gpus"] == 0 and health["num_workers"] == 1 and health["available_workers"] == 1
    assert health["model"] == {"source": "base", "depth": 2, "step": 40, "sequence_len": 160, "device": "cpu"}
    assert health["defaults"] == {"temperature": 0.8, "top_k": 50, "max_tokens": 80}
    assert health["limits"] == {"temperature": [0.0, 2.0], "top_k": [0, 200], "max_tokens": [1, 80]}
    before = httpx.get(server.url + "/stats", timeout=10).json()
    post_events(server, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    after = httpx.get(server.url + "/stats", timeout=10).json()
    assert after["total_workers"] == 1 and after["busy_workers"] == 0 and after["available_workers"] == 1
    assert after["workers"][0]["device"] == "cpu"
    assert after["workers"][0]["requests_served"] == before["workers"][0]["requests_served"] + 1

# -----------------------------------------------------------------------------
# Limits and malformed requests: 4xx with a one-line message, the worker untouched


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


LIMIT_CASES = [
    ({"messages": []}, "At least one message is required"),
    ({"messages": [user("hi"), assistant("yo")] * 250 + [user("hi")]}, "Too many messages: 501"),
    ({"messages": [user("x" * 8001)]}, "Message 0 is too long (8001 characters)"),
    ({"messages": [user("x" * 7000), assistant("y" * 7000)] * 2 + [user("z" * 7000)]}, "Total conversation is too long (35000"),
    ({"messages": [{"role": "system", "content": "be nice"}, user("hi")]}, "invalid role 'system'"),
    ({"messages": [user("   ")]}, "Message 0 has empty content"),
    ({"messages": [user("hi"), assistant("hello")]}, "last message must be from the user"),
    ({"messages": [user("hi"), user("hi again")]}, "should be from 'assistant'"),
    ({"messages": [user("hi")], "temperature": 2.5}, "Temperature must be between 0.0 and 2.0"),
    ({"messages": [user("hi")], "temperature": -0.1}, "Temperature must be between 0.0 and 2.0"),
    ({"messages": [user("hi")], "top_k": 201}, "top_k must be between 0 and 200"),
    ({"messages": [user("hi")], "top_k": -1}, "top_k must be between 0 and 200"),
    ({"messages": [user("hi")], "max_tokens": 0}, "max_tokens must be between 1 and 4096"),
    ({"messages": [user("hi")], "max_tokens": 4097}, "max_tokens must be between 1 and 4096"),
    ({"messages": [user("many words " * 300)]}, "too long for the model's context"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content: Input should be a valid string"),
    ({"messages": [{"role": "user"}]}, "messages.0.content: Field required"),
    ({"messages": "hi"}, "invalid request: messages"),
    ({"messages": [user("hi")], "temperature": "hot"}, "invalid request: temperature"),
    ({"prompt": "hi"}, "invalid request: messages: Field required"),
]


@pytest.mark.parametrize("payload, message", LIMIT_CASES)
def test_limits_give_400_with_a_message(server, payload, message):
    r = httpx.post(server.url + "/chat/completions", json=payload, timeout=60)
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert message in detail and "\n" not in detail


@pytest.mark.parametrize("body, headers, status, message", [
    (b"{bad json", {"content-type": "application/json"}, 400, "request body is not valid JSON"),
    (b"", {"content-type": "application/json"}, 400, "request body is empty"),
    (b"[1, 2]", {"content-type": "application/json"}, 400, "invalid request"),
    (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', {}, 400, "not UTF-8"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', {"content-type": "text/plain"}, 200, None),
    (b'{"messages": [' + b" " * 1_000_001 + b"]}", {"content-type": "application/json"}, 413, "at most 1000000"),
    # 200,000 levels of nesting: the JSON parser's recursion limit, once a 500
    (b'{"messages": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", {"content-type": "application/json"}, 400,
     "nests JSON too deeply"),
    # UTF-16, with and without a byte-order mark: once "not valid JSON"
    ('{"messages": [{"role": "user", "content": "hi"}]}'.encode("utf-16"), {}, 400, "not UTF-8"),
    ('{"messages": [{"role": "user", "content": "hi"}]}'.encode("utf-16-le"), {}, 400, "not UTF-8"),
])
def test_malformed_requests_give_4xx(server, body, headers, status, message):
    r = httpx.post(server.url + "/chat/completions", content=body, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    if message is not None:
        detail = r.json()["detail"]
        assert message in detail and "\n" not in detail and "Traceback" not in r.text


def test_queue_limit_gives_503_with_retry_after(server):
    server.pool.max_waiting = 1
    worker_lock = server.pool.workers[0].lock  # generation steps take it: holding it keeps the worker busy
    results = {}

    def ask(name):
        results[name] = post_events(server, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})

    threads = [threading.Thread(target=ask, args=(name,)) for name in ("served", "queued")]
    worker_lock.acquire()
    try:
        threads[0].start()
        assert wait_until(lambda: free_workers(server) == 0, timeout_s=30)
        threads[1].start()
        assert wait_until(lambda: server.pool.waiting == 1, timeout_s=30)
        r = httpx.post(server.url + "/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]},
                       timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == str(chat_web.RETRY_AFTER_SECONDS)
        detail = r.json()["detail"]
        assert "server busy" in detail and "--max-queue 1" in detail and "\n" not in detail
    finally:
        worker_lock.release()
        server.pool.max_waiting = chat_web.DEFAULT_MAX_QUEUE
    for t in threads:
        t.join(timeout=120)
    # both the running and the queued request were served, not dropped
    assert results["served"][-1] == {"done": True} and results["queued"][-1] == {"done": True}
    assert wait_until(lambda: free_workers(server) == 1, timeout_s=30)


def test_wrong_method_and_path(server):
    assert httpx.get(server.url + "/chat/completions", timeout=10).status_code == 405
    assert httpx.get(server.url + "/nope", timeout=10).status_code == 404
    assert free_workers(server) == 1  # no rejected request kept the worker


def test_bad_server_flags_are_one_line(capsys):
    for argv, message in [
        (["--device-type", "cpu", "-n", "2"], "only CUDA runs several workers"),
        (["--device-type", "cpu", "-t", "3"], "--temperature must be between"),
        (["--device-type", "cpu", "-i", "web"], "source must be one of"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            chat_web.main(argv)
        assert exit_info.value.code == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], err

# -----------------------------------------------------------------------------
# Sessions: the conversation kept between requests


def reply_of(events):
    return "".join(e["token"] for e in events if "token" in e)


def continued_replies(engine, texts, max_tokens):
    """The greedy replies of one ChatSession told `texts` in turn (what a kept session gives)."""
    session = chat.ChatSession(engine, max_tokens=max_tokens, temperature=0.0)
    replies = []
    for text in texts:
        session.add_user_message(text)
        replies.append("".join(session.stream_reply()))
    return replies


def new_session(server):
    r = httpx.post(server.url + "/sessions", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["session_id"]


def ask(server, session_id, messages, max_tokens=12):
    return post_events(server, {"messages": messages, "session_id": session_id, "temperature": 0.0,
                                "max_tokens": max_tokens})


def spoken(messages):
    return [{"role": m["role"], "content": m["content"]} for m in messages]


FIRST, SECOND = "The capital of France is", "and the capital of Spain is"


def test_session_keeps_the_conversation_between_requests(server):
    session_id = new_session(server)
    r1 = reply_of(ask(server, session_id, [user(FIRST)]))
    kept = server.sessions.open[session_id].session
    # the second request carries only the new message: the session holds the rest
    events = ask(server, session_id, [user(SECOND)])
    r2 = reply_of(events)
    assert [r1, r2] == continued_replies(server.engine, [FIRST, SECOND], 12)
    full = [user(FIRST), assistant(r1), user(SECOND)]
    assert r2 == greedy_text(server.engine, full, 12)  # what a full replay gives
    assert r2 != greedy_text(server.engine, [user(SECOND)], 12)  # and the history changed the reply
    assert reply_of(post_events(server, {"messages": full, "temperature": 0.0, "max_tokens": 12})) == r2
    assert server.sessions.open[session_id].session is kept  # the same session, never rebuilt
    assert kept.messages == full + [assistant(r2)]
    # the page sends the whole list: it agrees with the session, so only the new message is added
    third = full + [assistant(r2), user("and Italy?")]
    r3 = reply_of(ask(server, session_id, third))
    assert r3 == continued_replies(server.engine, [FIRST, SECOND, "and Italy?"], 12)[2]
    assert server.sessions.open[session_id].session is kept and len(kept.messages) == 6
    got = httpx.get(f"{server.url}/sessions/{session_id}", timeout=10).json()
    assert got["session_id"] == session_id and spoken(got["messages"]) == third + [assistant(r3)]
    assert all("composition" in m for m in got["messages"] if m["role"] == "assistant")
    assert got["composition"] == got["messages"][-1]["composition"]
    assert free_workers(server) == 1


def test_earlier_messages_that_disagree_reset_and_replay_the_session(server):
    session_id = new_session(server)
    r1 = reply_of(ask(server, session_id, [user(FIRST)]))
    # the page edited the first exchange (a regenerated reply): the session replays what it sends
    edited = [user(FIRST), assistant("Paris."), user(SECOND)]
    assert "Paris." != r1
    r2 = reply_of(ask(server, session_id, edited))
    assert r2 == greedy_text(server.engine, edited, 12)
    assert server.sessions.open[session_id].session.messages == edited + [assistant(r2)]
    got = httpx.get(f"{server.url}/sessions/{session_id}", timeout=10).json()
    assert spoken(got["messages"]) == edited + [assistant(r2)]


def test_an_unknown_session_id_opens_a_session_with_the_earlier_messages(server):
    session_id = "client-chosen_1"
    assert httpx.get(f"{server.url}/sessions/{session_id}", timeout=10).status_code == 404
    history = [user(FIRST), assistant("Paris."), user(SECOND)]
    r = reply_of(ask(server, session_id, history))
    assert r == greedy_text(server.engine, history, 12)
    got = httpx.get(f"{server.url}/sessions/{session_id}", timeout=10).json()
    assert spoken(got["messages"]) == history + [assistant(r)]
    assert httpx.delete(f"{server.url}/sessions/{session_id}", timeout=10).json() == {"session_id": session_id, "closed": True}


def test_new_sessions_get_distinct_safe_ids_and_start_empty(server):
    ids = {new_session(server) for _ in range(5)}
    assert len(ids) == 5 and all(chat_web.SESSION_ID_PATTERN.fullmatch(i) for i in ids)
    for session_id in ids:
        assert httpx.get(f"{server.url}/sessions/{session_id}", timeout=10).json() == {"session_id": session_id, "messages": []}
        assert httpx.delete(f"{server.url}/sessions/{session_id}", timeout=10).status_code == 200


@pytest.mark.parametrize("session_id", ["../etc", "a/b", "a b", "-lead", ".hidden", "x" * 65, "", "caf\u00e9", "a\nb"])
def test_bad_session_ids_give_400_before_any_work(server, session_id):
    served = httpx.get(server.url + "/stats", timeout=10).json()["workers"][0]["requests_served"]
    r = httpx.post(server.url + "/chat/completions", json={"messages": [user("hi")], "session_id": session_id}, timeout=30)
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert detail.startswith("session_id ") and "is not valid" in detail and "\n" not in detail
    assert httpx.get(server.url + "/stats", timeout=10).json()["workers"][0]["requests_served"] == served
    if session_id and "/" not in session_id and session_id.isprintable():  # ids a URL path can carry
        for method in ("GET", "DELETE"):
            r = httpx.request(method, f"{server.url}/sessions/{session_id}", timeout=10)
            assert r.status_code == 400 and "is not valid" in r.json()["detail"], (method, r.text)


def test_session_id_must_be_a_string_and_unknown_ids_give_404(server):
    r = httpx.post(server.url + "/chat/completions", json={"messages": [user("hi")], "session_id": 5}, timeout=30)
    assert r.status_code == 400 and "invalid request: session_id" in r.json()["detail"]
    for method in ("GET", "DELETE"):
        r = httpx.request(method, f"{server.url}/sessions/never-opened", timeout=10)
        assert r.status_code == 404, r.text
        detail = r.json()["detail"]
        assert "no open session 'never-opened'" in detail and "\n" not in detail


def plain_prompt_tokens(engine, messages, max_tokens):
    session = chat.ChatSession(engine, max_tokens=max_tokens, temperature=0.0)
    session.load_messages(messages[:-1])
    session.add_user_message(messages[-1]["content"])
    return len(session.render_prompt())


def check_composition_sums(composition):
    runs = composition["runs"]
    assert runs and all(set(run) == {"level", "entries", "covers"} for run in runs)
    assert all(run["level"] in (0, 1, 2) and run["entries"] >= 1 for run in runs)
    # a LOD0 entry covers one token, a LOD1 gist 32, a LOD2 gist 1024; the runs cover the history
    assert all(run["covers"] == run["entries"] * 32 ** run["level"] for run in runs)
    assert sum(run["covers"] for run in runs) == composition["history_tokens"]
    assert all(a["level"] != b["level"] for a, b in zip(runs, runs[1:]))  # runs of one level are merged


def test_plain_sessions_report_one_lod0_run_covering_the_prompt(server):
    messages = [user("Hello there")]
    events = post_events(server, {"messages": messages, "temperature": 0.0, "max_tokens": 8})
    assert [i for i, e in enumerate(events) if "composition" in e] == [len(events) - 2]  # just before done
    prompt = plain_prompt_tokens(server.engine, messages, 8)
    assert events[-2]["composition"] == {"history_tokens": prompt, "budget_tokens": 160 - 8,
                                         "runs": [{"level": 0, "entries": prompt, "covers": prompt}]}
    check_composition_sums(events[-2]["composition"])
    # past the context the policy dropped turns: the composition covers what was really decoded
    long_turn = "the weather by the sea is mild and the mountains are tall " * 2
    history = []
    for i in range(4):
        history += [user(f"{i} {long_turn}"), assistant(f"{i} ok")]
    history.append(user("and now?"))
    composition = post_events(server, {"messages": history, "temperature": 0.0, "max_tokens": 16})[-2]["composition"]
    assert composition["history_tokens"] == plain_prompt_tokens(server.engine, history, 16) <= 160 - 16
    check_composition_sums(composition)


def test_a_reply_cut_short_still_leaves_the_session_usable(server):
    session_id = new_session(server)
    payload = {"messages": [user("Tell me a long story")], "session_id": session_id, "max_tokens": 60}
    with httpx.stream("POST", server.url + "/chat/completions", json=payload, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # hang up after the first event
    assert wait_until(lambda: free_workers(server) == 1 and server.sessions.open[session_id].users == 0, timeout_s=30)
    kept = server.sessions.open[session_id].session
    assert [m["role"] for m in kept.messages] == ["user", "assistant"]  # the partial reply joined it
    partial = kept.messages[1]
    # a client that sends only the new message continues after the partial reply
    r = reply_of(ask(server, session_id, [user("Hi")]))
    assert kept.messages == [user("Tell me a long story"), partial, user("Hi"), assistant(r)]
    # the page dropped the failed exchange, so its list disagrees: the session is replayed to match it
    page = [user("Hi"), assistant(r), user("again")]
    events = ask(server, session_id, page)
    assert reply_of(events) == greedy_text(server.engine, page, 12)
    assert server.sessions.open[session_id].session is kept and kept.messages == page + [assistant(reply_of(events))]


def test_requests_of_one_session_wait_for_its_worker():
    """WorkerPool: a session's request takes only the worker that built the session."""
    pool = chat_web.WorkerPool("cpu", 1)
    pool.workers = [chat_web.Worker(gpu_id=i, device=torch.device("cpu"), engine=None, tokenizer=None) for i in range(2)]

    async def scenario():
        pool.start()
        bound = await pool.acquire()
        waiting = asyncio.create_task(pool.acquire(bound))
        other = await pool.acquire()  # a request of no session takes the free one
        await asyncio.sleep(0.01)
        assert other is pool.workers[1] and bound is pool.workers[0]
        assert not waiting.done() and pool.waiting == 1 and pool.free_count() == 0
        pool.release(other)  # a free worker, but not the session's
        await asyncio.sleep(0.01)
        assert not waiting.done() and pool.free_count() == 1
        pool.release(bound)
        assert await asyncio.wait_for(waiting, 5) is bound
        assert pool.waiting == 0 and pool.free_count() == 1

    asyncio.run(scenario())

# -----------------------------------------------------------------------------
# A variant's session: commands, its own composition, close()


CLOSED = []  # session ids of FakeMemorySession.close() calls, in order


class FakeMemorySession(chat.ChatSession):
    """A variant's session for these tests: a plain ChatSession that answers /memory and /forget,
    reports a made-up Working Context (the older prompt as LOD1 gists of 32 tokens, the rest as
    tokens), counts its replies and records close()."""

    def __init__(self, engine, session_id=None, **settings):
        super().__init__(engine, **settings)
        self.session_id, self.replies, self.closes = session_id, 0, 0
        self.decoded_tokens = 0

    def command(self, text):
        if text == "/memory":
            return f"memory holds {len(self.turns)} turns"
        if text == "/forget":
            self.reset()
            return "forgotten"
        return None

    def stream_reply(self):
        self.replies += 1
        self.decoded_tokens = len(self.render_prompt())
        yield from super().stream_reply()

    def composition(self):
        gists = (self.decoded_tokens - 1) // 32
        tokens = self.decoded_tokens - 32 * gists
        runs = [{"level": 1, "entries": gists, "covers": 32 * gists}] if gists else []
        return {"history_tokens": self.decoded_tokens, "budget_tokens": gists + tokens,
                "runs": runs + [{"level": 0, "entries": tokens, "covers": tokens}]}

    def close(self):
        self.closes += 1
        CLOSED.append(self.session_id)


class FakeMemoryVariant:
    name = "fakememory"

    def __init__(self, config=None):
        self.config = config or {}

    def chat_session(self, engine, config, session_id=None):
        if session_id and session_id.startswith("locked"):  # as a memory dir another chat holds
            raise ValueError(f"memory {session_id} is being written by another chat; close it first")
        return FakeMemorySession(engine, session_id, max_tokens=config["max_tokens"], temperature=config["temperature"],
                                 top_k=config["top_k"], seed=config["seed"])


hooks.register_variant("fakememory", FakeMemoryVariant)


@pytest.fixture(scope="module")
def fake_pool(base_dir):
    return load_pool()


@pytest.fixture(scope="module")
def memory_server(fake_pool):
    with serve(fake_pool, FakeMemoryVariant()) as running:
        yield running


def test_commands_are_answered_by_the_session_not_the_model(memory_server):
    server = memory_server
    session_id = new_session(server)
    r1 = reply_of(ask(server, session_id, [user(FIRST)]))
    kept = server.sessions.open[session_id].session
    assert kept.replies == 1
    events = ask(server, session_id, [user("/memory")])
    assert events == [{"token": "memory holds 2 turns", "gpu": 0, "command": True}, {"done": True}]
    assert kept.replies == 1 and kept.messages == [user(FIRST), assistant(r1)]  # the model was not asked
    got = httpx.get(f"{server.url}/sessions/{session_id}", timeout=10).json()["messages"]
    assert got[2:] == [{"role": "user", "content": "/memory", "command": True},
                       {"role": "assistant", "content": "memory holds 2 turns", "command": True}]
    # the page sends its conversation without command exchanges: that agrees, nothing is replayed
    r2 = reply_of(ask(server, session_id, [user(FIRST), assistant(r1), user(SECOND)]))
    assert r2 == continued_replies(server.engine, [FIRST, SECOND], 12)[1]
    assert server.sessions.open[session_id].session is kept and kept.replies == 2
    assert kept.messages == [user(FIRST), assistant(r1), user(SECOND), assistant(r2)]
    # a stateless request's session answers commands too, and is closed after its answer
    closed = CLOSED.count(None)
    events = post_events(server, {"messages": [user("/forget")]})
    assert reply_of(events) == "forgotten" and CLOSED.count(None) == closed + 1


def test_a_variant_session_reports_its_own_composition(memory_server):
    server = memory_server
    session_id = new_session(server)
    long_question = "tell me about the weather by the sea and the tall mountains " * 2
    events = ask(server, session_id, [user(long_question)], max_tokens=8)
    kept = server.sessions.open[session_id].session
    composition = events[-2]["composition"]
    assert events[-1] == {"done": True} and composition == kept.composition()
    assert [run["level"] for run in composition["runs"]] == [1, 0]  # gists, then the newest tokens
    check_composition_sums(composition)
    assert composition["history_tokens"] == plain_prompt_tokens(server.engine, [user(long_question)], 8)
    got = httpx.get(f"{server.url}/sessions/{session_id}", timeout=10).json()
    assert got["composition"] == composition == got["messages"][-1]["composition"]


def test_a_stateless_request_closes_its_variant_session(memory_server):
    closed = CLOSED.count(None)
    events = post_events(memory_server, {"messages": [user("Hi")], "temperature": 0.0, "max_tokens": 4})
    assert events[-1] == {"done": True} and "composition" in events[-2]
    assert CLOSED.count(None) == closed + 1
    # also when the message is refused (it cannot fit)
    r = httpx.post(memory_server.url + "/chat/completions", json={"messages": [user("many words " * 300)]}, timeout=30)
    assert r.status_code == 400 and wait_until(lambda: CLOSED.count(None) == closed + 2, timeout_s=10)


def test_a_session_that_cannot_be_built_is_a_400_and_stays_unopened(memory_server):
    r = httpx.post(memory_server.url + "/chat/completions", json={"messages": [user("Hi")], "session_id": "locked-1"},
                   timeout=30)
    assert r.status_code == 400 and r.json()["detail"] == "memory locked-1 is being written by another chat; close it first"
    assert httpx.get(memory_server.url + "/sessions/locked-1", timeout=10).status_code == 404
    assert free_workers(memory_server) == 1


def test_delete_closes_the_session_and_the_id_opens_a_new_one(memory_server):
    server = memory_server
    session_id = new_session(server)
    ask(server, session_id, [user(FIRST)])
    first = server.sessions.open[session_id].session
    r = httpx.delete(f"{server.url}/sessions/{session_id}", timeout=10)
    assert r.status_code == 200 and r.json() == {"session_id": session_id, "closed": True}
    assert first.closes == 1 and CLOSED[-1] == session_id
    assert httpx.get(f"{server.url}/sessions/{session_id}", timeout=10).status_code == 404
    assert httpx.delete(f"{server.url}/sessions/{session_id}", timeout=10).status_code == 404
    # the id is unknown again: its next request opens a fresh session (no memory of FIRST)
    r2 = reply_of(ask(server, session_id, [user(SECOND)]))
    assert server.sessions.open[session_id].session is not first
    assert r2 == continued_replies(server.engine, [SECOND], 12)[0]
    assert first.closes == 1


def test_a_session_in_use_cannot_be_deleted(memory_server):
    server = memory_server
    session_id = new_session(server)
    ask(server, session_id, [user("Hi")], max_tokens=2)
    lock = server.pool.workers[0].lock
    done = {}
    lock.acquire()  # the next reply's first step waits: the session stays in use
    try:
        thread = threading.Thread(target=lambda: done.setdefault("events", ask(server, session_id, [user("Again")], 2)))
        thread.start()
        assert wait_until(lambda: server.sessions.open[session_id].users == 1, timeout_s=30)
        r = httpx.delete(f"{server.url}/sessions/{session_id}", timeout=10)
        assert r.status_code == 409 and "is answering a request" in r.json()["detail"]
    finally:
        lock.release()
    thread.join(timeout=60)
    assert done["events"][-1] == {"done": True}
    assert httpx.delete(f"{server.url}/sessions/{session_id}", timeout=10).status_code == 200


def test_idle_sessions_are_closed(fake_pool):
    idle_s = 0.5
    with serve(fake_pool, FakeMemoryVariant(), "--session-idle-s", str(idle_s)) as server:
        session_id = new_session(server)
        ask(server, session_id, [user("Hi")], max_tokens=2)
        last_used = time.monotonic()
        kept = server.sessions.open[session_id].session
        assert wait_until(lambda: kept.closes == 1, timeout_s=20), "the idle session was not closed"
        assert time.monotonic() - last_used >= idle_s  # never before its idle time
        assert httpx.get(f"{server.url}/sessions/{session_id}", timeout=10).status_code == 404
        assert session_id not in server.sessions.open
    assert kept.closes == 1  # shutdown does not close it a second time


def test_past_max_sessions_the_least_recently_used_idle_one_is_closed(fake_pool):
    with serve(fake_pool, FakeMemoryVariant(), "--max-sessions", "2") as server:
        older, newer = new_session(server), new_session(server)
        ask(server, older, [user("Hi")], max_tokens=2)
        ask(server, newer, [user("Hi")], max_tokens=2)
        ask(server, older, [user("Hi")], max_tokens=2)  # now `newer` is the least recently used
        evicted = server.sessions.open[newer].session
        third = new_session(server)
        assert evicted.closes == 1 and set(server.sessions.open) == {older, third}
        assert httpx.get(f"{server.url}/sessions/{newer}", timeout=10).status_code == 404
        assert httpx.get(f"{server.url}/sessions/{older}", timeout=10).status_code == 200
        # every open session in use: a new one is refused, none is closed
        for entry in server.sessions.open.values():
            entry.users += 1
        try:
            r = httpx.post(server.url + "/sessions", timeout=10)
            assert r.status_code == 503 and r.headers["retry-after"] == str(chat_web.RETRY_AFTER_SECONDS)
            assert "--max-sessions" in r.json()["detail"] and set(server.sessions.open) == {older, third}
        finally:
            for entry in server.sessions.open.values():
                entry.users -= 1


def test_shutdown_closes_every_open_session(fake_pool):
    with serve(fake_pool, FakeMemoryVariant()) as server:
        ids = [new_session(server) for _ in range(2)]
        for session_id in ids:
            ask(server, session_id, [user("Hi")], max_tokens=2)
        kept = [server.sessions.open[i].session for i in ids]
        assert [s.closes for s in kept] == [0, 0]
    assert [s.closes for s in kept] == [1, 1] and not server.sessions.open

# -----------------------------------------------------------------------------
# Flags: --config, the session flags


def test_config_file_picks_the_variant_and_flags_given_win(tmp_path):
    config = tmp_path / "web.yaml"
    config.write_text("variant: fakememory\nsource: base\nmodel_tag: d2\ntemperature: 0.3\ntop_k: 7\n"
                      "device_type: cpu\nbase_dir: ~/models\nfakememory:\n  budget_tokens: 64\n")
    argv = ["--config", str(config), "-t", "0.9", "-p", "1234"]
    args = chat_web.build_parser().parse_args(argv)
    variant, base_dir = chat_web.apply_config(args, argv)
    assert isinstance(variant, FakeMemoryVariant) and variant.config == {"budget_tokens": 64}
    assert (args.source, args.model_tag, args.top_k, args.device_type) == ("base", "d2", 7, "cpu")  # from the file
    assert args.temperature == 0.9 and args.port == 1234  # given on the command line: the flag wins
    assert args.max_tokens == chat.DEFAULTS["max_tokens"]  # not in the file: the chat default, as nanochat.chat
    assert base_dir == "~/models"
    # without --config: vanilla and the flags' own defaults, as before
    args = chat_web.build_parser().parse_args([])
    variant, base_dir = chat_web.apply_config(args, [])
    assert variant.name == "vanilla" and base_dir is None and (args.temperature, args.max_tokens) == (0.8, 512)


def test_bad_config_and_session_flags_are_one_line(capsys, tmp_path):
    unknown_key = tmp_path / "bad.yaml"
    unknown_key.write_text("variant: vanilla\ntemprature: 0.5\n")
    unknown_variant = tmp_path / "nope.yaml"
    unknown_variant.write_text("variant: nosuchvariant\n")
    for argv, message in [
        (["--device-type", "cpu", "--session-idle-s", "0"], "--session-idle-s must be more than 0"),
        (["--device-type", "cpu", "--max-sessions", "0"], "--max-sessions must be 1 or more"),
        (["--config", str(tmp_path / "missing.yaml")], "config file not found"),
        (["--config", str(unknown_key)], "unknown config key 'temprature'"),
        (["--config", str(unknown_variant)], "unknown variant 'nosuchvariant'"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            chat_web.main(argv)
        assert exit_info.value.code == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], err


def test_help_names_every_session_flag(capsys):
    with pytest.raises(SystemExit):
        chat_web.build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--config FILE.yaml", "--session-idle-s SECONDS", "--max-sessions MAX_SESSIONS"):
        assert flag in text
    assert "a flag given on the command line still wins" in text and "least recently used idle one" in text


# -----------------------------------------------------------------------------
# The page


def test_page_is_served_and_self_contained(server):
    r = httpx.get(server.url + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<textarea" in r.text and "/chat/completions" in r.text
    assert "http://" not in r.text and "https://" not in r.text  # no external requests


def png_summary(path):
    """(width, height, number of distinct scanlines) of an 8-bit PNG, without PIL."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, chunks = 8, {}
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunks.setdefault(kind, []).append(data[pos + 8:pos + 8 + length])
        pos += 12 + length
    width, height, bit_depth, color_type = struct.unpack(">IIBB", chunks[b"IHDR"][0][:10])
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    raw = zlib.decompress(b"".join(chunks[b"IDAT"]))
    stride = 1 + width * channels * bit_depth // 8
    assert len(raw) == stride * height
    rows = {raw[i * stride:(i + 1) * stride] for i in range(height)}
    return width, height, len(rows)


def run_chromium(tmp_path, url, *extra):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,800",
           "--virtual-time-budget=5000", *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                    reason=f"{CHROMIUM} not installed (apt-get install -y chromium)")


@needs_chromium
def test_page_screenshot_in_headless_chromium(server, tmp_path):
    shot = tmp_path / "page.png"
    r = run_chromium(tmp_path, server.url + "/", f"--screenshot={shot}")
    assert shot.exists(), r.stderr[-2000:]
    width, height, distinct_rows = png_summary(shot)
    assert (width, height) == (1000, 800)
    # a blank or single-colour page has a handful of distinct scanlines; text and borders make many
    assert distinct_rows > 50
    assert shot.stat().st_size > 5000


@needs_chromium
def test_page_scripts_run_against_the_server(server, tmp_path):
    # after load the page asks /health and shows the model in the header
    dom = run_chromium(tmp_path, server.url + "/", "--dump-dom").stdout
    assert "base \u00b7 d2 \u00b7 step 40 \u00b7 cpu \u00b7 1 worker \u00b7 160-token context" in dom
    assert "temperature 0.8" in dom and "max tokens 80 (of a 160-token context)" in dom
    # /?q= sends the question: it shows as the user's bubble and reaches the server as a chat request
    served = httpx.get(server.url + "/stats", timeout=10).json()["workers"][0]["requests_served"]
    dom = run_chromium(tmp_path, server.url + "/?q=Hello%20from%20Chromium", "--dump-dom").stdout
    assert 'class="msg user"' in dom and "Hello from Chromium" in dom
    assert wait_until(lambda: httpx.get(server.url + "/stats", timeout=10).json()["workers"][0]["requests_served"] == served + 1)
    assert wait_until(lambda: free_workers(server) == 1)



class DevTools:
    """Just enough of the Chrome DevTools Protocol: commands to one page over its websocket."""

    def __init__(self, socket):
        self.socket = socket
        self.last_id = 0

    def call(self, method, **params):
        self.last_id += 1
        self.socket.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        while True:  # events of the page arrive in between; the answer carries our id
            message = json.loads(self.socket.recv(timeout=30))
            if message.get("id") == self.last_id:
                assert "error" not in message, message
                return message["result"]

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression, timeout_s=30.0):
        """Poll until `expression` is true (an error, e.g. while the page is still loading, is false)."""
        guarded = f"(() => {{ try {{ return Boolean({expression}); }} catch (e) {{ return false; }} }})()"
        assert wait_until(lambda: self.evaluate(guarded), timeout_s=timeout_s), f"timed out waiting for {expression}"

    def reload(self):
        """Reload the page and wait until the new document runs (the old one may linger a moment)."""
        self.evaluate("window.beforeReload = true")
        self.call("Page.reload")
        self.wait_for("window.beforeReload === undefined && document.readyState === 'complete'")

    def type_and_send(self, text):
        self.evaluate("document.getElementById('input').focus()")
        self.call("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)



@contextmanager
def devtools_page(tmp_path):
    """Headless Chromium with its DevTools port open, and a client on its one page."""
    profile = tmp_path / "cdp-profile"
    with open(tmp_path / "chromium.log", "w") as log:
        browser = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                                    "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1000,800",
                                    "--remote-debugging-port=0", "--remote-allow-origins=*", "about:blank"],
                                   stdout=log, stderr=log)
    try:
        port_file = profile / "DevToolsActivePort"  # Chromium writes the port it chose here
        assert wait_until(lambda: port_file.exists() and port_file.read_text().strip(), timeout_s=30), \
            (tmp_path / "chromium.log").read_text()[-2000:]
        port = int(port_file.read_text().split()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        url = next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"]
        with connect(url, max_size=None, open_timeout=30) as socket:
            yield DevTools(socket)
    finally:
        browser.terminate()
        browser.wait(timeout=30)


ROWS_JS = """Array.from(document.querySelectorAll('#thread .msg.user, #thread .msg.assistant')).map((row) => {
  const bar = row.querySelector('.wc');
  return {kind: row.classList.contains('user') ? 'user' : 'assistant', text: row.querySelector('.body').textContent,
          bar: bar && {caption: bar.querySelector('.caption').textContent,
                       runs: Array.from(bar.querySelectorAll('.seg')).map((s) => ({
                         level: Number(s.dataset.level), entries: Number(s.dataset.entries),
                         covers: Number(s.dataset.covers), width: s.style.width}))}};
})"""


@needs_chromium
def test_page_keeps_its_conversation_across_a_reload(server, tmp_path):
    turns = ["The capital of France is", "and the capital of Spain is", "and Italy?"]
    with devtools_page(tmp_path) as page:
        page.call("Page.navigate", url=server.url + "/")
        page.wait_for("document.readyState === 'complete' && /worker/.test(document.getElementById('modelInfo').textContent)"
                      " && Boolean(localStorage.getItem('nanochat.session_id'))")
        session_id = page.evaluate("localStorage.getItem('nanochat.session_id')")
        assert chat_web.SESSION_ID_PATTERN.fullmatch(session_id)
        for command in ("/temperature 0", "/maxtokens 12"):  # greedy, short: replies the engine can check
            page.type_and_send(command)
        for i, text in enumerate(turns):
            page.type_and_send(text)
            page.wait_for(f"document.querySelectorAll('.msg.assistant .wc').length === {i + 1}")
        rows = page.evaluate(ROWS_JS)
        # the conversation as typed, and the engine's own replies (one session, kept by the server)
        assert [r["kind"] for r in rows] == ["user", "assistant"] * 3
        assert [r["text"] for r in rows[::2]] == turns
        assert [r["text"] for r in rows[1::2]] == continued_replies(server.engine, turns, 12)
        got = httpx.get(f"{server.url}/sessions/{session_id}", timeout=10).json()
        assert [m["content"] for m in got["messages"]] == [r["text"] for r in rows]
        # each reply's bar: its composition, one LOD0 run covering the prompt, and the caption's figures
        for row, message in zip(rows[1::2], got["messages"][1::2]):
            composition = message["composition"]
            runs = [{k: run[k] for k in ("level", "entries", "covers")} for run in row["bar"]["runs"]]
            assert runs == composition["runs"] and [run["width"] for run in row["bar"]["runs"]] == ["100%"]
            tokens = composition["history_tokens"]
            assert row["bar"]["caption"] == f"{tokens:,} tokens in memory \u00b7 WC {tokens:,} tokens"
        # reload: the same session, the conversation and its bars re-rendered from the server
        page.reload()
        page.wait_for("document.querySelectorAll('.msg.assistant .wc').length === 3")
        assert page.evaluate("localStorage.getItem('nanochat.session_id')") == session_id
        assert page.evaluate(ROWS_JS) == rows
        # the page goes on in the same session (its settings are the server's defaults again)
        for command in ("/temperature 0", "/maxtokens 12"):
            page.type_and_send(command)
        page.type_and_send("and Germany?")
        page.wait_for("document.querySelectorAll('.msg.assistant .wc').length === 4")
        reply = page.evaluate("document.querySelectorAll('.msg.assistant .body')[3].textContent")
        assert reply == continued_replies(server.engine, turns + ["and Germany?"], 12)[3]
        # "New conversation": the old session is closed, a new id is kept, the thread is empty
        page.evaluate("document.getElementById('newChat').click()")
        page.wait_for(f"localStorage.getItem('nanochat.session_id') !== {json.dumps(session_id)}")
        assert wait_until(lambda: httpx.get(f"{server.url}/sessions/{session_id}", timeout=10).status_code == 404)
        assert page.evaluate("document.querySelectorAll('#thread .msg').length") == 0
        new_id = page.evaluate("localStorage.getItem('nanochat.session_id')")
        assert httpx.get(f"{server.url}/sessions/{new_id}", timeout=10).json()["messages"] == []

@needs_chromium
def test_page_shows_a_variant_sessions_gists_and_commands(memory_server, tmp_path):
    server = memory_server
    long_question = "tell me about the weather by the sea and the tall mountains " * 2
    with devtools_page(tmp_path) as page:
        page.call("Page.navigate", url=server.url + "/")
        page.wait_for("/worker/.test(document.getElementById('modelInfo').textContent)"
                      " && Boolean(localStorage.getItem('nanochat.session_id'))")
        session_id = page.evaluate("localStorage.getItem('nanochat.session_id')")
        for command in ("/temperature 0", "/maxtokens 8"):
            page.type_and_send(command)
        page.type_and_send(long_question)
        page.wait_for("document.querySelectorAll('.msg.assistant .wc').length === 1")
        kept = server.sessions.open[session_id].session
        composition = kept.composition()
        bar = page.evaluate(ROWS_JS)[1]["bar"]
        # gists, then tokens: each segment as wide as the history it covers, coloured by level
        assert [{k: run[k] for k in ("level", "entries", "covers")} for run in bar["runs"]] == composition["runs"]
        total = sum(run["covers"] for run in composition["runs"])
        for run in bar["runs"]:
            assert abs(float(run["width"].rstrip("%")) - 100 * run["covers"] / total) < 1e-3  # CSS keeps 6 digits
        colours = page.evaluate("Array.from(document.querySelectorAll('.wc .seg')).map((s) => getComputedStyle(s).backgroundColor)")
        assert len(set(colours)) == 2
        gists, tokens = composition["runs"][0]["entries"], composition["runs"][1]["covers"]
        assert bar["caption"] == (f"{composition['history_tokens']:,} tokens in memory \u00b7 WC {tokens:,} "
                                  f"token{'s' if tokens > 1 else ''} + {gists:,} gist{'s' if gists > 1 else ''}")
        # /memory is not the page's: it goes to the session, whose answer shows as a console line
        page.type_and_send("/memory")
        page.wait_for("Array.from(document.querySelectorAll('.msg.console')).some((r) => r.textContent === 'memory holds 2 turns')")
        assert kept.replies == 1 and page.evaluate("messages.length") == 2
        page.type_and_send(SECOND)
        page.wait_for("document.querySelectorAll('.msg.assistant .wc').length === 2")
        assert kept.replies == 2 and len(kept.messages) == 4  # the command never joined the conversation
        rows = page.evaluate(ROWS_JS)
        assert [r["text"] for r in rows if r["kind"] == "user"] == [long_question.strip(), "/memory", SECOND]
        # reload: the command exchange comes back too, still outside the conversation
        page.reload()
        page.wait_for("document.querySelectorAll('.msg.assistant .wc').length === 2")
        assert page.evaluate(ROWS_JS) == rows
        assert page.evaluate("Array.from(document.querySelectorAll('.msg.console')).map((r) => r.textContent)") == \
            ["memory holds 2 turns"]
        assert page.evaluate("messages.length") == 4
        # regenerate the second reply: the page sends its list, the session is replayed to match it
        for command in ("/temperature 0", "/maxtokens 8"):
            page.type_and_send(command)
        second_reply = rows[-1]["text"]
        page.evaluate("document.querySelectorAll('.msg.assistant .body')[1].click()")
        page.wait_for("document.querySelectorAll('.msg.assistant .wc').length === 2 && !generating")
        assert kept.replies == 3 and server.sessions.open[session_id].session is kept
        assert page.evaluate(ROWS_JS)[-1]["text"] == second_reply == kept.messages[-1]["content"]
        assert spoken(kept.messages) == [user(long_question.strip()), kept.messages[1], user(SECOND),
                                         assistant(second_reply)]

# -----------------------------------------------------------------------------
# The script itself, in its own process


def start_script_server(base_dir, *args):
    """python -m scripts.chat_web as a real process on a free port -> (process, url), once /health says ready."""
    port = free_port()
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", *args, "--host", "127.0.0.1", "-p", str(port)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return httpx.get(url + "/health", timeout=2).json()["ready"]
        except httpx.HTTPError:
            return False
    try:
        assert wait_until(up, timeout_s=300), "server did not come up"
    except BaseException:
        proc.kill()
        raise
    return proc, url


@pytest.mark.slow
def test_chat_web_script_serves(fixture_base_dir):
    proc, url = start_script_server(fixture_base_dir, "-i", "base", "-g", "d2", "--device-type", "cpu")
    try:
        with httpx.stream("POST", url + "/chat/completions", json={"messages": [user("Hi")], "max_tokens": 8}, timeout=60) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == {"done": True} and any("token" in e for e in events)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_chat_web_script_runs_a_config_and_keeps_sessions(fixture_base_dir, tmp_path):
    config = tmp_path / "web.yaml"
    config.write_text("variant: vanilla\nsource: base\nmodel_tag: d2\ndevice_type: cpu\ntemperature: 0.0\nmax_tokens: 8\n")
    proc, url = start_script_server(fixture_base_dir, "--config", str(config), "--session-idle-s", "600",
                                    "--max-sessions", "4")
    try:
        health = httpx.get(url + "/health", timeout=10).json()
        assert health["model"]["source"] == "base" and health["defaults"]["temperature"] == 0.0  # from the file
        assert health["variant"] == "vanilla" and health["sessions"] == {"open": 0, "max": 4, "idle_s": 600.0}
        session_id = httpx.post(url + "/sessions", timeout=10).json()["session_id"]
        replies = []
        for text in (FIRST, SECOND):
            with httpx.stream("POST", url + "/chat/completions", json={"messages": [user(text)], "session_id": session_id},
                              timeout=60) as r:
                events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
            assert events[-1] == {"done": True} and "composition" in events[-2]
            replies.append(reply_of(events))
        messages = httpx.get(f"{url}/sessions/{session_id}", timeout=10).json()["messages"]
        assert spoken(messages) == [user(FIRST), assistant(replies[0]), user(SECOND), assistant(replies[1])]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # SIGTERM: uvicorn shuts down gracefully (then re-raises the signal), closing the open session
    log = proc.stderr.read()
    assert f"closing session {session_id} (the server is shutting down)" in log and "Application shutdown complete" in log
