"""
The MegaContext visualizer: watch the Working Context refocus (live or from a recorded run log)
and explore the tree under it, in one FastAPI app with one static page (megacontext/viz.html).

    python -m megacontext.viz --memory DIR                       # follow DIR's newest run log
    python -m megacontext.viz --memory DIR --run-log FILE.jsonl  # replay (or tail) one log
    python -m megacontext.viz --memory DIR --model-tag longctx_cpu   # + a gist's nearest tokens

Then open the printed URL. It binds 127.0.0.1 by default (--host 0.0.0.0 exposes it).

Sources. The stream replays a telemetry JSONL (megacontext/telemetry.py; the runtime and the
MegaContext training variants write them) from its first line and then keeps tailing it, so a
recorded run and a live one (`python -m megacontext.run --memory DIR ...` writing the file now)
are the same stream: a live run appears within one poll (0.2 s) of each refocus, and replaying
its file later gives the same messages. --run-log may be a file or a directory; a directory
(default: $MEGACONTEXT_ARTIFACT_ROOT/run_logs) streams its newest log whose start record names
this memory dir (waiting for one to appear) and moves on to each newer one that appears, or
streams the one log the client asks for (?log=NAME).

Endpoints:
  GET  /                               the page
  WS   /ws[?log=NAME]                  the stream, one JSON text message per item (below)
  GET  /api/stream[?log=NAME]          the same messages as server-sent events (data: {...}); the
                                       page uses these when uvicorn has no WebSocket library
  GET  /api/memory                     the tree: tokens, nodes per level, model, GistNet, ...
  GET  /api/runs                       the run logs a --run-log directory offers
  GET  /api/node/{level}/{index}       node metadata: span, parent, children, siblings
  GET  /api/node/{level}/{index}/text  the LOD0 text under the node, decoded with the tokenizer
  GET  /api/node/{level}/{index}/nearest?k=8   a gist's nearest token embeddings (cosine against
                                       the base model's token table; needs --model-tag)
Errors are JSON {"detail": "<one line>"}: 404 for a node the tree does not have, 501 for
nearest without a model, 503 when the tree cannot be read.

Messages, in order: {"type": "hello", memory}, then ({"type": "waiting"} while a directory has
no log yet) {"type": "open", run_log, follow}, then one message per whole line of the log, in file
order: "start" (run, config, wandb_url), "refocus" (frame number, the WC as telemetry.wc_layout
runs, scored_wc + scores when LensNet scored, actions [kind, level, index, score], figures:
swap rate, residency, budget utilization, latencies in ms, slots recomputed, LOD histogram),
"decode", "notice" (fallbacks, dropped history), "summary", "metrics" (any other record: its
numbers, e.g. a trainer's loss). "caught_up" when the stream first reaches the end of the file;
"end" at the log's end record: the stream closes, unless it follows a directory (follow: true),
where a newer run's log starts over with "open". A line that is not a JSON object is
skipped and counted: the first SKIP_NOTICES get a "skipped" message, and caught_up/end carry
the count; an unfinished last line waits for its writer. NaN and inf are sent as null.

Read-only. The tree is opened read-only (no lock, no repair, nothing written) and follows a
writer with MegaContextTree.reload(); the run log is only read. Every read is a bounded slice
of a memory map or file, so memory stays flat in the tree's size (scripts/bench_viz.py).

This module only shows; it never runs the model, writes a tree, or changes a run log.
"""

import argparse
import asyncio
import importlib.util
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from megacontext.telemetry import artifact_root

PAGE_PATH = Path(__file__).with_name("viz.html")
POLL_S = 0.2              # how often a stream looks for new lines of its log
RELOAD_S = 0.5            # how often the tree looks for a writer's appends (at most)
NEWER_LOG_S = 1.0         # how often a directory stream looks for a newer run of its memory
READ_BYTES = 1 << 20      # a log is read this much at a time
MAX_LINE_BYTES = 16 << 20  # a longer line is skipped, not buffered
SKIP_NOTICES = 20         # bad lines reported one by one; the rest only counted
MAX_TEXT_TOKENS = 4096    # the text endpoint decodes at most this many tokens per call
MAX_NEAREST = 64

logger = logging.getLogger("megacontext.viz")

# -----------------------------------------------------------------------------
# Run logs -> messages


