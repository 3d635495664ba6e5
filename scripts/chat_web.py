"""
Web chat: one FastAPI server for both the chat page and a streaming completion API, with
conversations (sessions) that the server keeps between requests.

    python -m scripts.chat_web                      # one GPU (or the CPU), port 8000
    python -m scripts.chat_web --num-gpus 4         # four model replicas, one per GPU
    python -m scripts.chat_web -i base -g d2 --device-type cpu --host 127.0.0.1 -p 8080
    python -m scripts.chat_web --config configs/megacontext_demo.yaml   # a chat config: its variant too

Then open the printed URL (on a cloud box: its public IP, or bind --host 127.0.0.1 and
tunnel). Requests are spread over a pool of workers, one model replica per GPU (-n 0 =
every visible GPU); on CPU/MPS there is one worker. A request waits until a worker is free.

Settings. Without --config: the flags below (vanilla chat, as upstream). With --config FILE.yaml
(the chat config files `python -m nanochat.chat --config` reads): nanochat.chat.DEFAULTS, then the
file, then the flags given on the command line, so an explicit flag wins over the file and the
file wins over a flag's default. The file's `variant: NAME` and its section choose the session
(a variant with chat_session() runs the chat its own way, e.g. megacontext's memory chat). Its
`seed` and `prompt` keys are for the terminal: here every reply samples with a fresh seed.

Endpoints:
  GET    /                  the chat page (nanochat/ui.html)
  POST   /chat/completions  {"messages": [{"role": "user"|"assistant", "content": str}, ...],
                             "session_id"?, "temperature"?, "top_k"?, "max_tokens"?} -> server-sent events:
                             data: {"token": str, "gpu": int}  ...  data: {"composition": {...}}
                             then  data: {"done": true}
                             (also {"notice": str} when old turns had to be dropped, and
                             {"error": str} if generation fails midway; a command's answer is one
                             {"token": str, "gpu": int, "command": true} and no composition)
  POST   /sessions          -> {"session_id": str}: a new conversation's id
  GET    /sessions/{id}     -> {"session_id", "messages", "composition"?}: the conversation as the
                             page shows it (assistant messages carry their reply's "composition",
                             command exchanges "command": true), for a reloaded page
  DELETE /sessions/{id}     close the session now -> {"session_id", "closed": true}
  GET    /health            readiness, worker availability, the model, variant and default settings
  GET    /stats             per-worker device, request and session counts

The composition event says what the reply was decoded over (the Working Context):
{"history_tokens": tokens in memory, "budget_tokens": W or null, "runs": [{"level": 0|1|2,
"entries": int, "covers": tokens}, ...] oldest first}: a session's own composition() when it has
one (MegaContext: LOD0 tokens and LOD1/LOD2 gists); for a plain session, one LOD0 run covering the
prompt it decoded from (history_tokens = that prompt, budget_tokens = the context minus the reply).

Sessions. Without "session_id" a request is upstream's: a fresh session gets the whole message list
and is dropped (closed, if it has close()) after its reply. With one, the server keeps the session:
  - ids: 1-64 letters, digits, '-' and '_', starting with a letter or digit (a variant may name a
    directory after it); anything else is a 400. POST /sessions makes one; a client may pick its own.
  - an unknown id: the session is built (chat.build_session(..., session_id=id)), the request's
    earlier messages (all but the last) are replayed into it when there are any, the last user
    message is added and answered. A variant that keeps its memory on disk (by id) thus continues
    it after a restart when the request sends only the new message.
  - a known id: the server keeps a transcript of each session, every message it received and wrote
    (the session's own `messages` can be shorter: the context policy drops old turns from it). A
    request whose earlier messages are none, or equal (roles and texts) to the transcript without its
    command exchanges, only adds its last user message. Any other earlier messages (an edited or
    regenerated turn) disagree: the session is reset() and load_messages(earlier), and the transcript
    becomes those messages. So a client may send only the new message; to start over it DELETEs
    the session or uses a new id (a one-message request continues, it never resets). A reply cut
    short (the client left) stays in the session as far as it got; one that never started makes
    the next request replay the transcript first.
  - a session is bound to the worker whose engine built it; its requests wait for that worker, and
    one request at a time uses it. A kept plain session takes each request's temperature, top_k and
    max_tokens; a variant's session keeps the settings it was built with.
  - commands: when the session has command(text) and it returns a string, that string is the reply
    and the model is not asked (megacontext: /memory, /forget); the exchange stays in the transcript,
    marked "command", but is never replayed into a session.
  - lifecycle: a session unused for --session-idle-s (1800) is closed (close() if it has one) and
    dropped; past --max-sessions (64) open sessions, opening another closes the least recently used
    one that no request is using (503 if every one is in use); DELETE closes one at once (409 while a
    request uses it); server shutdown closes them all. A closed id is unknown again: its next request
    opens it afresh.

Limits, answered with 4xx and {"detail": "<one line>"} (upstream's numbers):
  at most 500 messages, 8000 characters per message, 32000 characters in all;
  temperature 0.0-2.0, top_k 0-200 (0 = whole vocabulary), max_tokens 1-4096;
  request body at most 1 MB (413); body not UTF-8, not JSON, nested too deeply or not the
  shape above (400); past --max-queue (32) requests waiting for a worker, 503 with
  Retry-After (ours: upstream queues without bound);
  roles alternate user, assistant, ... and the last message is the user's (400);
  the last message must fit the model's context (400; older turns are dropped instead,
  by the policy in nanochat/chat.py); a bad session id (400), an unknown one on GET/DELETE (404).

This file owns the HTTP side: requests, workers, which session answers, and when a session is
closed. It never decides what the model reads (nanochat/chat.py and the variant's session do).
"""

