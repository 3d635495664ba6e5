"""
The MegaContext runtime: a token stream -> the tree on disk -> LensNet + allocator every K
tokens -> the nanochat GPT decoding over the Working Context, reusing its KV cache.

    tree = open_tree("memory/", model, gistnet, model_name="d20")     # create or continue one
    rt = MegaContextRuntime(model, tokenizer, tree, budget_tokens=128, refocus_every=32,
                            lensnet=lensnet, allocator=FocusAllocator(), telemetry=Telemetry("chat"))
    rt.feed(tokenizer.encode("a long document ..."))                   # appended to the tree
    for token in rt.generate(64, temperature=0.0):                     # each one appended too
        print(tokenizer.decode([token]), end="")
    rt.close()                                                         # the last tokens to disk

The model's sequence. Slot 0 is always BOS and is not part of the tree (the convention of the
eval harness and the testbed's training rows); slots 1.. are the WC's slots (one per LOD0
token, one per gist, rotary position = slot index, gists fed through megacontext.base_inputs).
With the focus frozen at all-LOD0 (no LensNet, a budget that holds the whole history) the
sequence is exactly [BOS] + the history, and decoding gives exactly the tokens of
Engine.generate([BOS] + history, temperature=0) (tested).

The loop. The runtime keeps one KVCache of 1 + W + K slots. New tokens (fed or generated) are
appended to it as they come, so between two refocuses the sequence grows past W by at most
K. Every K tokens of history (counted across feed() and generate()) it refocuses:
  1. the tokens generated since the last refocus are appended to the tree;
  2. the WC of the last refocus grows to the new history with WorkingContext.extend, which
     keeps the budget by collapsing the oldest entries (budget-keeping collapses, logged);
  3. with a LensNet, it scores the WC and the allocator expands/collapses (a refocus whose
     scores are all invalid takes the allocator's documented recency fallback, logged);
     without one the focus is frozen: step 2 is the whole refocus;
  4. the KV cache is truncated to the first slot where the new WC differs from what the
     cache holds (KVCache.truncate, with the smear's input of the slot before it) and only
     the slots from there on are recomputed, in one chunked prefill (GPT.forward smears the
     first slot of a chunk with the cached one, so chunking changes nothing).
Gist-first decoding (optional: planner=megaprediction.Planner(heads, lod_mix)). At each block
boundary of the history (a multiple of 32 tokens) generate() first places the planner's plan
slots in the KV cache (the predicted LOD1 gist of the block about to be decoded, and with
lod_mix [1, 2] before it the predicted LOD2 gist of the next 1024 tokens), predicted from the
final hidden state at the last slot (megaprediction.capture_hidden, the LM head's input), and
then samples the block's tokens after them. Plan slots are never written to the tree and are
never WC entries: the next refocus (or feed) truncates the cache at the first plan slot and
rebuilds it from the tree's WC, so the model then reads the WC exactly as without a planner.
Plans are extra slots, not charged to the budget: the cache gets room for the plans of one
refocus interval. Without a planner nothing of this runs (the loop is bit-identical, tested).

Telemetry (megacontext/telemetry.py) gets one record per refocus (actions, budget collapses,
swap rate, residency, budget utilization, LOD histogram, refocus latency = extend + LensNet +
allocator, recompute latency, slots recomputed/reused, the actions with their pivot nodes, the
new WC's layout and, with a LensNet, its scores of the WC it scored) and one per decode stretch;
megacontext/viz.py replays them.

Bad input. An empty history is not an error: generate() then decodes from BOS alone, exactly
as Engine.generate([BOS]) would, and telemetry records that fallback. A tree opened read-only,
by another GistNet than the LensNet was trained on, or with an unfinished ingest of a source is
refused with one line naming the fix; so is a tree another process is writing (the tree's
single-writer lock, raised by open_tree) and one opened without a gister (the tree refuses the
first append). The runtime only ever appends to the tree through MegaContextTree.ingest,
whose commits are crash-safe: a killed run leaves a tree that reopens with a prefix of the
stream (at most the tokens generated since the last refocus are lost).

This module owns the decode loop and the KV cache bookkeeping. It never trains, never
changes the model's weights, never decides WC layouts itself (working_context.py and
allocator.py do) and never writes to the tree except by appending tokens.
"""

