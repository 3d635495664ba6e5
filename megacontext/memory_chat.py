"""
MegaContext chat: a conversation whose memory outgrows the model's window and lasts across
sessions. nanochat's chat front-ends (python -m nanochat.chat, scripts/chat_web) run it through
the chat hook: the `megacontext` variant with `chat: true` in its section builds this session.

    python -m nanochat.chat --config configs/megacontext_demo.yaml
    python -m nanochat.chat --config configs/megacontext_demo.yaml --ingest book.txt   # memory first
    python -m nanochat.chat --config configs/megacontext_demo.yaml --memory DIR        # another memory

What happens. Every turn is appended to a MegaContext Tree on disk (the memory dir: LOD0/1/2.ctx
+ tree.json) through the streaming runtime (megacontext/runtime.py, the same loop as
python -m megacontext.run): LensNet and the allocator refocus the Working Context every K tokens,
so also right before each reply, and the model decodes the reply over the WC, reusing the KV cache
for the prefix that did not change. The reply's tokens join the memory as they are generated.
A later chat with the same memory dir continues where the last one stopped.

Rendering (`render`). chat: turns in nanochat's conversation format, <|user_start|> text
<|user_end|> <|assistant_start|> reply <|assistant_end|>, the format the SFT model was trained on.
text: a base (pre-trained only) model never saw those tokens, so each message is plain text
appended to memory on a line of its own (a newline before it unless it starts with whitespace or
a document) and the reply is the model's continuation (ending at <|bos|> or max_tokens).
auto (default): text for source: base, chat otherwise. Typed text is always ordinary text: a
user who types "<|bos|>" stores those characters, never the control token. A document ingested
with --ingest starts with <|bos|> when memory already holds something (the runtime's slot 0 is
the BOS of the first). The turns after a document follow it without one: the testbed model
never reads across a <|bos|> (its rows are single documents), so a question about the document
must be part of the same stream. After 'clear' the next turn starts with <|bos|>.

Commands (answered by the session, never sent to the model):
  /memory   tokens held, the WC by LOD (entries and tokens covered), swap rate and residency of
            this session's refocuses, and the nodes expanded while reading and answering the last
            message (with the text they stand for)
  /forget   clears the memory after a confirmation (the next line must be `yes`)
'clear' (the REPL's) starts a new conversation but keeps the memory; /forget empties it.

Config keys (the variant's section; on the chat command line as --key=value):
  chat            true: this section configures the memory chat (megacontext.variant dispatches on it)
  gistnet         a JT1/e2e run's model tag (its last mc_XXXXXX.pt), an mc path, or 'mean'
  lensnet         a JT2/e2e run's model tag or mc path; null = frozen focus (budget keeping only)
  allocator       megacontext.allocator.AllocatorConfig fields
  lora            an end-to-end run's model tag or mc path whose LoRA the base reads through; null = none
  budget_tokens   W, refocus_every  K, refocus_rounds  LensNet + allocator rounds per refocus (runtime.Focus)
  memory          the memory dir (created if missing); default $NANOCHAT_BASE_DIR/megacontext/chat/default.
                  A front-end that keeps several conversations (chat_web) gives each its own:
                  <memory>/sessions/<session id> (default root $NANOCHAT_BASE_DIR/megacontext/chat).
  ingest          a file or a directory of text files to add to memory before the chat (progress bar;
                  a file already whole in memory, same path and SHA-256, is skipped); glob, encoding
  render          auto | chat | text
  gist_first      true: gist-first decoding (megacontext/megaprediction.py): before each 32-token block of a
                  reply, the MegaPrediction heads' predicted gist of that block is placed in the KV cache as
                  a plan (never in memory); needs `megaprediction`. On the CPU testbed it raises horizon NLL
                  (docs/benchmarks.md): off by default
  megaprediction  an end-to-end run's model tag or mc path that trained MegaPrediction heads
  lod_mix         the levels whose predicted gists are placed as plans: [1] or [1, 2]
  run_name        telemetry: $MEGACONTEXT_ARTIFACT_ROOT/run_logs/<run_name>-<time>.jsonl (megacontext.viz
                  follows it live)

Bad input and failures (one line each, memory on disk never corrupted):
  - a memory dir from another base model or GistNet is refused naming both (the tree's check), and
    left untouched;
  - a memory dir another chat is writing is refused (the tree's single-writer lock);
  - a write that fails (disk full) ends the turn with a message; the memory reopens at its last
    committed state, which it keeps;
  - Ctrl-C or SIGKILL mid-reply or mid-ingest leaves the dir readable at its last commit (every tree
    append commits); an ingest cut short is closed as a shorter source on the next open, with a notice.

This module owns the chat session over the runtime: rendering, ingest into memory, the commands
and recovery. It never trains, never decides WC layouts (allocator, working_context), never
writes the tree except through MegaContextTree.ingest (directly for documents, via the runtime
for turns) and has no decode loop of its own (the runtime's generate()).
"""