import os
import re
import sys
import json
import time
import random
import secrets
import asyncio
import logging
import argparse
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from contextlib import asynccontextmanager
from typing import List, Optional

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask

from nanochat import chat, hooks
from nanochat.common import compute_init, autodetect_device_type
from nanochat.checkpoint_manager import load_model
from nanochat.engine import Engine

# Abuse limits (upstream's values)
MAX_MESSAGES_PER_REQUEST = 500
MAX_MESSAGE_LENGTH = 8000
MAX_TOTAL_CONVERSATION_LENGTH = 32000
MIN_TEMPERATURE = 0.0
MAX_TEMPERATURE = 2.0
MIN_TOP_K = 0  # 0 turns top-k filtering off
MAX_TOP_K = 200
MIN_MAX_TOKENS = 1
MAX_MAX_TOKENS = 4096
# 32000 characters of content can grow ~6x as JSON escapes (\uXXXX), plus keys and quotes
MAX_REQUEST_BYTES = 1_000_000
# ours: requests allowed to wait for a busy worker before new ones get 503 + Retry-After
DEFAULT_MAX_QUEUE = 32
RETRY_AFTER_SECONDS = 5
# ours: sessions
DEFAULT_SESSION_IDLE_S = 1800.0
DEFAULT_MAX_SESSIONS = 64
# a variant may use the id as a directory name: no dots, slashes or spaces, no leading '-'
SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# the chat config keys that are also flags here (same names); base_dir is read too
CONFIG_FLAG_KEYS = ("source", "model_tag", "step", "temperature", "top_k", "max_tokens", "device_type")

UI_PATH = os.path.join(os.path.dirname(os.path.abspath(chat.__file__)), "ui.html")

logger = logging.getLogger("nanochat.chat_web")


def build_parser():
    parser = argparse.ArgumentParser(description="NanoChat Web Server")
    parser.add_argument("-n", "--num-gpus", type=int, default=1, help="Number of GPUs to use (default: 1; 0 = all visible GPUs)")
    parser.add_argument("-i", "--source", type=str, default="sft", help="Source of the model: sft|rl")
    parser.add_argument("-t", "--temperature", type=float, default=0.8, help="Default temperature for generation")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="Default top-k sampling parameter")
    parser.add_argument("-m", "--max-tokens", type=int, default=512, help="Default max tokens for generation")
    parser.add_argument("-g", "--model-tag", type=str, default=None, help="Model tag to load")
    parser.add_argument("-s", "--step", type=int, default=None, help="Step to load")
    parser.add_argument("-p", "--port", type=int, default=8000, help="Port to run the server on")
    parser.add_argument("--device-type", type=str, default="", choices=["cuda", "cpu", "mps"], help="Device type for evaluation: cuda|cpu|mps. empty => autodetect")
    parser.add_argument("--host", type=str, default="0.0.0.0", help="Host to bind the server to")
    parser.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help=f"requests that may wait for a busy worker; more get 503 with Retry-After (default: {DEFAULT_MAX_QUEUE})")
    # ours: the chat config and the sessions
    parser.add_argument("--config", type=str, default=None, metavar="FILE.yaml",
                        help="a chat config (as python -m nanochat.chat --config reads: settings, `variant: NAME` and its "
                             "section); its settings replace the defaults of -i -g -s -t -k -m --device-type, a flag given "
                             "on the command line still wins; without it: vanilla chat")
    parser.add_argument("--session-idle-s", type=float, default=DEFAULT_SESSION_IDLE_S, metavar="SECONDS",
                        help=f"a session no request used for this long is closed and dropped (default: {DEFAULT_SESSION_IDLE_S:g})")
    parser.add_argument("--max-sessions", type=int, default=DEFAULT_MAX_SESSIONS,
                        help=f"most sessions kept open; opening one more closes the least recently used idle one "
                             f"(default: {DEFAULT_MAX_SESSIONS})")
    return parser

