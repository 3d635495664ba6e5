"""
Web chat: one FastAPI server for both the chat page and a streaming completion API.

    python -m scripts.chat_web                      # one GPU (or the CPU), port 8000
    python -m scripts.chat_web --num-gpus 4         # four model replicas, one per GPU
    python -m scripts.chat_web -i base -g d2 --device-type cpu --host 127.0.0.1 -p 8080

Then open the printed URL (on a cloud box: its public IP, or bind --host 127.0.0.1 and
tunnel). Requests are spread over a pool of workers, one model replica per GPU (-n 0 =
every visible GPU); on CPU/MPS there is one worker. A request waits until a worker is free.

Endpoints:
  GET  /                   the chat page (nanochat/ui.html)
  POST /chat/completions   {"messages": [{"role": "user"|"assistant", "content": str}, ...],
                            "temperature"?, "top_k"?, "max_tokens"?} -> server-sent events:
                            data: {"token": str, "gpu": int}  ... then  data: {"done": true}
                            (also {"notice": str} when old turns had to be dropped, and
                            {"error": str} if generation fails midway)
  GET  /health             readiness, worker availability, the model and default settings
  GET  /stats              per-worker device and request counts

Limits, answered with 4xx and {"detail": "<one line>"} (upstream's numbers):
  at most 500 messages, 8000 characters per message, 32000 characters in all;
  temperature 0.0-2.0, top_k 0-200 (0 = whole vocabulary), max_tokens 1-4096;
  request body at most 1 MB (413); body not UTF-8, not JSON, nested too deeply or not the
  shape above (400); past --max-queue (32) requests waiting for a worker, 503 with
  Retry-After (ours: upstream queues without bound);
  roles alternate user, assistant, ... and the last message is the user's (400);
  the last message must fit the model's context (400; older turns are dropped instead,
  by the policy in nanochat/chat.py).
"""

import os
import sys
import json
import random
import asyncio
import logging
import argparse
import threading
from dataclasses import dataclass, field
from contextlib import asynccontextmanager
from typing import List, Optional

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

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


class WorkerPool:
    """The model replicas, and a queue of the ones that are free."""

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
        self.available = None  # an asyncio.Queue, made inside the server's event loop
        self.waiting = 0  # requests waiting for a worker right now
        self.max_waiting = DEFAULT_MAX_QUEUE  # past this many waiting, new requests get a 503

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
        self.available = asyncio.Queue()
        for worker in self.workers:
            self.available.put_nowait(worker)

    def queue_is_full(self):
        return self.free_count() == 0 and self.waiting >= self.max_waiting

    async def acquire(self) -> Worker:
        self.waiting += 1
        try:
            return await self.available.get()
        finally:
            self.waiting -= 1

    def release(self, worker: Worker):
        # no await: this runs in `finally` blocks of cancelled streams, where awaiting is not possible
        self.available.put_nowait(worker)

    def free_count(self):
        return self.available.qsize() if self.available is not None else 0

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
# The app


def create_app(args, pool, variant=None):
    """The FastAPI app over a loaded WorkerPool. `args` are this script's flags (the defaults)."""
    with open(UI_PATH, encoding="utf-8") as f:
        ui_html = f.read()
    defaults = dict(chat.DEFAULTS, source=args.source, model_tag=args.model_tag, step=args.step,
                    temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens,
                    device_type=args.device_type)
    pool.max_waiting = getattr(args, "max_queue", DEFAULT_MAX_QUEUE)

    @asynccontextmanager
    async def lifespan(app):
        pool.start()
        yield

    app = FastAPI(lifespan=lifespan)
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

    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        chat_request = await read_chat_request(request)
        validate_chat_request(chat_request)
        messages = [m.model_dump() for m in chat_request.messages]
        for message in messages:
            logger.info(f"[{message['role'].upper()}]: {message['content']}")

        if pool.queue_is_full():
            # a bounded queue: past it, waiting only grows latency for everyone
            raise HTTPException(status_code=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                                detail=f"server busy: {pool.waiting} request(s) already wait for a worker "
                                       f"(--max-queue {pool.max_waiting}); retry in {RETRY_AFTER_SECONDS} s")
        worker = await pool.acquire()
        try:
            config = dict(defaults, seed=random.randint(0, 2**31 - 1))
            for key in ("temperature", "top_k", "max_tokens"):
                if getattr(chat_request, key) is not None:
                    config[key] = getattr(chat_request, key)
            session = chat.build_session(worker.engine, config, variant)
            session.load_messages(messages[:-1])
            notice = session.add_user_message(messages[-1]["content"])
        except ValueError as e:  # e.g. the last message cannot fit the model's context
            pool.release(worker)
            raise bad_request(str(e))
        except BaseException:
            pool.release(worker)
            raise
        worker.requests_served += 1

        async def events():
            pieces = session.stream_reply()
            reply = []
            try:
                if notice:
                    yield sse({"notice": notice})
                while True:
                    piece = await asyncio.to_thread(_next_piece, worker, pieces)
                    if piece is None:
                        break
                    reply.append(piece)
                    yield sse({"token": piece, "gpu": worker.gpu_id})
            except Exception as e:
                logger.exception("generation failed")
                yield sse({"error": f"generation failed: {type(e).__name__}: {e}"})
            finally:
                logger.info(f"[ASSISTANT] (GPU {worker.gpu_id}): {''.join(reply)}")
                pool.release(worker)
            yield sse({"done": True})

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    async def health():
        model_config = pool.workers[0].engine.model.config if pool.workers else None
        # what a reply can really get: the chat policy caps it at half the context
        # (nanochat/chat.py), so a 256-token model never writes the 512 tokens of -m's default
        reply_cap = MAX_MAX_TOKENS if model_config is None else max(1, min(MAX_MAX_TOKENS, model_config.sequence_len // 2))
        return {
            "status": "ok",
            "ready": len(pool.workers) > 0 and pool.available is not None,
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
            "defaults": {"temperature": args.temperature, "top_k": args.top_k,
                         "max_tokens": min(args.max_tokens, reply_cap)},
            "limits": {"temperature": [MIN_TEMPERATURE, MAX_TEMPERATURE], "top_k": [MIN_TOP_K, MAX_TOP_K],
                       "max_tokens": [MIN_MAX_TOKENS, reply_cap]},
        }

    @app.get("/stats")
    async def stats():
        free = pool.free_count()
        return {
            "total_workers": len(pool.workers),
            "available_workers": free,
            "busy_workers": len(pool.workers) - free,
            "workers": [{"gpu_id": w.gpu_id, "device": str(w.device), "requests_served": w.requests_served}
                        for w in pool.workers],
        }

    return app


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


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        device_type = autodetect_device_type() if args.device_type == "" else args.device_type
        compute_init(device_type)
        pool = WorkerPool(device_type, args.num_gpus)
        pool.load(args.source, model_tag=args.model_tag, step=args.step)
        app = create_app(args, pool, hooks.get_variant("vanilla"))
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

    import uvicorn
    print("Starting NanoChat Web Server", file=sys.stderr)
    context = pool.workers[0].engine.model.config.sequence_len
    print(f"Temperature: {args.temperature}, Top-k: {args.top_k}, Max tokens: {min(args.max_tokens, max(1, context // 2))} "
          f"(a reply gets at most half of the {context}-token context), device: {pool.device_type}", file=sys.stderr)
    print(f"Open http://{'localhost' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}/", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