def finite(obj):
    """obj with every NaN/inf float replaced by None (JSON has no NaN; the page's JSON.parse refuses it)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def to_json(message):
    return json.dumps(finite(message), ensure_ascii=False, allow_nan=False)


def _layout(value):
    """A telemetry.wc_layout dict, or None when the record has none (or a malformed one)."""
    if not isinstance(value, dict) or not isinstance(value.get("runs"), list):
        return None
    for run in value["runs"]:
        if not (isinstance(run, list) and len(run) == 3 and all(isinstance(x, int) for x in run)
                and run[0] in (0, 1, 2) and run[2] > 0):
            return None
    return {"start": value.get("start", 0), "end": value.get("end", 0), "runs": value["runs"]}


def _ms(seconds):
    return None if not isinstance(seconds, (int, float)) else 1000.0 * seconds


def refocus_message(record, line, frame, decode_ms_per_token=None):
    """One refocus record as the page draws it."""
    figures = {k: record.get(k) for k in ("swap_rate", "focus_swap_rate", "residency", "budget_utilization",
                                          "entries", "actions", "budget_collapses", "dropped_tokens",
                                          "recomputed_slots", "reusable_slots", "lod_histogram")}
    figures.update(refocus_ms=_ms(record.get("refocus_s")), recompute_ms=_ms(record.get("recompute_s")),
                   decode_ms_per_token=decode_ms_per_token)
    actions = [a for a in record.get("actions_list") or [] if isinstance(a, list) and len(a) == 4]
    scored, scores = _layout(record.get("scored_wc")), record.get("scores")
    if scored is None or not isinstance(scores, list):
        scored, scores = None, None
    return {"type": "refocus", "line": line, "frame": frame, "step": record.get("step"), "time": record.get("time"),
            "history_tokens": record.get("history_tokens"), "wc": _layout(record.get("wc")),
            "scored_wc": scored, "scores": scores, "actions": actions, "figures": figures}


class RunLogReader:
    """A telemetry JSONL read incrementally: poll() -> the messages of the whole lines written
    since the last poll. Holds one file handle and at most one unfinished line."""

    def __init__(self, path):
        self.path = Path(path)
        self._file = open(self.path, "rb")
        self._partial = b""
        self._dropping = False  # inside a line longer than MAX_LINE_BYTES
        self.lines = 0           # whole lines read
        self.skipped = 0         # of them, not JSON objects
        self.frames = 0          # refocus messages so far
        self.ended = False       # the log's end record was read
        self.at_end = False      # the last poll found nothing new
        self._decode_ms = None   # the last decode stretch's ms/token since the previous refocus

    def close(self):
        self._file.close()

    @property
    def pending_bytes(self):
        """Bytes of an unfinished last line (a writer mid-line, or one that died there)."""
        return len(self._partial)

    def counts(self):
        return {"lines": self.lines, "skipped": self.skipped, "frames": self.frames, "pending_bytes": self.pending_bytes}

    def poll(self):
        """Messages of the whole lines in the next READ_BYTES of the file, so a long log is held
        a chunk at a time, never whole. Sets at_end when nothing more is written yet."""
        out = []
        chunk = b"" if self.ended else self._file.read(READ_BYTES)
        self.at_end = not chunk
        if not chunk:
            return out
        pieces = (self._partial + chunk).split(b"\n")
        self._partial = pieces.pop()
        if self._dropping:  # inside a line longer than MAX_LINE_BYTES, already counted: skip to its end
            if not pieces:
                self._partial = b""
                return out
            pieces.pop(0)
            self._dropping = False
        for raw in pieces:
            out.extend(self._line(raw))
            if self.ended:
                break
        if len(self._partial) > MAX_LINE_BYTES:
            self.lines += 1
            out.extend(self._skip(f"longer than {MAX_LINE_BYTES} bytes"))
            self._partial, self._dropping = b"", True
        return out

    def _skip(self, reason):
        self.skipped += 1
        if self.skipped <= SKIP_NOTICES:
            return [{"type": "skipped", "line": self.lines, "reason": reason, "skipped": self.skipped}]
        return []

    def _line(self, raw):
        if not raw.strip():
            return []  # a blank line holds nothing to show
        self.lines += 1
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            return self._skip(f"not JSON ({type(e).__name__}: {str(e)[:120]})")
        if not isinstance(record, dict):
            return self._skip(f"a JSON {type(record).__name__}, not an object")
        return [self._message(record)]

    def _message(self, record):
        line, event = self.lines, record.get("event")
        if event == "start":
            return {"type": "start", "line": line, "run": record.get("run"), "config": record.get("config"),
                    "wandb_url": record.get("wandb_url"), "time": record.get("time")}
        if event == "refocus":
            message = refocus_message(record, line, self.frames, self._decode_ms)
            self.frames += 1
            self._decode_ms = None
            return message
        if event == "decode":
            self._decode_ms = record.get("decode_ms_per_token")
            return {"type": "decode", "line": line, "step": record.get("step"), "tokens": record.get("tokens"),
                    "decode_s": record.get("decode_s"), "decode_ms_per_token": record.get("decode_ms_per_token")}
        if event in ("fallback", "dropped_history"):
            return {"type": "notice", "line": line, "event": event, "step": record.get("step"),
                    "message": record.get("reason") or record.get("message")}
        if event == "summary":
            return {"type": "summary", "line": line, **{k: v for k, v in record.items() if k != "event"}}
        if event == "end":
            self.ended = True
            return {"type": "end", "line": line, **self.counts()}
        values = {k: v for k, v in record.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("time", "step")}
        return {"type": "metrics", "line": line, "event": event, "step": record.get("step"),
                "time": record.get("time"), "values": values}


_log_memories = {}  # path -> the memory its start record names (a first line never changes once whole)


def log_memory(path):
    """The memory dir a run log's start record names (config.memory), resolved; None if none."""
    if path in _log_memories:
        return _log_memories[path]
    try:
        with open(path, "rb") as f:
            first = f.readline(1 << 20)
        if not first.endswith(b"\n"):
            return None  # not whole yet: ask again later
        record = json.loads(first)
        memory = record.get("config", {}).get("memory") if record.get("event") == "start" else None
        memory = str(Path(memory).resolve()) if isinstance(memory, str) else None
    except (OSError, ValueError, AttributeError):
        memory = None
    _log_memories[path] = memory
    return memory