# -----------------------------------------------------------------------------
# Workers: one model replica per device


@dataclass
class Worker:
    gpu_id: int
    device: torch.device
    engine: Engine
    tokenizer: object
    # generation steps run in threads; a step of a request whose client went away may still
    # be running when the worker is handed to the next request, so steps take this lock
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests_served: int = 0
    busy: bool = False  # handed to a request (changed only in the server's event loop)


class WorkerPool:
    """The model replicas, and which of them are free. A request takes any free worker, or one
    given worker (a session's requests run on the worker whose engine built the session)."""

    def __init__(self, device_type, num_gpus=1):
        if device_type == "cuda":
            visible = torch.cuda.device_count()
            num_gpus = visible if num_gpus == 0 else num_gpus
            if not 1 <= num_gpus <= visible:
                raise ValueError(f"--num-gpus {num_gpus} asked for, but {visible} CUDA GPU(s) are visible")
        else:
            if num_gpus not in (0, 1):
                raise ValueError(f"only CUDA runs several workers; with --device-type {device_type} use --num-gpus 1")
            num_gpus = 1
        self.device_type = device_type
        self.num_gpus = num_gpus
        self.workers: List[Worker] = []
        self.meta = {}
        self.started = False  # set in the server's event loop (lifespan)
        self.waiting = 0  # requests waiting for a worker right now
        self.max_waiting = DEFAULT_MAX_QUEUE  # past this many waiting, new requests get a 503
        self._wakeups = []  # futures of the waiting requests, woken (in order) when a worker comes back

    def load(self, source, model_tag=None, step=None):
        """Load a replica on each device (blocking; done before the server starts)."""
        for gpu_id in range(self.num_gpus):
            device = torch.device("cuda", gpu_id) if self.device_type == "cuda" else torch.device(self.device_type)
            print(f"Loading model on {device}...", file=sys.stderr)
            model, tokenizer, meta = load_model(source, device, phase="eval", model_tag=model_tag, step=step)
            self.workers.append(Worker(gpu_id=gpu_id, device=device, engine=Engine(model, tokenizer), tokenizer=tokenizer))
            self.meta = meta
        print(f"All {self.num_gpus} worker(s) ready", file=sys.stderr)

    def start(self):
        for worker in self.workers:
            worker.busy = False
        self._wakeups = []
        self.started = True

    def _free_worker(self, wanted=None):
        for worker in (self.workers if wanted is None else [wanted]):
            if not worker.busy:
                return worker
        return None

    def queue_is_full(self, wanted=None):
        return self._free_worker(wanted) is None and self.waiting >= self.max_waiting

    async def acquire(self, wanted=None) -> Worker:
        """A free worker, or `wanted` once it is free."""
        self.waiting += 1
        try:
            while (worker := self._free_worker(wanted)) is None:
                wakeup = asyncio.get_running_loop().create_future()
                self._wakeups.append(wakeup)
                try:
                    await wakeup
                finally:
                    if wakeup in self._wakeups:
                        self._wakeups.remove(wakeup)
            worker.busy = True
            return worker
        finally:
            self.waiting -= 1

    def release(self, worker: Worker):
        # no await: this runs in `finally` blocks of cancelled streams, where awaiting is not possible.
        # Every waiter wakes, oldest first; the first that can use the worker takes it, the rest wait on.
        worker.busy = False
        wakeups, self._wakeups = self._wakeups, []
        for wakeup in wakeups:
            if not wakeup.done():
                wakeup.set_result(None)

    def free_count(self):
        return sum(not worker.busy for worker in self.workers) if self.started else 0

# -----------------------------------------------------------------------------
# Sessions: the conversations kept between requests


@dataclass
class OpenSession:
    """One conversation. session_id None: a request without one (its session is closed after the reply)."""
    session_id: Optional[str]
    session: object = None              # built by its first chat request (POST /sessions only names it)
    worker: Optional[Worker] = None     # the worker whose engine built it; its requests wait for this one
    transcript: list = field(default_factory=list)  # every message as the page shows it (module docstring)
    stale: bool = False                 # a reply never started, so the session holds an unanswered user turn
    users: int = 0                      # requests using or waiting for it: only an unused session is closed
    last_used_s: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one request at a time