import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from megacontext.telemetry import Telemetry
from megacontext.variant import merged_config

DEFAULTS = {
    "chat": True,
    "gistnet": "longctx_cpu_gistnet",
    "lensnet": "longctx_cpu_lensnet",
    "allocator": {"tau_expand": 0.0, "standalone_collapses": False},  # as configs/runtime_cpu.yaml
    "lora": None,
    "budget_tokens": 128,
    "refocus_every": 32,
    "refocus_rounds": 1,
    "memory": None,
    "ingest": None,
    "glob": "*",
    "encoding": "utf-8",
    "render": "auto",
    "megaprediction": None,
    "gist_first": False,
    "lod_mix": [1],
    "run_name": "chat",
}
RENDERS = ("auto", "chat", "text")
COMMANDS = ("/memory", "/forget")


class MemoryChatVariant:
    """`variant: megacontext` with `chat: true`: builds the memory chat session for nanochat.chat."""
    name = "megacontext"

    def __init__(self, config):
        self.config = merged_config(config or {}, DEFAULTS, "megacontext chat")
        if self.config["render"] not in RENDERS:
            raise ValueError(f"megacontext.render must be one of {', '.join(RENDERS)}, got {self.config['render']!r}")
        if self.config["gist_first"] and not self.config["megaprediction"]:
            raise ValueError("megacontext.gist_first needs MegaPrediction heads: set megaprediction to the model tag "
                             "of a run trained with them (e.g. configs/megaprediction_cpu.yaml's)")
        if self.config["gist_first"]:
            from megacontext.megaprediction import check_lod_mix
            check_lod_mix(self.config["lod_mix"])
        for key in ("budget_tokens", "refocus_every", "refocus_rounds"):
            value = self.config[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"megacontext.{key} must be a positive integer, got {value!r}")

    def chat_session(self, engine, config, session_id=None):
        return MemoryChatSession(engine, config, self.config, session_id=session_id)


def checkpoint_name(settings):
    """The name a tree records for the chat's checkpoint: megacontext.ingest's for the same one
    (source:tag@step), so a memory built by `python -m megacontext.ingest` opens here too."""
    from megacontext.ingest import resolve_checkpoint
    return resolve_checkpoint(settings)[2]


class _ChatTelemetry(Telemetry):
    """The run log, plus the allocator's actions since the last user message (for /memory)."""

    def log_refocus(self, prev_wc, next_wc, n_actions, refocus_s, **kw):
        self.recent_actions.extend(kw.get("actions_list") or [])
        return super().log_refocus(prev_wc, next_wc, n_actions, refocus_s, **kw)