import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from megacontext import base_inputs
from megacontext.working_context import DroppedHistoryWarning, WorkingContext, TailGistCache
from nanochat.common import COMPUTE_DTYPE
from nanochat.engine import KVCache, sample_next_token
from nanochat.gpt import norm


def open_tree(directory, model, gistnet, model_name, *, create=True, durable=True, dtype="fp16"):
    """The tree in `directory`, opened writable with `gistnet` as its gister (created when it does
    not exist and create=True). Refuses a tree by another GistNet or base model, and one that
    another process is writing, with the tree's own one-line errors."""
    from pathlib import Path
    from megacontext.gistnet import token_embeddings
    from megacontext.tree import LEVEL_FILENAMES, MegaContextTree

    def embed_fn(ids):
        return token_embeddings(model, ids.to(model.get_device()))

    def gist_fn(x, level):
        with torch.no_grad():
            return gistnet(x.to(model.get_device()), level)

    identity = gistnet.identity()
    directory = Path(directory)
    if (directory / LEVEL_FILENAMES[0]).exists():
        return MegaContextTree.open(directory, expect_model_name=model_name, expect_gistnet=identity,
                                    embed_fn=embed_fn, gist_fn=gist_fn, durable=durable)
    if not create:
        raise FileNotFoundError(f"no MegaContext tree in {directory}; build one with megacontext.ingest")
    return MegaContextTree.create(directory, model_name=model_name, embedding_dim=model.config.n_embd,
                                  gistnet_name=identity, embed_fn=embed_fn, gist_fn=gist_fn,
                                  durable=durable, dtype=dtype)


def _unbudgeted(wc):
    """The same layout without a budget: what the KV cache holds may exceed W by the tokens
    appended since the last refocus."""
    return WorkingContext.from_entries(wc.entries, wc.history_len, None, wc.block_size, wc.tail_tokens)


class Focus:
    """LensNet + the allocator, with the per-node memory LensNet's features read (each node's last
    score and the refocus of its last change). One refocus() per refocus; the runtime and the
    eval harness's `megacontext` method both go through it, so they focus the same way.

    rounds > 1: a refocus scores and allocates again on its own result, up to `rounds` times
    while the WC still changes, so that a gist expanded in one round can have a child expanded
    in the next: a fact in a LOD2 span reaches LOD0 (LOD2 -> LOD1 -> LOD0) in the refocus that
    first sees the question, not K tokens later. Each round is one LensNet call and may make up
    to the allocator's max_changes."""

    def __init__(self, lensnet, allocator, rounds=1):
        if isinstance(rounds, bool) or int(rounds) != rounds or rounds < 1:
            raise ValueError(f"refocus rounds must be an integer >= 1, got {rounds!r}")
        self.lensnet, self.allocator, self.rounds = lensnet, allocator, int(rounds)
        self.last_score, self.last_change = {}, {}  # node (level, index) -> last score / refocus of its last change
        self.index = 0  # refocuses so far

    def refocus(self, wc, store, embed_fn, tail_gists=None):
        """Score wc (reading entry vectors from store) and apply the scores, `rounds` times at most
        -> the allocator's Refocus of the last round, with the actions and invalid scores of all
        rounds; self.last_scores holds the first round's scores (those of wc's entries)."""
        actions, invalid = [], 0
        for round_index in range(self.rounds):
            result, scores = self._round(wc, store, embed_fn, tail_gists)
            if round_index == 0:
                self.last_scores = scores  # for telemetry: the scores of the entries of the WC passed in
            actions += list(result.actions)
            invalid += result.invalid_scores
            if not result.actions or result.fallback is not None:
                break
            wc = result.wc
        self.index += 1
        return result._replace(actions=actions, invalid_scores=invalid)

    def _round(self, wc, store, embed_fn, tail_gists):
        nodes = [(e.level, e.index) for e in wc.entries]
        scores = self.lensnet.score_wc(
            wc, store, embed_fn, tail_gists=tail_gists,
            last_scores=np.array([self.last_score.get(v, 0.0) for v in nodes], dtype=np.float32),
            last_change=np.array([self.index - self.last_change.get(v, -1) for v in nodes], dtype=np.float32))
        result = self.allocator.refocus(wc, scores)
        for v, score in zip(nodes, np.nan_to_num(np.asarray(scores, dtype=np.float64))):
            self.last_score[v] = float(score)
        seen = set(nodes)
        for e in result.wc.entries:
            if (e.level, e.index) not in seen:
                self.last_change[(e.level, e.index)] = self.index
        return result, np.asarray(scores, dtype=np.float32)