def run_logs_in(directory, memory=None):
    """*.jsonl files of a directory, newest first; with memory, only those whose start record names it."""
    stamped = []
    try:
        for p in Path(directory).iterdir():
            if p.suffix == ".jsonl" and p.is_file():
                stamped.append((p.stat().st_mtime, p.name, p))
    except OSError:  # the directory is not there (yet), or a file went away while we looked
        return []
    paths = [p for _, _, p in sorted(stamped, reverse=True)]
    if memory is not None:
        memory = str(Path(memory).resolve())
        paths = [p for p in paths if log_memory(p) == memory]
    return paths

# -----------------------------------------------------------------------------
# The tree, read-only


class TreeUnavailable(RuntimeError):
    """The tree cannot be read right now (replaced, mid-refresh, damaged): a 503."""


class MemoryView:
    """A tree opened read-only, following its writer (reload() at most every RELOAD_S), plus the
    tokenizer that decodes its LOD0 and, optionally, the base model's token table."""

    def __init__(self, directory, tokenizer, embeddings=None):
        from megacontext.tree import MegaContextTree
        self.directory = Path(directory)
        self.tokenizer = tokenizer
        self.tree = MegaContextTree.open(self.directory, readonly=True)
        self._reloaded = time.monotonic()
        self.embeddings = None  # (V, D) float32 rows of unit length: cosine = one matmul
        if embeddings is not None:
            self.use_token_table(embeddings)

    def use_token_table(self, embeddings):
        """The base model's (V, D) token embedding table, for nearest()."""
        import torch
        # the model's table may be padded past the tokenizer's vocab (nanochat rounds it up): those rows are no token
        table = torch.as_tensor(embeddings).detach().float().cpu()[:self.tokenizer.get_vocab_size()]
        if table.ndim != 2 or table.shape[1] != self.tree.embedding_dim:
            raise ValueError(f"the token table is {tuple(table.shape)} but the tree's gists have "
                             f"{self.tree.embedding_dim} dims: give the base model the tree was made with")
        self.embeddings = table / table.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def close(self):
        self.tree.close()

    def follow(self, force=False):
        """Pick up a writer's appends (and its refreshed gist files), at most every RELOAD_S."""
        from megacontext.tree import MegaContextTree, RefreshInProgress
        if not force and time.monotonic() - self._reloaded < RELOAD_S:
            return
        self._reloaded = time.monotonic()
        try:
            self.tree.reload()
        except RefreshInProgress:
            pass  # the last snapshot stands until the writer's swap is done
        except (OSError, ValueError, RuntimeError) as e:  # reload() closed the tree: open it afresh
            try:
                self.tree = MegaContextTree.open(self.directory, readonly=True)
            except (OSError, ValueError, RuntimeError) as e2:
                raise TreeUnavailable(f"the tree at {self.directory} cannot be read now ({e}; reopening: {e2})") from None

    def summary(self):
        t = self.tree
        return {"directory": str(self.directory), "tokens": t.num_tokens, "nodes": [t.num_nodes(lv) for lv in range(3)],
                "block_size": t.block_size, "embedding_dim": t.embedding_dim, "dtype": str(t.dtype),
                "model_name": t.model_name, "gistnet_name": t.gistnet_name, "pending_tokens": t.pending_tokens,
                "sources": len(t.sources), "generation": t.generation, "nearest": self.embeddings is not None}

    def node(self, level, index):
        """Node metadata; LookupError (-> 404) naming what the tree has."""
        if level not in (0, 1, 2):
            raise LookupError(f"there is no level {level}: levels are 0 (tokens), 1 and 2 (gists)")
        n = self.tree.num_nodes(level)
        if not 0 <= index < n:
            self.follow(force=True)  # a live writer may have made it since the last reload
            n = self.tree.num_nodes(level)
        if not 0 <= index < n:
            have = f"nodes 0..{n - 1}" if n else "none yet"
            raise LookupError(f"LOD{level} node {index} does not exist: the tree has {n} LOD{level} nodes ({have})")
        node = self.tree.node(level, index)
        exists = lambda v: v is not None and 0 <= v[1] < self.tree.num_nodes(v[0])
        parent = node.parent if exists(node.parent) else None
        children = [list(c) for c in node.children if exists(c)]
        return {"level": level, "index": index, "span_id": node.span_id, "start": node.start, "end": node.end,
                "tokens": node.end - node.start, "parent": list(parent) if parent else None, "children": children,
                "previous": [level, index - 1] if index > 0 else None,
                "next": [level, index + 1] if index + 1 < n else None, "count": n}

    def text(self, level, index, max_tokens=MAX_TEXT_TOKENS):
        info = self.node(level, index)
        end = min(info["end"], info["start"] + max_tokens)
        ids = self.tree.tokens(info["start"], end).tolist()
        return {"level": level, "index": index, "start": info["start"], "end": end, "tokens": len(ids),
                "truncated": end < info["end"], "text": self.tokenizer.decode(ids)}

    def nearest(self, level, index, k=8):
        info = self.node(level, index)
        if self.embeddings is None:
            raise NotImplementedError("no base model loaded, so there is no token table to compare gists with: "
                                      "start megacontext.viz with --model-tag TAG (the tree's base checkpoint)")
        if level == 0:
            raise LookupError(f"LOD0 node {index} is tokens, not a gist: ask for its text, or the nearest tokens "
                              f"of its LOD1 gist (/api/node/1/{index}/nearest)")
        import torch
        gist = torch.from_numpy(self.tree.gists(level, index, index + 1)[0].astype("float32"))
        cosine = self.embeddings @ (gist / gist.norm().clamp_min(1e-12))
        top = torch.topk(cosine, min(int(k), cosine.numel()))
        return {"level": level, "index": index, "start": info["start"], "end": info["end"],
                "nearest": [{"token_id": int(i), "text": self.tokenizer.decode([int(i)]), "cosine": round(float(c), 4)}
                            for c, i in zip(top.values, top.indices)]}