class SessionStore:
    """The open sessions by id, least recently used first; the idle timeout and the cap."""

    def __init__(self, idle_s=DEFAULT_SESSION_IDLE_S, max_sessions=DEFAULT_MAX_SESSIONS):
        self.idle_s = idle_s
        self.max_sessions = max_sessions
        self.open = OrderedDict()  # id -> OpenSession

    def get(self, session_id):
        entry = self.open.get(session_id)
        if entry is not None:
            self.touch(entry)
        return entry

    def touch(self, entry):
        entry.last_used_s = time.monotonic()
        if entry.session_id in self.open:
            self.open.move_to_end(entry.session_id)

    def add(self, session_id):
        """A new entry for session_id; returns (entry, evicted): past max_sessions the least recently
        used entry no request is using is taken out to make room (the caller closes it)."""
        evicted = None
        if len(self.open) >= self.max_sessions:
            evicted = next((e for e in self.open.values() if e.users == 0), None)
            if evicted is None:
                raise HTTPException(status_code=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                                    detail=f"all {self.max_sessions} open sessions (--max-sessions) are answering "
                                           f"requests; retry in {RETRY_AFTER_SECONDS} s")
            del self.open[evicted.session_id]
            logger.info(f"closing session {evicted.session_id}, the least recently used, to open {session_id} "
                        f"(--max-sessions {self.max_sessions})")
        entry = OpenSession(session_id)
        self.open[session_id] = entry
        return entry, evicted

    def take_idle(self):
        """Take out the entries unused for idle_s or longer."""
        now = time.monotonic()
        idle = [e for e in self.open.values() if e.users == 0 and now - e.last_used_s >= self.idle_s]
        for entry in idle:
            del self.open[entry.session_id]
        return idle

    def take_all(self):
        entries = list(self.open.values())
        self.open.clear()
        return entries


def check_session_id(session_id):
    if not isinstance(session_id, str) or not SESSION_ID_PATTERN.fullmatch(session_id):
        shown = repr(session_id if len(str(session_id)) <= 70 else str(session_id)[:67] + "...")
        raise bad_request(f"session_id {shown} is not valid: use 1-64 letters, digits, '-' or '_', starting with a "
                          f"letter or digit (POST /sessions makes one)")


def spoken(transcript):
    """The transcript as a conversation: no command exchanges, only roles and texts."""
    return [{"role": m["role"], "content": m["content"]} for m in transcript if not m.get("command")]


def close_session(entry, why):
    """Close a session taken out of the store (blocking: run it in a thread)."""
    close = getattr(entry.session, "close", None)
    if entry.session_id is not None:
        logger.info(f"closing session {entry.session_id} ({why})")
    if close is None:
        return
    try:
        with entry.worker.lock:  # a variant's close may still run the model (its memory's last tokens)
            close()
    except Exception:
        logger.exception(f"closing session {entry.session_id} failed")


def plain_composition(session, prompt_tokens):
    """A plain session's Working Context: the whole prompt, one run of LOD0 tokens."""
    return {"history_tokens": prompt_tokens, "budget_tokens": session.sequence_len - session.reply_budget,
            "runs": [{"level": 0, "entries": prompt_tokens, "covers": prompt_tokens}]}

# -----------------------------------------------------------------------------
# Requests


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    messages: List[ChatMessage]
    temperature: Optional[float] = None
    max_tokens: Optional[int] = None
    top_k: Optional[int] = None
    session_id: Optional[str] = None


def bad_request(message, status_code=400):
    return HTTPException(status_code=status_code, detail=message)


