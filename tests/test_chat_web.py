"""
Specification of scripts/chat_web.py: a real server on 127.0.0.1 (uvicorn in a background
thread, the fixture d2 model on CPU) answered over real HTTP. Streaming replies match the
engine's own generation, every limit and every malformed request gets a one-line 4xx, the
worker pool hands its worker back (also when a client walks away), and the page renders in
headless Chromium.

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
from types import SimpleNamespace

import httpx
import pytest
import uvicorn

from nanochat import chat
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


@pytest.fixture(scope="module")
def server(upstream_fixtures, tmp_path_factory):
    """The app over the fixture checkpoint, served by uvicorn on a free loopback port."""
    base = tmp_path_factory.mktemp("chat_web") / "base"
    shutil.copytree(upstream_fixtures, base)
    for p in base.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    saved_base_dir = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = str(base)
    port = free_port()
    args = chat_web.build_parser().parse_args(
        ["-i", "base", "-g", "d2", "--device-type", "cpu", "--host", "127.0.0.1", "-p", str(port)])
    pool = chat_web.WorkerPool("cpu", args.num_gpus)
    pool.load(args.source, model_tag=args.model_tag, step=args.step)
    app = chat_web.create_app(args, pool)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: uv.started), "uvicorn did not start"
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", pool=pool, engine=pool.workers[0].engine)
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        if saved_base_dir is None:
            os.environ.pop("NANOCHAT_BASE_DIR", None)
        else:
            os.environ["NANOCHAT_BASE_DIR"] = saved_base_dir


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

# -----------------------------------------------------------------------------
# The script itself, in its own process


@pytest.mark.slow
def test_chat_web_script_serves(fixture_base_dir):
    port = free_port()
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(fixture_base_dir), PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "-i", "base", "-g", "d2", "--device-type", "cpu",
                             "--host", "127.0.0.1", "-p", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return httpx.get(url + "/health", timeout=2).json()["ready"]
        except httpx.HTTPError:
            return False

    try:
        assert wait_until(up, timeout_s=300), "server did not come up"
        with httpx.stream("POST", url + "/chat/completions", json={"messages": [user("Hi")], "max_tokens": 8}, timeout=60) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == {"done": True} and any("token" in e for e in events)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