# -----------------------------------------------------------------------------
# The stream


def pick_log(run_log, memory_dir, name=None):
    """(path or None, a one-line problem or None) for one stream: the file, or in a directory
    the log named `name`, else the newest one whose start record names memory_dir."""
    run_log = Path(run_log)
    if not run_log.is_dir():
        return run_log, None
    if name is not None:
        for p in run_logs_in(run_log):
            if p.name == name:  # only names the directory lists: no path ever reaches open()
                return p, None
        return None, f"{name!r} is not a run log in {run_log}"
    logs = run_logs_in(run_log, memory_dir)
    return (logs[0], None) if logs else (None, None)


async def stream_messages(memory, run_log, name=None, poll_s=POLL_S):
    """The messages of one client's stream (see the module docstring)."""
    yield {"type": "hello", "memory": memory.summary()}
    if run_log is None:
        yield {"type": "error", "message": "no run log: start megacontext.viz with --run-log FILE.jsonl or DIR"}
        return
    path, problem = pick_log(run_log, memory.directory, name)
    if problem:
        yield {"type": "error", "message": problem}
        return
    if path is None:
        yield {"type": "waiting", "run_logs": str(run_log), "memory": str(memory.directory)}
        while path is None:
            await asyncio.sleep(poll_s)
            path, _ = pick_log(run_log, memory.directory)
    # a directory's newest log is followed by the next one this memory gets (a new run, live)
    follow = Path(run_log).is_dir() and name is None
    while True:
        try:
            reader = RunLogReader(path)
        except OSError as e:
            yield {"type": "error", "message": f"cannot read run log {path}: {e.strerror or e}"}
            return
        try:
            yield {"type": "open", "run_log": str(path), "follow": follow}
            caught_up, looked = False, time.monotonic()
            while True:
                messages = reader.poll()
                for message in messages:
                    yield message
                if reader.ended and not follow:
                    return
                if reader.at_end or reader.ended:
                    if not caught_up:
                        caught_up = True
                        yield {"type": "caught_up", **reader.counts()}
                    if follow and time.monotonic() - looked > NEWER_LOG_S:
                        looked = time.monotonic()
                        newest, _ = pick_log(run_log, memory.directory)
                        if newest is not None and newest != path:
                            path = newest
                            break
                    await asyncio.sleep(poll_s)
        finally:
            reader.close()