async def read_chat_request(request: Request) -> ChatRequest:
    """Read and parse the body ourselves, so every way it can be wrong gets a one-line 4xx."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_REQUEST_BYTES:
        raise bad_request(f"request body is {int(declared)} bytes; at most {MAX_REQUEST_BYTES} are accepted", 413)
    body, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_REQUEST_BYTES:
            raise bad_request(f"request body is over {MAX_REQUEST_BYTES} bytes, the most accepted", 413)
        body.append(chunk)
    body = b"".join(body)
    if not body.strip():
        raise bad_request('request body is empty; send JSON like {"messages": [{"role": "user", "content": "Hi"}]}')
    # decode ourselves: json.loads would guess UTF-16/32 from the bytes, or call them bad JSON
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"request body is not UTF-8 text (byte 0x{body[e.start]:02X} at offset {e.start}); "
                          f"send the JSON encoded as UTF-8")
    if "\x00" in text:
        raise bad_request("request body is not UTF-8 text (it has NUL bytes, as UTF-16 or UTF-32 would); "
                          "send the JSON encoded as UTF-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad_request(f"request body is not valid JSON: {e}")
    except RecursionError:
        raise bad_request("request body nests JSON too deeply; a chat request is an object with a list of messages")
    try:
        return ChatRequest.model_validate(data)
    except RecursionError:
        raise bad_request("request body nests JSON too deeply; a chat request is an object with a list of messages")
    except ValidationError as e:
        errors = e.errors()
        first = errors[0]
        where = ".".join(str(part) for part in first["loc"]) or "request body"
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise bad_request(f"invalid request: {where}: {first['msg']}{more}")


def validate_chat_request(request: ChatRequest):
    """The abuse limits and the shape of the conversation; raises a 400 naming the problem."""
    if len(request.messages) == 0:
        raise bad_request("At least one message is required")
    if len(request.messages) > MAX_MESSAGES_PER_REQUEST:
        raise bad_request(f"Too many messages: {len(request.messages)}. Maximum {MAX_MESSAGES_PER_REQUEST} messages allowed per request")
    total_length = 0
    for i, message in enumerate(request.messages):
        if message.role not in ("user", "assistant"):
            raise bad_request(f"Message {i} has invalid role {message.role!r}. Must be 'user' or 'assistant'")
        if message.role == "user" and not message.content.strip():
            raise bad_request(f"Message {i} has empty content")
        if len(message.content) > MAX_MESSAGE_LENGTH:
            raise bad_request(f"Message {i} is too long ({len(message.content)} characters). Maximum {MAX_MESSAGE_LENGTH} characters allowed per message")
        total_length += len(message.content)
    if total_length > MAX_TOTAL_CONVERSATION_LENGTH:
        raise bad_request(f"Total conversation is too long ({total_length} characters). Maximum {MAX_TOTAL_CONVERSATION_LENGTH} characters allowed")
    for i, message in enumerate(request.messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            raise bad_request(f"Message {i} is from {message.role!r} but should be from {expected!r}: "
                              f"roles alternate user, assistant, user, ...")
    if request.messages[-1].role != "user":
        raise bad_request("The last message must be from the user (the server writes the assistant's reply)")
    if request.temperature is not None and not MIN_TEMPERATURE <= request.temperature <= MAX_TEMPERATURE:
        raise bad_request(f"Temperature must be between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}, got {request.temperature}")
    if request.top_k is not None and not MIN_TOP_K <= request.top_k <= MAX_TOP_K:
        raise bad_request(f"top_k must be between {MIN_TOP_K} and {MAX_TOP_K}, got {request.top_k}")
    if request.max_tokens is not None and not MIN_MAX_TOKENS <= request.max_tokens <= MAX_MAX_TOKENS:
        raise bad_request(f"max_tokens must be between {MIN_MAX_TOKENS} and {MAX_MAX_TOKENS}, got {request.max_tokens}")


def sse(payload):
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _next_piece(worker, pieces):
    """One generation step, run in a worker thread (None when the reply is over)."""
    with worker.lock:
        return next(pieces, None)

# -----------------------------------------------------------------------------
# One turn of a conversation: bring the session up to date, answer, settle


@dataclass
class Turn:
    text: str                           # the new user message
    answer: Optional[str] = None        # a command's answer: the model is not asked
    notice: Optional[str] = None        # the context policy's one-line notice
    pieces: object = None               # the reply's text pieces (session.stream_reply())
    prompt_tokens: Optional[int] = None  # a plain session's prompt length, for its composition
    reply: list = field(default_factory=list)  # pieces sent to the client so far
    reply_text: Optional[str] = None    # the reply as the session keeps it
    composition: Optional[dict] = None
    cleanup_started: bool = False
    done: bool = False


def prepare_turn(entry, worker, config, earlier, text, variant):
    """
    In a worker thread, under its lock: build the session or bring it up to date with `earlier`
    (the rule of the module docstring), then let it answer a command, or add the user message
    and open its reply. Raises ValueError for a message that can never fit.
    """
    with worker.lock:
        if entry.session is None:
            session = chat.build_session(worker.engine, config, variant, session_id=entry.session_id)
            entry.session, entry.worker = session, worker
            if earlier or entry.session_id is None:
                session.load_messages(earlier)
            entry.transcript = [dict(m) for m in earlier]
        else:
            session = entry.session
            if isinstance(session, chat.ChatSession):  # a kept plain session takes this request's settings
                for key in ("temperature", "top_k", "max_tokens", "seed"):
                    setattr(session, key, config[key])
            if entry.stale or (earlier and earlier != spoken(entry.transcript)):
                replay = earlier or spoken(entry.transcript)
                session.reset()
                session.load_messages(replay)
                entry.transcript = [dict(m) for m in replay]
                entry.stale = False
        command = getattr(session, "command", None)  # a variant's session answers its own commands
        answer = command(text) if command is not None else None
        if answer is not None:
            return Turn(text, answer=str(answer))
        turn = Turn(text, notice=session.add_user_message(text))
        if not hasattr(session, "composition") and hasattr(session, "render_prompt"):
            turn.prompt_tokens = len(session.render_prompt())
        turn.pieces = iter(session.stream_reply())
        return turn


def settle(entry, worker, turn, finished):
    """
    In a worker thread, under its lock, once the stream ended (finished, cut short or failed):
    the reply's iterator is closed (a reply cut short still joins the session), the composition
    is read, and a one-request session is closed. Never raises.
    """
    with worker.lock:
        session = entry.session
        try:
            if turn.answer is None:
                close_pieces = getattr(turn.pieces, "close", None)
                if close_pieces is not None:
                    close_pieces()
                messages = session.messages
                if messages and messages[-1]["role"] == "user":
                    entry.stale = True  # the reply never started: the next request replays the conversation
                turn.reply_text = messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" \
                    else "".join(turn.reply)
                if finished and hasattr(session, "composition"):
                    turn.composition = session.composition()
                elif finished and turn.prompt_tokens is not None:
                    turn.composition = plain_composition(session, turn.prompt_tokens)
        except Exception:
            logger.exception("settling the reply failed")
        if entry.session_id is None and hasattr(session, "close"):
            try:
                session.close()
            except Exception:
                logger.exception("closing the session failed")

# -----------------------------------------------------------------------------
# The app


def create_app(args, pool, variant=None):
    """The FastAPI app over a loaded WorkerPool. `args` are this script's flags (the defaults);
    `variant` (from --config) builds the sessions; None = vanilla."""
    with open(UI_PATH, encoding="utf-8") as f:
        ui_html = f.read()
    defaults = dict(chat.DEFAULTS, source=args.source, model_tag=args.model_tag, step=args.step,
                    temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens,
                    device_type=args.device_type)
    pool.max_waiting = getattr(args, "max_queue", DEFAULT_MAX_QUEUE)
    sessions = SessionStore(getattr(args, "session_idle_s", DEFAULT_SESSION_IDLE_S),
                            getattr(args, "max_sessions", DEFAULT_MAX_SESSIONS))
    variant_name = getattr(variant, "name", type(variant).__name__) if variant is not None else "vanilla"

    async def close_idle_sessions():
        every_s = min(30.0, max(0.05, sessions.idle_s / 4))
        while True:
            await asyncio.sleep(every_s)
            for entry in sessions.take_idle():
                await asyncio.to_thread(close_session, entry, f"unused for {sessions.idle_s:g} s, --session-idle-s")

    @asynccontextmanager
    async def lifespan(app):
        pool.start()
        sweeper = asyncio.create_task(close_idle_sessions())
        try:
            yield
        finally:
            sweeper.cancel()
            for entry in sessions.take_all():
                await asyncio.to_thread(close_session, entry, "the server is shutting down")

    app = FastAPI(lifespan=lifespan)
    app.state.sessions = sessions  # for tests and for whoever embeds the app
    # the page is served from here, but let other origins use the API too (as upstream did)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])

    @app.exception_handler(Exception)
    async def unexpected_error(request, exc):
        # the traceback goes to the server log; the client gets one line, never the traceback
        logger.exception("unexpected error while handling %s %s", request.method, request.url.path)
        return JSONResponse(status_code=500, content={"detail": f"internal server error ({type(exc).__name__})"})

    @app.get("/")
    async def root():
        return HTMLResponse(ui_html)

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    async def close_evicted(evicted):
        if evicted is not None:
            await asyncio.to_thread(close_session, evicted, f"least recently used, --max-sessions {sessions.max_sessions}")

    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        chat_request = await read_chat_request(request)
        validate_chat_request(chat_request)
        if chat_request.session_id is not None:
            check_session_id(chat_request.session_id)
        messages = [m.model_dump() for m in chat_request.messages]
        for message in messages:
            logger.info(f"[{message['role'].upper()}]: {message['content']}")
        config = dict(defaults, seed=random.randint(0, 2**31 - 1))
        for key in ("temperature", "top_k", "max_tokens"):
            if getattr(chat_request, key) is not None:
                config[key] = getattr(chat_request, key)

        opened, evicted = False, None  # opened: if this request fails before a session is built, the id is dropped again
        if chat_request.session_id is None:
            entry = OpenSession(None)  # upstream's request: a session of its own, closed after the reply
        else:
            entry = sessions.get(chat_request.session_id)
            if entry is None:
                entry, evicted = sessions.add(chat_request.session_id)
                opened = True
        entry.users += 1  # before any await: from here on nothing closes this entry
        locked, worker = False, None
        try:
            await close_evicted(evicted)
            await entry.lock.acquire()
            locked = True
            if pool.queue_is_full(entry.worker):
                # a bounded queue: past it, waiting only grows latency for everyone
                raise HTTPException(status_code=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                                    detail=f"server busy: {pool.waiting} request(s) already wait for a worker "
                                           f"(--max-queue {pool.max_waiting}); retry in {RETRY_AFTER_SECONDS} s")
            worker = await pool.acquire(entry.worker)
            turn = await asyncio.to_thread(prepare_turn, entry, worker, config, messages[:-1],
                                           messages[-1]["content"], variant)
        except BaseException as e:
            if entry.session_id is None and entry.session is not None:
                threading.Thread(target=close_session, args=(entry, "its request failed"), daemon=True).start()
            if worker is not None:
                pool.release(worker)
            if locked:
                entry.lock.release()
            entry.users -= 1
            sessions.touch(entry)
            if opened and entry.session is None and entry.users == 0 and sessions.open.get(entry.session_id) is entry:
                del sessions.open[entry.session_id]
            if isinstance(e, ValueError):  # e.g. the last message cannot fit the model's context
                raise bad_request(str(e)) from None
            raise
        worker.requests_served += 1
        loop = asyncio.get_running_loop()
        turn_done = asyncio.Event()

        def finish():
            """On the event loop, once: the exchange joins the transcript; worker and session are free."""
            if turn.done:
                return
            turn.done = True
            if turn.answer is not None:
                entry.transcript += [{"role": "user", "content": turn.text, "command": True},
                                     {"role": "assistant", "content": turn.answer, "command": True}]
            else:
                reply = {"role": "assistant", "content": "".join(turn.reply) if turn.reply_text is None else turn.reply_text}
                if turn.composition is not None:
                    reply["composition"] = turn.composition
                entry.transcript += [{"role": "user", "content": turn.text}, reply]
            logger.info(f"[ASSISTANT] (GPU {worker.gpu_id}): {entry.transcript[-1]['content']}")
            pool.release(worker)
            entry.users -= 1
            entry.lock.release()
            sessions.touch(entry)
            turn_done.set()

        def settle_then_finish(finished):
            try:
                settle(entry, worker, turn, finished)
            finally:
                try:
                    loop.call_soon_threadsafe(finish)
                except RuntimeError:  # the event loop is gone: the server is shutting down
                    pass

        def clean_up(finished):
            # no await: a stream whose client left is cancelled, and a cancelled stream cannot await
            # in `finally`; settling waits for the worker's lock (a step may still be running), so a thread
            if not turn.cleanup_started:
                turn.cleanup_started = True
                threading.Thread(target=settle_then_finish, args=(finished,), daemon=True).start()

        async def events():
            try:
                if turn.answer is not None:
                    yield sse({"token": turn.answer, "gpu": worker.gpu_id, "command": True})
                else:
                    if turn.notice:
                        yield sse({"notice": turn.notice})
                    while True:
                        piece = await asyncio.to_thread(_next_piece, worker, turn.pieces)
                        if piece is None:
                            break
                        turn.reply.append(piece)
                        yield sse({"token": piece, "gpu": worker.gpu_id})
                clean_up(finished=True)
                await turn_done.wait()  # worker and session are free before the client hears "done"
                if turn.composition is not None:
                    yield sse({"composition": turn.composition})
            except Exception as e:
                logger.exception("generation failed")
                yield sse({"error": f"generation failed: {type(e).__name__}: {e}"})
            finally:
                clean_up(finished=False)
            yield sse({"done": True})

        async def clean_up_if_never_streamed():
            clean_up(finished=False)  # a client gone before the first byte: the stream never ran

        return StreamingResponse(events(), media_type="text/event-stream",
                                 background=BackgroundTask(clean_up_if_never_streamed))

    @app.post("/sessions")
    async def new_session():
        session_id = secrets.token_hex(8)
        while session_id in sessions.open:
            session_id = secrets.token_hex(8)
        _, evicted = sessions.add(session_id)
        await close_evicted(evicted)
        return {"session_id": session_id}

    def known_entry(session_id):
        check_session_id(session_id)
        entry = sessions.get(session_id)
        if entry is None:
            raise HTTPException(status_code=404, detail=f"no open session {session_id!r} (never opened, deleted, "
                                                        f"closed after --session-idle-s, or the server restarted); "
                                                        f"a chat request with this session_id opens it again")
        return entry

    @app.get("/sessions/{session_id}")
    async def get_session(session_id: str):
        entry = known_entry(session_id)
        body = {"session_id": session_id, "messages": [dict(m) for m in entry.transcript]}
        latest = next((m["composition"] for m in reversed(entry.transcript) if "composition" in m), None)
        if latest is not None:
            body["composition"] = latest
        return body

    @app.delete("/sessions/{session_id}")
    async def delete_session(session_id: str):
        entry = known_entry(session_id)
        if entry.users:
            raise HTTPException(status_code=409, detail=f"session {session_id!r} is answering a request; "
                                                        f"delete it when the reply is done")
        del sessions.open[session_id]
        await asyncio.to_thread(close_session, entry, "deleted")
        return {"session_id": session_id, "closed": True}

    @app.get("/health")
    async def health():
        model_config = pool.workers[0].engine.model.config if pool.workers else None
        # what a reply can really get: the chat policy caps it at half the context
        # (nanochat/chat.py), so a 256-token model never writes the 512 tokens of -m's default
        reply_cap = MAX_MAX_TOKENS if model_config is None else max(1, min(MAX_MAX_TOKENS, model_config.sequence_len // 2))
        return {
            "status": "ok",
            "ready": len(pool.workers) > 0 and pool.started,
            "num_gpus": pool.num_gpus if pool.device_type == "cuda" else 0,  # GPUs in use: none on CPU/MPS
            "num_workers": len(pool.workers),
            "available_workers": pool.free_count(),
            "model": {
                "source": args.source,
                "depth": model_config.n_layer if model_config else None,
                "step": pool.meta.get("step"),
                "sequence_len": model_config.sequence_len if model_config else None,
                "device": pool.device_type,
            },
            "variant": variant_name,
            "sessions": {"open": len(sessions.open), "max": sessions.max_sessions, "idle_s": sessions.idle_s},
            "defaults": {"temperature": args.temperature, "top_k": args.top_k,
                         "max_tokens": min(args.max_tokens, reply_cap)},
            "limits": {"temperature": [MIN_TEMPERATURE, MAX_TEMPERATURE], "top_k": [MIN_TOP_K, MAX_TOP_K],
                       "max_tokens": [MIN_MAX_TOKENS, reply_cap]},
        }

    @app.get("/stats")
    async def stats():
        free = pool.free_count()
        bound = [entry.worker for entry in sessions.open.values()]
        return {
            "total_workers": len(pool.workers),
            "available_workers": free,
            "busy_workers": len(pool.workers) - free,
            "open_sessions": len(sessions.open),
            "workers": [{"gpu_id": w.gpu_id, "device": str(w.device), "requests_served": w.requests_served,
                         "sessions": sum(b is w for b in bound)} for w in pool.workers],
        }

    return app

# -----------------------------------------------------------------------------
# Flags and the chat config


def flags_given(argv):
    """The flags (by dest) written on the command line, as opposed to left at their defaults."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS  # an absent flag then leaves no attribute
    return set(vars(probe.parse_args(argv)))