class MegaContextRuntime:
    """Stream tokens into a tree and decode over its Working Context (see the module docstring)."""

    def __init__(self, model, tokenizer, tree, *, budget_tokens, refocus_every=32, lensnet=None, allocator=None,
                 telemetry=None, reuse_kv=True, lod1_tail=256, planner=None, refocus_rounds=1):
        if not tree.writable:
            raise ValueError(f"the tree at {tree.directory} is open read-only; the runtime appends to it: open it "
                             f"writable (megacontext.runtime.open_tree)")
        sources = tree.sources
        if sources and sources[-1]["tokens"] is None:
            raise ValueError(f"the tree at {tree.directory} has an unfinished ingest of {sources[-1].get('path')}; "
                             f"finish it first (re-run the same `python -m megacontext.ingest` command)")
        W, K, B = int(budget_tokens), int(refocus_every), tree.block_size
        if K < 1:
            raise ValueError(f"refocus_every must be >= 1, got {refocus_every}")
        if W < 2 * B:
            raise ValueError(f"budget_tokens {W} cannot hold the LOD0 tail (up to {2 * B - 1} tokens); use at least {2 * B}")
        capacity = 1 + W + K
        if planner is not None:  # plan slots of the block boundaries of one refocus interval
            if planner.heads.config.n_embd != model.config.n_embd:
                raise ValueError(f"the planner's MegaPrediction heads have n_embd={planner.heads.config.n_embd} but the "
                                 f"model has {model.config.n_embd}; use heads trained for this model")
            capacity += planner.slots * (K // B + 1)
        if capacity > model.cos.size(1):
            raise ValueError(f"1 + budget_tokens + refocus_every = {capacity} slots exceed the model's rotary "
                             f"cache ({model.cos.size(1)}); lower budget_tokens or refocus_every")
        if capacity > model.config.sequence_len:
            warnings.warn(f"1 + budget_tokens + refocus_every = {capacity} slots exceed the model's sequence_len "
                          f"{model.config.sequence_len}: it reads positions it was never trained on")
        if lensnet is not None and allocator is None:
            raise ValueError("a LensNet needs an allocator to apply its scores; pass allocator=FocusAllocator(...)")
        identity = getattr(lensnet, "gistnet_identity", None)
        if identity and tree.gistnet_name and identity != tree.gistnet_name:
            raise ValueError(f"LensNet was trained on gists of {identity} but the tree's gists are {tree.gistnet_name}; "
                             f"use a LensNet trained with that GistNet, or refresh the tree "
                             f"(python -m megacontext.ingest --refresh)")
        self.model = base_inputs.attach(model)
        self.tokenizer = tokenizer
        self.tree = tree
        self.budget_tokens, self.refocus_every, self.block_size = W, K, B
        self.lensnet, self.allocator, self.telemetry = lensnet, allocator, telemetry
        self.reuse_kv = reuse_kv
        self.device = model.get_device()
        self.bos = tokenizer.get_bos_token_id()
        c = model.config
        self.kv = KVCache(batch_size=1, num_heads=c.n_kv_head, seq_len=capacity, head_dim=c.n_embd // c.n_head,
                          num_layers=c.n_layer, device=self.device, dtype=COMPUTE_DTYPE)
        self.tail_cache = TailGistCache(tree, lod1_tail=lod1_tail) if lensnet is not None else None
        self.focus = Focus(lensnet, allocator, refocus_rounds) if lensnet is not None else None
        self._refocus_index = 0
        self._pending = []           # generated tokens not yet in the tree (appended at each refocus)
        self._since_refocus = 0      # tokens of history since the last refocus
        self._decode_tokens, self._decode_s = 0, 0.0  # the decode stretch since the last refocus
        self._logits = None          # (vocab,) logits of the last cached slot: the next token's distribution
        self.cached = None           # WC (no budget) that the KV cache holds after its BOS; None = empty cache
        self.planner = planner
        self._hidden = None          # (D,) final hidden state of the last cached slot (kept only with a planner)
        self._first_plan = None      # the first KV slot holding a plan (the cache holds WC slots up to it); None = none
        self._plan_slots = 0         # plan slots in the cache
        self._planned_at = None      # history length whose block boundary got its plans
        self.last = {}               # the last refocus's figures, for a status line
        N = tree.num_tokens
        self.wc = WorkingContext.recency(N, W, B) if N else WorkingContext([], 0, W, B)
        if N:  # a tree from disk: its recency WC (refocused once with a LensNet) goes into the cache
            self.refocus()

    # --- state ---

    @property
    def history_len(self):
        return self.tree.num_tokens + len(self._pending)

    @property
    def next_logits(self):
        """(vocab,) float32 logits of the next token given everything read so far (None before
        anything was read)."""
        return self._logits

    @property
    def current_wc(self):
        """The layout the model reads now: the last refocus's WC plus the tokens appended since."""
        return self.cached if self.cached is not None else self.wc

    # --- the sequence: slots -> model inputs ---

    def _read(self, wc, a, b):
        """Model inputs for WC slots [a, b): ids (T,), gist mask (T,), gist vectors (T, D) or None."""
        offsets = wc.slot_offsets
        k = int(np.searchsorted(offsets, a, side="right")) - 1
        ids, vectors, gist_at = [], [], []
        while k < len(wc) and offsets[k] < b:
            e = wc.entries[k]
            lo, hi = max(a, offsets[k]), min(b, offsets[k + 1])
            if e.level == 0:
                first = e.start + (lo - offsets[k])
                ids.append(self.tree.tokens(first, first + (hi - lo)))
            else:
                gist_at.append(sum(len(x) for x in ids))
                vectors.append(self.tree.gists(e.level, e.index, e.index + 1)[0])
                ids.append(np.zeros(1, dtype=np.int64))
            k += 1
        ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        mask = np.zeros(len(ids), dtype=bool)
        if not gist_at:
            return ids, mask, None
        mask[gist_at] = True
        full = np.zeros((len(ids), self.model.config.n_embd), dtype=np.float32)
        full[gist_at] = np.stack(vectors).astype(np.float32)
        return ids, mask, full

    def _kv_inputs(self, wc, s, e):
        """Model inputs for KV slots [s, e): slot 0 is BOS, slot j >= 1 is WC slot j - 1."""
        ids, mask, vectors = self._read(wc, max(s, 1) - 1, e - 1)
        if s == 0:
            ids, mask = np.concatenate([[self.bos], ids]), np.concatenate([[False], mask])
            if vectors is not None:
                vectors = np.concatenate([np.zeros((1, vectors.shape[1]), dtype=np.float32), vectors])
        idx = torch.from_numpy(ids.astype(np.int64)).view(1, -1).to(self.device)
        if vectors is None:
            return idx, None, None
        return (idx, torch.from_numpy(mask).view(1, -1).to(self.device),
                torch.from_numpy(vectors).unsqueeze(0).to(self.device))

    def _forward(self, idx, mask, vectors):
        if self.kv.get_pos() + idx.size(1) > self.kv.max_seq_len:  # the loop refocuses before this can happen
            raise RuntimeError(f"KV cache overflow: {self.kv.get_pos()} + {idx.size(1)} > {self.kv.max_seq_len} slots")
        if self.planner is not None:  # keep the last slot's hidden state: the next plan is predicted from it
            from megacontext.megaprediction import capture_hidden
            with capture_hidden(self.model) as cap:
                logits = self._forward_once(idx, mask, vectors)
            self._hidden = cap.hidden[0, -1]
            return logits
        return self._forward_once(idx, mask, vectors)

    def _forward_once(self, idx, mask, vectors):
        if mask is None:
            return self.model(idx, kv_cache=self.kv)
        with base_inputs.gist_inputs(self.model, mask, vectors):
            return self.model(idx, kv_cache=self.kv)

    def _place_plans(self):
        """Put the planner's plan slots for the block that starts now into the KV cache (never into
        the tree or the WC); the next token's logits then read them."""
        plans = self.planner.plans(self._hidden.view(1, -1))  # (1, slots, D)
        if self._first_plan is None:
            self._first_plan = self.kv.get_pos()
        idx = torch.zeros(1, plans.size(1), dtype=torch.long, device=self.device)
        mask = torch.ones(1, plans.size(1), dtype=torch.bool, device=self.device)
        self._logits = self._forward(idx, mask, plans.to(self.device))[0, -1]
        self._plan_slots += plans.size(1)
        self._planned_at = self.history_len

    def _embedding_at(self, wc, s):
        """The normed, pre-smear input embedding of KV slot s, as GPT.forward computes it (what
        the smear of slot s + 1 mixes in)."""
        idx, mask, vectors = self._kv_inputs(wc, s, s + 1)
        wte = self.model.transformer.wte
        if mask is None:
            x = wte(idx)
        else:
            with base_inputs.gist_inputs(self.model, mask, vectors):
                x = wte(idx)
        return norm(x.to(COMPUTE_DTYPE))

    @torch.no_grad()
    def _sync(self, target, reuse=True):
        """Bring the KV cache to [BOS] + `target`: keep the longest prefix it already holds and
        recompute the rest in one chunk (reuse=False: recompute all of it). Returns (chunk logits
        (T, V) of KV slots [s, end), s)."""
        end = 1 + target.cost
        pos = self.kv.get_pos()
        s = 0
        # plan slots sit in the cache beside the WC's slots: only the slots before the first one are the WC's
        if reuse and self.cached is not None and pos - self._plan_slots == 1 + self.cached.cost:
            k = self.cached.first_difference(target)
            s = 1 + int(self.cached.slot_offsets[k])
            if k < len(self.cached) and k < len(target):
                old, new = self.cached.entries[k], target.entries[k]
                if old.level == new.level == 0 and old.index == new.index:  # the same block, grown
                    s += min(old.cost, new.cost)
            if self._first_plan is not None:
                s = min(s, self._first_plan)
        if s >= end:
            if pos == end and not self._plan_slots:
                self.cached = _unbudgeted(target)
                return None, end
            s = end - 1  # nothing new, but the last slot's logits are needed
        self.kv.truncate(s, self._embedding_at(target, s - 1) if s > 0 else None)
        self._first_plan, self._plan_slots = None, 0  # truncated at or before the first plan slot
        logits = self._forward(*self._kv_inputs(target, s, end))[0]
        self.cached = _unbudgeted(target)
        self._logits = logits[-1]
        return logits, s

    # --- feeding and generating ---

    def _check_tokens(self, tokens):
        ids = np.asarray(tokens.detach().cpu() if isinstance(tokens, torch.Tensor) else tokens)
        if ids.size and (ids.ndim != 1 or ids.dtype.kind not in "iu"):
            raise ValueError(f"feed() takes a 1-D sequence of int token ids, got {ids.dtype} of shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.model.config.vocab_size):
            raise ValueError(f"token ids must be in 0..{self.model.config.vocab_size - 1} (the model's vocab), "
                             f"got range [{ids.min()}, {ids.max()}]")
        return ids.astype(np.int64).reshape(-1)

    def _flush(self):
        if self._pending:
            self.tree.ingest(self._pending)
            self._pending = []

    @torch.no_grad()
    def feed(self, tokens, score=False):
        """Append tokens to the history (tree, WC, KV cache), refocusing every K tokens. With
        score=True returns the summed NLL (nats) of these tokens as the model predicted them
        through the runtime's context, else None."""
        ids = self._check_tokens(tokens)
        self._flush()
        nll, i = 0.0, 0
        while i < len(ids):
            piece = ids[i:i + self.refocus_every - self._since_refocus]
            i += len(piece)
            previous = self._logits
            self.tree.ingest(piece)
            base = self.cached if self.cached is not None else _unbudgeted(self.wc)
            logits, s = self._sync(base.extend(self.history_len))
            if score:
                end = 1 + self.cached.cost
                first = end - len(piece) - 1  # the KV slot whose logits predict piece[0]
                if s > first:
                    logits = torch.cat([previous.view(1, -1), logits[:end - 1 - s]])
                else:
                    logits = logits[first - s:end - 1 - s]
                nll += F.cross_entropy(logits.float(), torch.from_numpy(piece).to(logits.device), reduction="sum").item()
            self._since_refocus += len(piece)
            if self._since_refocus >= self.refocus_every:
                self.refocus()
        return nll if score else None

    @torch.no_grad()
    def generate(self, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Yield up to max_tokens tokens sampled as Engine.generate samples them (same rng use),
        each appended to the history; refocuses every K tokens of history."""
        if self._logits is None:  # empty history: the model reads BOS alone
            if self.telemetry is not None:
                self.telemetry.log_fallback("empty history: generate() decodes from BOS alone")
            self._sync(WorkingContext([], 0, None, self.block_size))
        rng = torch.Generator(device=self.device)
        rng.manual_seed(seed)
        for _ in range(max_tokens):
            N = self.history_len
            if self.planner is not None and N and N % self.block_size == 0 and self._planned_at != N:
                self._place_plans()  # gist-first: the block's plans before its first token
            token = int(sample_next_token(self._logits.view(1, -1), rng, temperature, top_k)[0, 0])
            t0 = time.perf_counter()
            self._pending.append(token)
            idx = torch.tensor([[token]], dtype=torch.long, device=self.device)
            self._logits = self._forward(idx, None, None)[0, -1]
            self.cached = self.cached.extend(self.history_len)
            self._decode_tokens += 1
            self._decode_s += time.perf_counter() - t0
            self._since_refocus += 1
            if self._since_refocus >= self.refocus_every:
                self.refocus()
            yield token

    # --- refocus ---

    def _tail_gists(self):
        self.tail_cache.update()
        parts = [g for g in (self.tail_cache.lod2, self.tail_cache.lod1) if len(g)]
        return torch.cat(parts) if parts else None

    @torch.no_grad()
    def refocus(self):
        """Grow the WC to the history, refocus it (LensNet + allocator, if any), and recompute
        the KV cache from the first changed slot. Returns this refocus's telemetry figures."""
        self._flush()
        N = self.history_len
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DroppedHistoryWarning)
            grown = self.wc.extend(N)
        dropped = max(0, grown.start - self.wc.start) if len(self.wc) else 0
        for w in caught:  # say it again to the caller, and log it
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        before = {(e.level, e.index) for e in self.wc.entries}
        budget_collapses = sum(1 for e in grown.entries if e.level > 0 and (e.level, e.index) not in before)
        new, actions, fallback, scores = grown, [], None, None
        if self.focus is not None and len(grown):
            from megacontext.gistnet import token_embeddings
            embed_fn = lambda ids: token_embeddings(self.model, ids.to(self.device))
            result = self.focus.refocus(grown, self.tree, embed_fn, self._tail_gists())
            new, actions, fallback, scores = result.wc, list(result.actions), result.fallback, self.focus.last_scores
        refocus_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        held = 0 if self.cached is None else 1 + self.cached.cost
        _, s = self._sync(new, reuse=self.reuse_kv)
        recompute_s = time.perf_counter() - t1
        end = 1 + new.cost
        self.last = {"refocus_s": refocus_s, "recompute_s": recompute_s, "recomputed_slots": end - s,
                     "reusable_slots": min(s, held), "actions": len(actions), "budget_collapses": budget_collapses,
                     "dropped_tokens": dropped, "lod_histogram": [int((new.levels == lv).sum()) for lv in range(3)],
                     "entries": len(new), "cost": new.cost}
        if self.telemetry is not None:
            if fallback is not None:
                self.telemetry.log_fallback(f"allocator: every LensNet score invalid, {fallback} WC",
                                            step=self._refocus_index)
            for w in caught:
                self.telemetry.log({"event": "dropped_history", "message": str(w.message)}, step=self._refocus_index)
            if self._decode_tokens:
                self.telemetry.log_decode(self._decode_tokens, self._decode_s, step=self._refocus_index)
            record = self.telemetry.log_refocus(grown, new, len(actions), refocus_s, budget_collapses=budget_collapses,
                                                dropped_tokens=dropped, recomputed_slots=end - s,
                                                reusable_slots=min(s, held), step=self._refocus_index,
                                                history_tokens=N, recompute_s=recompute_s,
                                                actions_list=[tuple(a) for a in actions], scores=scores)
            self.last.update(swap_rate=record["swap_rate"], residency=record["residency"])
        self._decode_tokens, self._decode_s = 0, 0.0
        self.wc = new
        self._since_refocus = 0
        self._refocus_index += 1
        return self.last

    def close(self):
        """Append the generated tokens the tree does not have yet (and log the last decode stretch)."""
        self._flush()
        if self.telemetry is not None and self._decode_tokens:
            self.telemetry.log_decode(self._decode_tokens, self._decode_s, step=self._refocus_index)
        self._decode_tokens, self._decode_s = 0, 0.0