# -----------------------------------------------------------------------------
# The app


def websocket_available():
    """Whether uvicorn can serve WebSockets here (it needs the websockets or wsproto package)."""
    return any(importlib.util.find_spec(m) is not None for m in ("websockets", "wsproto"))


def create_app(memory, run_log=None, poll_s=POLL_S):
    """The FastAPI app over a MemoryView and a run log (file, directory or None)."""
    from fastapi import FastAPI, Query, WebSocket, WebSocketDisconnect
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

    page = PAGE_PATH.read_text(encoding="utf-8")
    app = FastAPI()
    has_websocket = websocket_available()

    def reason(status, message):
        return JSONResponse(status_code=status, content={"detail": message})

    @app.exception_handler(Exception)
    async def unexpected_error(request, exc):
        logger.exception("unexpected error while handling %s %s", request.method, request.url.path)
        return reason(500, f"internal server error ({type(exc).__name__})")

    def tree_call(fn, *args):
        try:
            memory.follow()
            return JSONResponse(finite(fn(*args)))
        except LookupError as e:
            return reason(404, str(e).strip("'\""))
        except NotImplementedError as e:
            return reason(501, str(e))
        except TreeUnavailable as e:
            return reason(503, str(e))

    @app.get("/")
    async def root():
        return HTMLResponse(page)

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    @app.get("/api/memory")
    async def memory_summary():
        return tree_call(lambda: dict(memory.summary(), websocket=has_websocket,
                                      run_log=None if run_log is None else str(run_log)))

    @app.get("/api/runs")
    async def runs():
        if run_log is None or not Path(run_log).is_dir():
            return {"directory": None, "runs": [] if run_log is None else [Path(run_log).name]}
        mine = set(run_logs_in(run_log, memory.directory))
        return {"directory": str(run_log),
                "runs": [{"name": p.name, "this_memory": p in mine} for p in run_logs_in(run_log)]}

    @app.get("/api/node/{level}/{index}")
    async def node(level: int, index: int):
        return tree_call(memory.node, level, index)

    @app.get("/api/node/{level}/{index}/text")
    async def node_text(level: int, index: int, max_tokens: int = Query(MAX_TEXT_TOKENS, ge=1, le=MAX_TEXT_TOKENS)):
        return tree_call(memory.text, level, index, max_tokens)

    @app.get("/api/node/{level}/{index}/nearest")
    async def node_nearest(level: int, index: int, k: int = Query(8, ge=1, le=MAX_NEAREST)):
        return tree_call(memory.nearest, level, index, k)

    @app.get("/api/stream")
    async def sse(log: str = None):
        async def events():
            async for message in stream_messages(memory, run_log, log, poll_s):
                yield f"data: {to_json(message)}\n\n"
        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, log: str = None):
        await websocket.accept()

        async def pump():
            async for message in stream_messages(memory, run_log, log, poll_s):
                await websocket.send_text(to_json(message))

        async def until_gone():  # a stream that only waits for new lines still learns the client left
            while (await websocket.receive())["type"] != "websocket.disconnect":
                pass

        tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(until_gone())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if tasks[0] in done and tasks[0].exception() is None:
                await websocket.close()
        except (WebSocketDisconnect, RuntimeError):
            pass  # the client went away mid-send: nothing to tell it
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                try:
                    await t
                except (asyncio.CancelledError, WebSocketDisconnect, RuntimeError, OSError):
                    pass  # the stream's own end; a vanished client's send errors end here too

    return app