def apply_config(args, argv):
    """
    --config FILE.yaml: chat.DEFAULTS <- the file (read by hooks.load_run_config, as nanochat.chat
    does) <- the flags given in argv, written into args. Returns (variant, base_dir): the file's
    variant (vanilla without --config) and its base_dir (None when it names none).
    """
    if args.config is None:
        return hooks.get_variant("vanilla"), None
    settings, variant_name, variant_config = hooks.load_run_config(args.config, {}, chat.DEFAULTS)
    settings = chat.validate_settings(settings)
    given = flags_given(argv)
    for key in CONFIG_FLAG_KEYS:
        if key not in given:
            setattr(args, key, settings[key])
    return hooks.get_variant(variant_name, variant_config), settings["base_dir"]


def check_args(args):
    """Flag values the server cannot work with, as a one-line ValueError."""
    chat.validate_settings(dict(chat.DEFAULTS, source=args.source, step=args.step, temperature=args.temperature,
                                top_k=args.top_k, max_tokens=args.max_tokens, device_type=args.device_type))
    if not MIN_TEMPERATURE <= args.temperature <= MAX_TEMPERATURE:
        raise ValueError(f"--temperature must be between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}")
    if not MIN_TOP_K <= args.top_k <= MAX_TOP_K:
        raise ValueError(f"--top-k must be between {MIN_TOP_K} and {MAX_TOP_K}")
    if not MIN_MAX_TOKENS <= args.max_tokens <= MAX_MAX_TOKENS:
        raise ValueError(f"--max-tokens must be between {MIN_MAX_TOKENS} and {MAX_MAX_TOKENS}")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be 0 or more (requests allowed to wait), got {args.max_queue}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    if not args.session_idle_s > 0:
        raise ValueError(f"--session-idle-s must be more than 0 seconds, got {args.session_idle_s:g}")
    if args.max_sessions < 1:
        raise ValueError(f"--max-sessions must be 1 or more, got {args.max_sessions}")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        variant, base_dir = apply_config(args, argv)
        check_args(args)
        if base_dir and not os.environ.get("NANOCHAT_BASE_DIR"):
            # as nanochat.chat: a config may say where its model lives; the environment variable wins
            os.environ["NANOCHAT_BASE_DIR"] = os.path.expanduser(base_dir)
        device_type = autodetect_device_type() if args.device_type == "" else args.device_type
        compute_init(device_type)
        pool = WorkerPool(device_type, args.num_gpus)
        pool.load(args.source, model_tag=args.model_tag, step=args.step)
        app = create_app(args, pool, variant)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

    import uvicorn
    print("Starting NanoChat Web Server", file=sys.stderr)
    context = pool.workers[0].engine.model.config.sequence_len
    print(f"Temperature: {args.temperature}, Top-k: {args.top_k}, Max tokens: {min(args.max_tokens, max(1, context // 2))} "
          f"(a reply gets at most half of the {context}-token context), device: {pool.device_type}", file=sys.stderr)
    print(f"Variant: {getattr(variant, 'name', type(variant).__name__)}; sessions close after {args.session_idle_s:g} s "
          f"unused, at most {args.max_sessions} open", file=sys.stderr)
    print(f"Open http://{'localhost' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}/", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