class MemoryChatSession:
    """nanochat.chat's session protocol (reset, add_user_message, stream_reply, load_messages,
    messages) over a MegaContext memory, plus command(), composition(), ingest() and close()."""
    user_label, reply_label = "User", "Assistant"

    def __init__(self, engine, settings, config, session_id=None, model_name=None):
        from megacontext.ingest import load_gister
        from megacontext.run import resolve_gistnet
        self.engine, self.model, self.tokenizer = engine, engine.model, engine.tokenizer
        self.settings, self.config = settings, config
        self.max_tokens, self.temperature = settings["max_tokens"], settings["temperature"]
        self.top_k, self.seed = settings["top_k"] or None, settings["seed"]
        render = config["render"]
        self.render = ("text" if settings["source"] == "base" else "chat") if render == "auto" else render
        if self.render == "text":
            self.user_label, self.reply_label = "Text", "Continuation"
        special = self.tokenizer.encode_special
        self.bos = self.tokenizer.get_bos_token_id()
        if self.render == "chat":
            self.user_start, self.user_end = special("<|user_start|>"), special("<|user_end|>")
            self.assistant_start, self.assistant_end = special("<|assistant_start|>"), special("<|assistant_end|>")
        device = self.model.get_device()
        if config["lora"]:
            from megacontext.end_to_end import attach_trained_lora
            attach_trained_lora(self.model, config["lora"])
        self.model_name = model_name or checkpoint_name(settings)
        self.gistnet = load_gister(resolve_gistnet(config["gistnet"]), self.model.config.n_embd, device)
        self.lensnet = None
        if config["lensnet"]:
            from megacontext.lensnet import load_lensnet
            self.lensnet = load_lensnet(config["lensnet"], self.model.config.n_embd, device)
        self.planner = None
        if config["gist_first"]:
            from megacontext.megaprediction import Planner, load_megaprediction
            heads, info = load_megaprediction(config["megaprediction"], self.model.config.n_embd, device)
            if info.get("gistnet_identity") and info["gistnet_identity"] != self.gistnet.identity():
                raise ValueError(f"the MegaPrediction heads in {info['path']} predict gists of "
                                 f"{info['gistnet_identity']}, but gistnet is {self.gistnet.identity()}; use that run's "
                                 f"GistNet (gistnet: the same model tag)")
            self.planner = Planner(heads, lod_mix=config["lod_mix"])
        self.memory = memory_dir(config["memory"], session_id)
        self.tree = self.rt = self.telemetry = None
        self.turns = []                 # (role, text) of this session's conversation
        self.expanded = []              # (level, index) expanded while reading and answering the last message
        self._reply_wc = None           # the WC the last reply was decoded over
        self._confirm_forget = False
        self._new_document = False      # the next turn starts a new document (after 'clear')
        self.notices = []
        self._open()
        if config["ingest"]:
            self.ingest(config["ingest"])

    # --- the memory: open, recover, ingest, forget ---

    def _open(self):
        from megacontext.allocator import AllocatorConfig, FocusAllocator
        from megacontext.runtime import MegaContextRuntime, open_tree
        self.memory.parent.mkdir(parents=True, exist_ok=True)
        self.tree = open_tree(self.memory, self.model, self.gistnet, self.model_name)
        try:
            sources = self.tree.sources
            if sources and sources[-1]["tokens"] is None:  # an ingest was cut short: keep what it committed
                self.tree.end_source(interrupted=True)  # --ingest of the same file adds it again, whole
                got = self.tree.num_tokens - sources[-1]["start"]
                self.notices.append(f"(the ingest of {sources[-1].get('path')} was interrupted; memory keeps its first "
                                    f"{got:,} tokens: --ingest it again to add it whole)")
            if self.telemetry is None:
                self.telemetry = _ChatTelemetry(self.config["run_name"], config={"chat": self.config,
                                                "memory": str(self.memory)}, wandb=False)
                self.telemetry.recent_actions = []
            allocator = FocusAllocator(AllocatorConfig(**(self.config["allocator"] or {}))) if self.lensnet else None
            self.rt = MegaContextRuntime(self.model, self.tokenizer, self.tree, budget_tokens=self.config["budget_tokens"],
                                         refocus_every=self.config["refocus_every"], lensnet=self.lensnet,
                                         allocator=allocator, telemetry=self.telemetry, planner=self.planner,
                                         refocus_rounds=self.config["refocus_rounds"])
        except BaseException:
            self.tree.close()
            raise

    def _reopen(self):
        """Drop the runtime and reopen the tree from disk: its last committed state (after a failed
        write, or an interrupt that may have cut a runtime step in half)."""
        try:
            self.tree.close()
        except Exception:
            pass
        self._open()

    @property
    def history_tokens(self):
        return self.rt.history_len

    def ingest(self, path):
        """Add a file (or a directory's text files) to memory, each a document of its own; files
        already whole in memory (same path and SHA-256) are skipped. Returns tokens added."""
        from tqdm import tqdm
        from megacontext.ingest import check_texts, list_inputs, read_pieces
        files, skipped = list_inputs(path, self.config["glob"])
        _, sizes_hashes = check_texts(files, self.config["encoding"])
        whole = {(s.get("path"), s.get("sha256")) for s in self.tree.sources
                 if s["tokens"] is not None and not s.get("interrupted")}
        todo = [(p, size, digest) for p, (size, digest) in zip(files, sizes_hashes)
                if (str(p.resolve()), digest) not in whole]
        if len(todo) < len(files):
            self.notices.append(f"({len(files) - len(todo)} of {len(files)} files already in memory, skipped)")
        self.rt.close()  # the generated tokens not in the tree yet go first
        added, start = 0, self.tree.num_tokens
        try:
            with tqdm(total=sum(size for _, size, _ in todo), unit="B", unit_scale=True, desc="ingest",
                      file=sys.stderr, disable=not todo) as bar:
                for p, size, digest in todo:
                    self.tree.begin_source({"path": str(p.resolve()), "bytes": size, "sha256": digest,
                                            "encoding": self.config["encoding"]})
                    if self.tree.num_tokens:
                        self.tree.ingest([self.bos])
                    seen = 0
                    for text, done in read_pieces(p, self.config["encoding"]):
                        self.tree.ingest(self.tokenizer.encode(text))
                        bar.update(done - seen)
                        seen = done
                    self.tree.end_source()
            added = self.tree.num_tokens - start
        finally:
            self._reopen()  # a fresh runtime over the grown tree (its recency WC, refocused once)
        if skipped:
            self.notices.append(f"({len(skipped)} binary files skipped)")
        self.notices.append(f"(ingested {added:,} tokens from {len(todo)} file(s); memory holds "
                            f"{self.history_tokens:,} tokens)")
        return added

    def forget(self):
        """Empty the memory: the old tree is moved aside, a new empty one made, then the old removed
        (a `sessions/` dir of other conversations' memories inside it is moved back first)."""
        held = self.history_tokens
        self.tree.close()
        aside = self.memory.with_name(f"{self.memory.name}.forgotten-{int(time.time() * 1000)}")
        os.replace(self.memory, aside)
        try:
            if (aside / "sessions").is_dir():  # other conversations' memories under this one stay
                self.memory.mkdir()
                os.replace(aside / "sessions", self.memory / "sessions")
            self._open()
        finally:
            shutil.rmtree(aside, ignore_errors=True)
        self.expanded, self._reply_wc = [], None
        return held

    def close(self):
        """Write what is not on disk yet (the last generated tokens) and release the memory dir."""
        if self.tree is None:
            return
        try:
            self.rt.close()
        finally:
            self.tree.close()
            self.tree = None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # target warnings are for training runs, not a chat
                self.telemetry.close()

    # --- the conversation ---

    def reset(self):
        """A new conversation; the memory stays (/forget empties it)."""
        self.turns = []
        self._new_document = self.history_tokens > 0

    @property
    def messages(self):
        return [{"role": role, "content": text} for role, text in self.turns]

    def _user_ids(self, text):
        new_document = self._new_document and self.history_tokens > 0
        if self.render == "text" and self.history_tokens and not new_document and text[:1] not in ("", " ", "\n"):
            text = "\n" + text  # a message is a line of its own, not glued to the last word of memory
        ids = self.tokenizer.encode(text)  # ordinary text: special-token literals stay characters
        if self.render == "chat":
            ids = [self.user_start, *ids, self.user_end]
        if new_document:
            ids = [self.bos, *ids]
        self._new_document = False
        return ids

    def _feed(self, ids):
        self._guarded(lambda: self.rt.feed(np.asarray(ids, dtype=np.int64)))

    def _guarded(self, step):
        """Run a memory write; a failed one (disk full, ...) reopens the memory at its last commit
        and becomes one ValueError for the front-end."""
        try:
            return step()
        except OSError as e:
            held = self._recover()
            raise ValueError(f"could not write to memory {self.memory} ({e.strerror or e}): this turn was not kept; "
                             f"memory holds its last committed {held:,} tokens. Free disk space and try again") from None

    def _recover(self):
        try:
            self._reopen()
            return self.history_tokens
        except Exception:
            return 0

    def load_messages(self, messages):
        """Replace this session's conversation with `messages` and append them to memory as they
        are (a front-end that holds the conversation, e.g. a new chat_web session)."""
        self.reset()
        for i, message in enumerate(messages):
            role = message["role"]
            if role != ("user" if i % 2 == 0 else "assistant"):
                raise ValueError(f"message {i} is from {role!r}: a conversation alternates user, assistant, user, ...")
            if role == "user":
                self._feed(self._user_ids(message["content"]))
            else:
                ids = self.tokenizer.encode(message["content"])
                self._feed([self.assistant_start, *ids, self.assistant_end] if self.render == "chat" else ids)
            self.turns.append((role, message["content"]))

    def add_user_message(self, text):
        """Append the user's message to memory now (it is kept even if no reply follows)."""
        if not isinstance(text, str):
            raise ValueError(f"a user message must be a string, got {type(text).__name__}")
        if self.turns and self.turns[-1][0] == "user":
            raise ValueError("the previous user message has no reply yet; call stream_reply() first")
        self.telemetry.recent_actions = []
        self._feed(self._user_ids(text))
        self.turns.append(("user", text))
        notices, self.notices = self.notices, []
        return " ".join(notices) or None

    def stream_reply(self):
        """Generate the reply over the WC (runtime.generate), yielding text as it is decoded; its
        tokens join memory as they come. Ctrl-C, or a caller that stops early, keeps what came."""
        if not self.turns or self.turns[-1][0] != "user":
            raise ValueError("there is no user message to reply to; call add_user_message() first")
        if self.render == "chat":
            self._feed([self.assistant_start])
        self._reply_wc = self.rt.current_wc
        stop = (self.assistant_end, self.bos) if self.render == "chat" else (self.bos,)
        reply, shown, ended, clean = [], "", None, False
        try:
            for token in self.rt.generate(self.max_tokens, temperature=self.temperature, top_k=self.top_k,
                                          seed=self.seed):
                if token in stop:
                    ended = token
                    break
                reply.append(token)
                text = self.tokenizer.decode(reply)
                if not text.endswith("\ufffd") and len(text) > len(shown):  # hold back a half character
                    piece, shown = text[len(shown):], text
                    yield piece
            text = self.tokenizer.decode(reply)
            if text != shown:
                yield text[len(shown):]
            clean = True
        except OSError as e:
            held, clean = self._recover(), True
            yield (f" [memory error: could not write to {self.memory} ({e.strerror or e}); memory keeps its last "
                   f"committed {held:,} tokens]")
            return
        finally:
            self.turns.append(("assistant", self.tokenizer.decode(reply)))
            self.expanded = [(a[1], a[2]) for a in self.telemetry.recent_actions if a[0] == "expand"]
            if not clean:  # interrupted (Ctrl-C, a closed stream): the runtime may be mid-step, so
                self._guarded(self.rt.close)  # what it generated goes to disk and memory reopens from there
                self._reopen()
                if self.render == "chat":
                    self._feed([self.assistant_end])
        if self.render == "chat" and ended != self.assistant_end:
            self._feed([self.assistant_end])  # the turn is closed in memory as the format closes it
        self._guarded(self.rt.close)  # the reply to disk: a turn is committed when it ends

    # --- what the front-ends show ---

    def composition(self):
        """The WC the last reply was decoded over (the current one before any reply), oldest first:
        {"history_tokens", "budget_tokens", "runs": [{"level", "entries", "covers"}, ...]}."""
        wc = self._reply_wc if self._reply_wc is not None else self.rt.current_wc
        runs = []
        for e in wc.entries:
            if runs and runs[-1]["level"] == e.level:
                runs[-1]["entries"] += 1
                runs[-1]["covers"] += e.end - e.start
            else:
                runs.append({"level": int(e.level), "entries": 1, "covers": int(e.end - e.start)})
        return {"history_tokens": int(wc.history_len), "budget_tokens": self.rt.budget_tokens, "runs": runs}

    def _node_text(self, level, index, width=60):
        from megacontext.tree import node_span
        a, b = node_span(level, index, self.rt.block_size)
        b = min(b, self.tree.num_tokens)
        text = self.tokenizer.decode(self.tree.tokens(a, min(b, a + 4 * width)).tolist()) if b > a else ""
        text = " ".join(text.split())
        return a, b, (text[:width] + "...") if len(text) > width else text

    def memory_report(self):
        """The /memory text."""
        wc = self.rt.current_wc
        names = {0: "LOD0", 1: "LOD1 gists", 2: "LOD2 gists"}
        parts = []
        for level in range(3):
            entries = [e for e in wc.entries if e.level == level]
            if entries:
                covered = sum(e.end - e.start for e in entries)
                what = f"{sum(e.cost for e in entries)} tokens" if level == 0 else f"{len(entries)} {names[level]}"
                parts.append(f"{what} (covering {covered:,} tokens)")
        summary = self.telemetry.summary()
        fmt = lambda v, spec: "-" if v is None else format(v, spec)
        lines = [f"memory {self.memory}: {self.history_tokens:,} tokens held, {self.tree.num_gists(1):,} LOD1 and "
                 f"{self.tree.num_gists(2):,} LOD2 gists; {len(self.tree.sources)} document(s) ingested",
                 f"working context: {' + '.join(parts) or 'empty'}; cost {wc.cost}: {self.rt.wc.cost} of budget "
                 f"{self.rt.budget_tokens} at the last refocus + {wc.history_len - self.rt.wc.history_len} tokens since" if
                 wc.history_len > self.rt.wc.history_len else
                 f"working context: {' + '.join(parts) or 'empty'}; cost {wc.cost} of budget {self.rt.budget_tokens}",
                 f"focus: {'LensNet + allocator' if self.lensnet else 'frozen (no LensNet)'}; swap rate "
                 f"{fmt(summary.get('swap_rate'), '.3f')}, residency {fmt(summary.get('residency'), '.1%')} over "
                 f"{summary.get('refocuses', 0)} refocuses"]
        if self.expanded:
            lines.append(f"expanded for the last reply ({len(self.expanded)}):")
            for level, index in self.expanded[:8]:
                a, b, text = self._node_text(level, index)
                lines.append(f"  LOD{level} #{index} (tokens {a:,}-{b:,}): {text!r}")
        else:
            lines.append("expanded for the last reply: nothing (the focus kept its layout)")
        return "\n".join(lines)

    def command(self, text):
        """/memory and /forget (with its confirmation); None for anything else (a message)."""
        word = text.strip()
        if self._confirm_forget:
            self._confirm_forget = False
            if word.lower() == "yes":
                return f"memory cleared: {self.forget():,} tokens removed from {self.memory}"
            return "memory kept"
        if word == "/memory":
            return self.memory_report()
        if word == "/forget":
            self._confirm_forget = True
            return (f"this removes all {self.history_tokens:,} tokens of memory in {self.memory}; "
                    f"type yes to confirm (anything else keeps it)")
        if word.startswith("/") and " " not in word:
            return f"unknown command {word}; commands: {', '.join(COMMANDS)} ('quit' leaves, 'clear' starts a new conversation)"
        return None


def memory_dir(memory, session_id=None):
    """Where a session keeps its tree: `memory` itself (default <base>/megacontext/chat/default),
    or, for a named conversation, <memory or <base>/megacontext/chat>/sessions/<session_id>."""
    from nanochat.common import get_base_dir
    root = Path(os.path.expanduser(str(memory))) if memory else Path(get_base_dir()) / "megacontext" / "chat"
    if session_id is None:
        return root if memory else root / "default"
    return root / "sessions" / session_id