# -----------------------------------------------------------------------------
# The command line


def build_parser():
    parser = argparse.ArgumentParser(description="MegaContext visualizer: the Working Context live, the tree explorer, run replays")
    parser.add_argument("--memory", required=True, help="the tree directory (LOD0/1/2.ctx), opened read-only")
    parser.add_argument("--run-log", default=None,
                        help="a telemetry .jsonl to replay/tail, or a directory of them "
                             "(default: $MEGACONTEXT_ARTIFACT_ROOT/run_logs)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    parser.add_argument("--tokenizer-dir", default=None, help="tokenizer directory (default $NANOCHAT_BASE_DIR/tokenizer)")
    # --- optional: the base model, for a gist's nearest token embeddings ---
    parser.add_argument("--model-tag", default=None, help="base checkpoint tag the tree was made with (enables nearest tokens)")
    parser.add_argument("--source", default="base", help="checkpoint family of --model-tag (base|sft|rl)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    return parser


def load_token_table(args, tree_model_name):
    """The base checkpoint's token embedding table, refusing one the tree was not made with."""
    import torch
    from megacontext.ingest import load_base_model
    cfg = {"source": args.source, "model_tag": args.model_tag, "step": args.step, "checkpoint_dir": None,
           "model_name": None}
    model, _, model_name = load_base_model(cfg, torch.device("cpu"))
    if model_name != tree_model_name:
        raise ValueError(f"--model-tag gives model {model_name!r} but the tree was made with {tree_model_name!r}; "
                         f"pass that checkpoint's tag and step")
    return model.transformer.wte.weight.detach().float().clone()


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
        memory_dir = Path(args.memory)
        if not memory_dir.is_dir():
            raise FileNotFoundError(f"--memory {memory_dir} is not a directory; pass a MegaContext tree "
                                    f"(one built by megacontext.ingest or megacontext.run)")
        run_log = Path(args.run_log) if args.run_log else Path(artifact_root()) / "run_logs"
        if args.run_log and not run_log.exists():
            raise FileNotFoundError(f"--run-log {run_log} does not exist; pass a telemetry .jsonl or a directory of them")
        from nanochat.common import get_base_dir
        from nanochat.tokenizer import RustBPETokenizer
        tokenizer_dir = Path(args.tokenizer_dir or os.path.join(get_base_dir(), "tokenizer"))
        if not (tokenizer_dir / "tokenizer.pkl").exists():
            raise FileNotFoundError(f"no tokenizer in {tokenizer_dir} (the tree's tokens are decoded with it); "
                                    f"set NANOCHAT_BASE_DIR or pass --tokenizer-dir")
        tokenizer = RustBPETokenizer.from_directory(str(tokenizer_dir))
        memory = MemoryView(memory_dir, tokenizer)
        if args.model_tag:
            memory.use_token_table(load_token_table(args, memory.tree.model_name))
        app = create_app(memory, run_log)
    except (FileNotFoundError, NotADirectoryError, ValueError, RuntimeError, OSError) as e:
        if os.environ.get("NANOCHAT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1

    import uvicorn
    s = memory.summary()
    print(f"memory {memory_dir}: {s['tokens']:,} tokens, {s['nodes'][1]:,} LOD1 / {s['nodes'][2]:,} LOD2 gists, "
          f"model {s['model_name']!r}; run log {run_log}", file=sys.stderr)
    if not websocket_available():
        print("no WebSocket library for uvicorn (pip install websockets): the page streams over server-sent events",
              file=sys.stderr)
    print(f"Open http://{'localhost' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}/", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
