"""
The Working Context (WC): what the base model actually reads out of a long history.

A WC is a list of entries that covers the history [start, N) contiguously, without gaps or
overlaps, each span present at one level of detail (B = block_size = 32):

    LOD0 entry (0, i): the token ids of block i, tokens [i*B, min((i+1)*B, N)); costs its
                       token count (B for a whole block, less for the partial last block)
    LOD1 entry (1, i): the gist of block i (a whole block), costs 1
    LOD2 entry (2, j): the gist of tokens [j*B*B, (j+1)*B*B), costs 1

Invariants of every WorkingContext (checked on construction):
  - entries are in history order and each starts where the previous one ends; the last ends
    at N; the first starts at `start` (0 unless the oldest part was dropped to fit the budget,
    and then always on a node boundary);
  - gists only stand for complete spans (a LOD1 gist for a whole block, a LOD2 gist for B
    whole blocks), so the partial last block is always LOD0;
  - the tail is LOD0: every token at position >= N - tail_tokens (default B, at least 1) is
    in a LOD0 entry (so the last whole block stays raw even right after a block boundary);
  - cost = sum of entry costs <= budget (budget None = unlimited).

Operations: expand(i) replaces a LOD2 gist by its B LOD1 gists, or a LOD1 gist by its
block's tokens (cost + B-1 either way); collapse(i) replaces B aligned sibling LOD1 gists by
their LOD2 gist, or a whole LOD0 block outside the tail by its LOD1 gist (cost - (B-1)).
expandable_mask() / collapsible_mask() say which entries may do so legally. Every operation
returns a new WorkingContext; a WC is immutable.

Constructors: recency() (the baseline), uniform(), random_mix() (training), pack() (from a
requested level per block), from_entries() (validated). to_tensors() turns a WC into the
inputs of the base model (see megacontext/base_inputs.py), reading tokens and gists from a
MegaContextTree or a TensorStore. TailGistCache keeps LOD2 gists plus the last K LOD1 gists
of a growing tree in memory, for LensNet.

This module only decides and checks layouts; it never scores entries (lensnet.py) and never
chooses which ones to change (allocator.py).
"""

import random
from typing import NamedTuple

import numpy as np
import torch

from megacontext.tree import node_children, node_span


class Entry(NamedTuple):
    """One WC entry: node (level, index) and the tokens [start, end) it stands for."""
    level: int
    index: int
    start: int
    end: int

    @property
    def cost(self):
        return self.end - self.start if self.level == 0 else 1


def _entry(level, index, history_len, block_size):
    start, end = node_span(level, index, block_size)
    return Entry(level, index, start, min(end, history_len) if level == 0 else end)


def _tail_start(history_len, tail_tokens, block_size):
    """First token of the blocks that must stay LOD0: the block holding token N - tail_tokens."""
    first = max(0, history_len - tail_tokens)
    return (first // block_size) * block_size


def _region(level, b0, b1, history_len, block_size):
    """Entries covering whole blocks [b0, b1) at `level`, as coarse as the alignment allows
    (LOD2 only for whole aligned groups inside the region; LOD1 for the blocks around them)."""
    B = block_size
    if level == 0:
        return [_entry(0, b, history_len, B) for b in range(b0, b1)]
    if level == 1:
        return [_entry(1, b, history_len, B) for b in range(b0, b1)]
    g0, g1 = -(-b0 // B), b1 // B
    if g0 >= g1:
        return [_entry(1, b, history_len, B) for b in range(b0, b1)]
    return ([_entry(1, b, history_len, B) for b in range(b0, g0 * B)]
            + [_entry(2, g, history_len, B) for g in range(g0, g1)]
            + [_entry(1, b, history_len, B) for b in range(g1 * B, b1)])


def _min_gist_cost(n_blocks, block_size):
    """Cost of blocks [0, n) in the cheapest cover: whole groups as LOD2, the rest LOD1."""
    return n_blocks // block_size + n_blocks % block_size


def _check_tail_fits(history_len, tail_tokens, block_size, budget):
    tail_cost = history_len - _tail_start(history_len, tail_tokens, block_size)
    if budget is not None and tail_cost > budget:
        raise ValueError(f"budget {budget} cannot hold the LOD0 tail ({tail_cost} tokens: the last "
                         f"{tail_tokens} tokens rounded out to whole blocks); raise the budget")


def _drop_oldest(entries, budget):
    """Drop entries from the old end until the cost fits (callers check that the tail fits)."""
    if budget is None:
        return entries
    cost = sum(e.cost for e in entries)
    k = 0
    while cost > budget and k < len(entries):
        cost -= entries[k].cost
        k += 1
    return entries[k:]


class _Rng:
    """One interface over random.Random, numpy Generators, torch Generators and int seeds."""

    def __init__(self, rng):
        if rng is None or isinstance(rng, (int, np.integer)):
            rng = random.Random(rng)
        self.rng = rng

    def random(self):
        if isinstance(self.rng, torch.Generator):
            return torch.rand((), generator=self.rng).item()
        return float(self.rng.random())

    def index(self, n):
        if isinstance(self.rng, random.Random):
            return self.rng.randrange(n)
        if isinstance(self.rng, np.random.Generator):
            return int(self.rng.integers(n))
        if isinstance(self.rng, torch.Generator):
            return int(torch.randint(n, (), generator=self.rng).item())
        raise TypeError(f"rng must be a random.Random, numpy Generator, torch Generator or int seed, "
                        f"got {type(self.rng).__name__}")


class WorkingContext:
    """An immutable, legal Working Context over a history of `history_len` tokens."""

    def __init__(self, entries, history_len, budget, block_size=32, tail_tokens=None, _check=True):
        self.entries = tuple(entries)
        self.history_len = int(history_len)
        self.budget = None if budget is None else int(budget)
        self.block_size = int(block_size)
        self.tail_tokens = self.block_size if tail_tokens is None else int(tail_tokens)
        self.cost = sum(e.cost for e in self.entries)
        if _check:
            self._validate()

    # --- construction ---

    @classmethod
    def from_entries(cls, entries, history_len, budget, block_size=32, tail_tokens=None):
        """A WC from (level, index) pairs (or Entry tuples), in history order. Raises ValueError
        naming the first broken invariant."""
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {block_size}")
        built = []
        for item in entries:
            level, index = int(item[0]), int(item[1])
            if level not in (0, 1, 2) or index < 0:
                raise ValueError(f"entry {tuple(item)!r} is not a (level 0..2, index >= 0) node")
            built.append(_entry(level, index, history_len, block_size))
        return cls(built, history_len, budget, block_size, tail_tokens)

    def _validate(self):
        N, B, W = self.history_len, self.block_size, self.budget
        if N < 0:
            raise ValueError(f"history_len must be >= 0, got {N}")
        if self.tail_tokens < 1:
            raise ValueError(f"tail_tokens must be >= 1 (the most recent tokens are always LOD0), "
                             f"got {self.tail_tokens}")
        if N == 0:
            if self.entries:
                raise ValueError("an empty history has an empty working context")
            return
        if not self.entries:
            raise ValueError(f"the working context is empty but the history has {N} tokens")
        for k, e in enumerate(self.entries):
            if e != _entry(e.level, e.index, N, B):
                raise ValueError(f"entry {k} {tuple(e)} does not match the span of node ({e.level}, {e.index})")
            if e.start >= N:
                raise ValueError(f"entry {k} (LOD{e.level} node {e.index}) starts at token {e.start}, "
                                 f"beyond the history of {N} tokens")
            if e.level > 0 and e.end > N:
                raise ValueError(f"entry {k} is a LOD{e.level} gist of tokens [{e.start}, {e.end}) but the history "
                                 f"has only {N} tokens; gists exist for complete spans only")
            if k and e.start != self.entries[k - 1].end:
                prev = self.entries[k - 1]
                what = "gap" if e.start > prev.end else "overlap"
                raise ValueError(f"entries {k - 1} and {k} leave a {what}: [{prev.start}, {prev.end}) then "
                                 f"[{e.start}, {e.end}); a working context is a contiguous cover")
        if self.entries[-1].end != N:
            raise ValueError(f"the working context ends at token {self.entries[-1].end}, not at the end of "
                             f"the history ({N}); the recent tail must be covered")
        tail = max(0, N - self.tail_tokens)
        if self.entries[0].start > tail:
            raise ValueError(f"the working context starts at token {self.entries[0].start}, inside the "
                             f"LOD0 tail (the last {self.tail_tokens} tokens)")
        for k, e in enumerate(self.entries):
            if e.end > tail and e.level != 0:
                raise ValueError(f"entry {k} is a LOD{e.level} gist of [{e.start}, {e.end}), inside the tail "
                                 f"(the last {self.tail_tokens} tokens must be LOD0)")
        if W is not None and self.cost > W:
            raise ValueError(f"the working context costs {self.cost} > budget {W}")

    def _new(self, entries):
        return WorkingContext(entries, self.history_len, self.budget, self.block_size, self.tail_tokens,
                              _check=False)

    @classmethod
    def pack(cls, history_len, block_levels, budget=None, block_size=32, tail_tokens=None, drop_oldest=False):
        """The WC closest to a requested level per block (array of 0/1/2, one per block incl. the
        partial last one): a block is never coarser than requested; LOD2 is used where a whole
        aligned group of B blocks asks for 2 (other blocks asking for 2 get LOD1); the tail and
        the partial block are LOD0. Over budget: ValueError, or with drop_oldest=True the oldest
        entries are dropped until it fits."""
        N, B = int(history_len), int(block_size)
        n_blocks = -(-N // B)
        levels = np.asarray(block_levels, dtype=np.int64).reshape(-1)
        if levels.size != n_blocks:
            raise ValueError(f"block_levels has {levels.size} entries but the history has {n_blocks} blocks")
        if levels.size and (levels.min() < 0 or levels.max() > 2):
            raise ValueError("block_levels must be 0, 1 or 2")
        tail_tokens = B if tail_tokens is None else tail_tokens
        levels = levels.copy()
        levels[_tail_start(N, tail_tokens, B) // B:] = 0
        entries, b = [], 0
        while b < n_blocks:
            if (levels[b] == 2 and b % B == 0 and b + B <= n_blocks
                    and (levels[b:b + B] == 2).all()):
                entries.append(_entry(2, b // B, N, B))
                b += B
                continue
            entries.append(_entry(min(int(levels[b]), 1), b, N, B))
            b += 1
        if drop_oldest:
            _check_tail_fits(N, tail_tokens, B, budget)
            entries = _drop_oldest(entries, budget)
        return cls(entries, N, budget, B, tail_tokens)

    @classmethod
    def recency(cls, history_len, budget, block_size=32, tail_tokens=None):
        """The recency baseline: the longest LOD0 suffix that fits, then the longest LOD1
        stretch before it that fits, then LOD2 (LOD1 for blocks of a group cut by the LOD1 or
        LOD0 stretch) back to the start of the history.

        Precisely: LOD0 starts at the earliest block k0 for which LOD0 [k0*B, N) plus the
        cheapest gist cover of [0, k0*B) (whole groups LOD2, the rest LOD1) fits in the budget;
        then the newest LOD2 gists become LOD1 (B-1 each) while that still fits. If even the
        cheapest cover of the whole history (tail LOD0, all else as coarse as possible) exceeds
        the budget, its oldest entries are dropped until it fits: the WC then starts later than
        token 0. A budget below the tail's own cost is a ValueError."""
        N, B = int(history_len), int(block_size)
        W = int(budget)
        tail_tokens = B if tail_tokens is None else int(tail_tokens)
        tb = _tail_start(N, tail_tokens, B) // B
        n_blocks = -(-N // B)
        _check_tail_fits(N, tail_tokens, B, W)

        def cost(k0):  # LOD0 from block k0 on, cheapest gists before
            return (N - k0 * B) + _min_gist_cost(k0, B)

        if cost(tb) > W:
            entries = _region(2, 0, tb, N, B) + _region(0, tb, n_blocks, N, B)
            return cls(_drop_oldest(entries, W), N, W, B, tail_tokens)
        lo, hi = 0, tb  # cost is non-increasing in k0: find the smallest k0 that fits
        while lo < hi:
            mid = (lo + hi) // 2
            if cost(mid) <= W:
                hi = mid
            else:
                lo = mid + 1
        k0 = lo
        spare = W - cost(k0)
        groups = k0 // B
        n_expand = min(groups, spare // (B - 1))
        g_split = groups - n_expand  # groups [g_split, groups) and blocks up to k0 are LOD1
        entries = (_region(2, 0, g_split * B, N, B) + _region(1, g_split * B, k0, N, B)
                   + _region(0, k0, n_blocks, N, B))
        return cls(entries, N, W, B, tail_tokens)

    @classmethod
    def uniform(cls, history_len, level, budget=None, block_size=32, tail_tokens=None):
        """Everything outside the LOD0 tail at `level` (for LOD2: whole groups, LOD1 for the
        blocks after the last whole group). With a budget, the oldest entries are dropped to
        fit, so uniform(N, 0, W) is 'the last W tokens' in whole blocks."""
        if level not in (0, 1, 2):
            raise ValueError(f"level must be 0, 1 or 2, got {level}")
        N, B = int(history_len), int(block_size)
        tail_tokens = B if tail_tokens is None else int(tail_tokens)
        tb = _tail_start(N, tail_tokens, B) // B
        entries = _region(level, 0, tb, N, B) + _region(0, tb, -(-N // B), N, B)
        _check_tail_fits(N, tail_tokens, B, budget)
        return cls(_drop_oldest(entries, budget), N, budget, B, tail_tokens)

    @classmethod
    def random_mix(cls, rng, history_len, budget, block_size=32, tail_tokens=None, fill=None):
        """A random legal mix of levels, for training: start from the cheapest cover (dropping
        the oldest part if needed, as recency() does), then expand randomly chosen gists, each
        uniformly among all gists, until a `fill` fraction of the spare budget is used (fill
        drawn uniformly from [0, 1] when None). rng: random.Random, numpy/torch Generator or seed."""
        N, B, W = int(history_len), int(block_size), int(budget)
        rng = _Rng(rng)
        wc = cls.uniform(N, 2, W, B, tail_tokens)
        fill = rng.random() if fill is None else float(fill)
        if not 0.0 <= fill <= 1.0:
            raise ValueError(f"fill must be in [0, 1], got {fill}")
        n_steps = int(fill * ((W - wc.cost) // (B - 1)))
        entries = list(wc.entries)
        for _ in range(n_steps):
            gist_at = [k for k, e in enumerate(entries) if e.level > 0]
            if not gist_at:
                break
            k = gist_at[rng.index(len(gist_at))]
            e = entries[k]
            entries[k:k + 1] = [_entry(lv, i, N, B) for lv, i in node_children(e.level, e.index, B)]
        return cls(entries, N, W, B, tail_tokens)

    # --- views ---

    def __len__(self):
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def __getitem__(self, i):
        return self.entries[i]

    def __eq__(self, other):
        return (isinstance(other, WorkingContext) and self.entries == other.entries
                and self.history_len == other.history_len and self.block_size == other.block_size)

    def __hash__(self):
        return hash((self.entries, self.history_len, self.block_size))

    def __repr__(self):
        counts = [int((self.levels == lv).sum()) for lv in range(3)]
        return (f"WorkingContext(history={self.history_len}, start={self.start}, entries={len(self)} "
                f"(LOD0/1/2 = {counts[0]}/{counts[1]}/{counts[2]}), cost={self.cost}, budget={self.budget})")

    @property
    def start(self):
        """First token covered (> 0 only when the oldest history was dropped to fit the budget)."""
        return self.entries[0].start if self.entries else 0

    @property
    def levels(self):
        return np.array([e.level for e in self.entries], dtype=np.int64)

    @property
    def costs(self):
        return np.array([e.cost for e in self.entries], dtype=np.int64)

    @property
    def spans(self):
        """(n, 2) array of [start, end) token spans, one row per entry."""
        return np.array([(e.start, e.end) for e in self.entries], dtype=np.int64).reshape(-1, 2)

    @property
    def utilization(self):
        """cost / budget (DESIGN.md's budget utilization)."""
        return self.cost / self.budget if self.budget else float("nan")

    # --- expand / collapse ---

    def can_expand(self, i):
        e = self.entries[i]
        return e.level > 0 and (self.budget is None or self.cost + self.block_size - 1 <= self.budget)

    def expandable_mask(self):
        """(n,) bool: entries whose expand() stays within the budget."""
        fits = self.budget is None or self.cost + self.block_size - 1 <= self.budget
        return self.levels > 0 if fits else np.zeros(len(self), dtype=bool)

    def expand(self, i):
        """A new WC with gist i replaced by its children (cost + B-1)."""
        e = self.entries[i]
        if e.level == 0:
            raise ValueError(f"entry {i} is LOD0 already; only gists expand")
        if not self.can_expand(i):
            raise ValueError(f"expanding entry {i} costs {self.block_size - 1} more, but the WC is at "
                             f"{self.cost} of budget {self.budget}")
        kids = [_entry(lv, k, self.history_len, self.block_size)
                for lv, k in node_children(e.level, e.index, self.block_size)]
        return self._new(self.entries[:i] + tuple(kids) + self.entries[i + 1:])

    def collapse_group(self, i):
        """(first, stop, parent) if entry i belongs to a group that may collapse into `parent`
        (level, index): a whole LOD0 block outside the tail (its own group), or B sibling LOD1
        gists all present. None otherwise."""
        e, B = self.entries[i], self.block_size
        if e.level == 0:
            whole = e.end - e.start == B
            if whole and e.end <= max(0, self.history_len - self.tail_tokens):
                return i, i + 1, (1, e.index)
            return None
        if e.level == 2:
            return None
        j = e.index // B
        first = i - (e.index - j * B)
        stop = first + B
        if first < 0 or stop > len(self.entries):
            return None
        for k in range(first, stop):
            if self.entries[k].level != 1:
                return None
        return first, stop, (2, j)

    def collapsible_mask(self):
        """(n,) bool: entries that are part of a group collapse() may merge."""
        mask = np.zeros(len(self), dtype=bool)
        i = 0
        while i < len(self):
            group = self.collapse_group(i)
            if group is None:
                i += 1
                continue
            mask[group[0]:group[1]] = True
            i = group[1]
        return mask

    def collapse(self, i):
        """A new WC with the group holding entry i replaced by its parent (cost - (B-1))."""
        group = self.collapse_group(i)
        if group is None:
            e = self.entries[i]
            raise ValueError(f"entry {i} (LOD{e.level} node {e.index}) cannot collapse: it needs all its "
                             f"{self.block_size} aligned siblings at its level, outside the LOD0 tail")
        first, stop, (level, index) = group
        parent = _entry(level, index, self.history_len, self.block_size)
        return self._new(self.entries[:first] + (parent,) + self.entries[stop:])

    # --- model inputs ---

    def to_tensors(self, store, embed_fn, gist_token_id=0, device=None, dtype=None):
        """The base model's inputs for this WC, one slot per LOD0 token and per gist:

            inputs_embeds (T, D)  token embeddings (embed_fn) for LOD0, gist vectors for gists
            token_ids     (T,)    LOD0 token ids; gist_token_id at gist slots (a valid id, so
                                  id-indexed lookups such as value embeddings never go out of range)
            gist_mask     (T,)    True at gist slots
            positions     (T,)    history position: the token's for LOD0, the span's first for gists
            lod           (T,)    level of each slot
            entry_index   (T,)    which WC entry each slot belongs to

        store: a MegaContextTree or a TensorStore (anything with tokens(start, end) and
        gists(level, i, j)). embed_fn(token_ids (n, L)) -> (n, L, D). Gists keep autograd when
        the store holds tensors that require grad."""
        if device is None:
            device = store.token_ids.device if isinstance(store, TensorStore) else torch.device("cpu")
        device = torch.device(device)
        # read each run of same-level entries with one call to the store
        runs, k, n = [], 0, len(self.entries)
        while k < n:
            stop = k
            while stop < n and self.entries[stop].level == self.entries[k].level:
                stop += 1
            runs.append((self.entries[k].level, k, stop))
            k = stop
        ids, lod, pos, owner, vectors = [], [], [], [], []
        for level, k, stop in runs:
            run = self.entries[k:stop]
            if level == 0:
                t = torch.as_tensor(store.tokens(run[0].start, run[-1].end)).to(device=device, dtype=torch.long)
                pos.append(torch.arange(run[0].start, run[-1].end, device=device))
                counts = torch.tensor([e.cost for e in run], device=device)
                vectors.append(None)  # embedded below, all LOD0 tokens in one embed_fn call
            else:
                g = store.gists(level, run[0].index, run[-1].index + 1)
                if not isinstance(g, torch.Tensor):
                    g = torch.from_numpy(np.array(g, dtype=np.float32))  # copy: the tree's are read-only maps
                t = torch.full((len(run),), gist_token_id, dtype=torch.long, device=device)
                pos.append(torch.tensor([e.start for e in run], device=device))
                counts = torch.ones(len(run), dtype=torch.long, device=device)
                vectors.append(g.to(device))
            ids.append(t)
            lod.append(torch.full((len(t),), level, dtype=torch.long, device=device))
            owner.append(torch.repeat_interleave(torch.arange(k, stop, device=device), counts))
        cat = lambda parts: torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)
        token_ids, lod = cat(ids), cat(lod)
        lod0_emb = None
        if (lod == 0).any():
            lod0_emb = embed_fn(token_ids[lod == 0].view(1, -1))[0]
        if dtype is None:
            dtype = lod0_emb.dtype if lod0_emb is not None else torch.float32
        pieces, used = [], 0
        for t, v in zip(ids, vectors):
            if v is None:
                pieces.append(lod0_emb[used:used + len(t)])
                used += len(t)
            else:
                pieces.append(v)
        dim = pieces[0].shape[-1] if pieces else 0
        inputs_embeds = (torch.cat([p.to(device=device, dtype=dtype) for p in pieces]) if pieces
                         else torch.zeros(0, dim, dtype=dtype, device=device))
        return {"inputs_embeds": inputs_embeds, "token_ids": token_ids, "gist_mask": lod > 0,
                "positions": cat(pos), "lod": lod, "entry_index": cat(owner)}


# -----------------------------------------------------------------------------
# Stores that to_tensors reads from


class TensorStore:
    """A history held in memory as tensors: token ids (N,) and gists per level, e.g. during
    training where the gists come straight out of GistNet and must keep their gradients."""

    def __init__(self, token_ids, lod1=None, lod2=None):
        self.token_ids = torch.as_tensor(token_ids).reshape(-1)
        self.lod1, self.lod2 = lod1, lod2

    def tokens(self, start, end):
        return self.token_ids[start:end]

    def gists(self, level, start, end):
        g = {1: self.lod1, 2: self.lod2}.get(level)
        if g is None or end > len(g):
            have = 0 if g is None else len(g)
            raise IndexError(f"LOD{level} gists [{start}, {end}) requested but the store holds {have}")
        return g[start:end]


class TailGistCache:
    """The gists LensNet looks at, kept in memory: all LOD2 gists plus the most recent
    `lod1_tail` LOD1 gists of a tree, grown incrementally by update() as the tree grows
    (a refresh of the tree's gists makes the next update() start over)."""

    def __init__(self, tree, lod1_tail=256, device="cpu", dtype=torch.float32):
        if lod1_tail < 0:
            raise ValueError(f"lod1_tail must be >= 0, got {lod1_tail}")
        self.tree = tree
        self.lod1_tail = int(lod1_tail)
        self.device = torch.device(device)
        self.dtype = dtype
        self._reset()
        self.update()

    def _reset(self):
        D = self.tree.embedding_dim
        self._lod2 = torch.zeros(0, D, dtype=self.dtype, device=self.device)  # capacity grows by doubling
        self._n2 = 0
        self._lod1 = torch.zeros(0, D, dtype=self.dtype, device=self.device)
        self.lod1_start = 0  # tree index of self.lod1[0]
        self._generation = getattr(self.tree, "generation", 0)

    def _read(self, level, start, end):
        g = np.asarray(self.tree.gists(level, start, end), dtype=np.float32)
        return torch.from_numpy(g).to(device=self.device, dtype=self.dtype)

    def update(self):
        """Read the gists committed since the last update; returns (new LOD1, new LOD2) counts."""
        if getattr(self.tree, "generation", 0) != self._generation:
            self._reset()
        n2 = self.tree.num_gists(2)
        new2 = n2 - self._n2
        if new2 > 0:
            if n2 > len(self._lod2):
                grown = torch.zeros(max(n2, 2 * len(self._lod2)), self._lod2.shape[1],
                                    dtype=self.dtype, device=self.device)
                grown[:self._n2] = self._lod2[:self._n2]
                self._lod2 = grown
            self._lod2[self._n2:n2] = self._read(2, self._n2, n2)
            self._n2 = n2
        n1 = self.tree.num_gists(1)
        old_end = self.lod1_start + len(self._lod1)
        new1 = n1 - old_end
        start = max(0, n1 - self.lod1_tail)
        if new1 > 0:
            if start >= old_end:
                self._lod1 = self._read(1, start, n1)
            else:
                self._lod1 = torch.cat([self._lod1[start - self.lod1_start:], self._read(1, old_end, n1)])
            self.lod1_start = start
        return max(new1, 0), max(new2, 0)

    @property
    def lod2(self):
        """(G, D): every LOD2 gist of the tree, oldest first."""
        return self._lod2[:self._n2]

    @property
    def lod1(self):
        """(k, D): the last k <= lod1_tail LOD1 gists; lod1[0] is tree gist lod1_start."""
        return self._lod1

    def gists(self, level, start, end):
        """Serve gists from the cache (IndexError outside what it holds), so a WC over recent
        history can be turned into tensors without touching the tree."""
        if level == 2 and 0 <= start <= end <= self._n2:
            return self._lod2[start:end]
        if level == 1 and self.lod1_start <= start <= end <= self.lod1_start + len(self._lod1):
            return self._lod1[start - self.lod1_start:end - self.lod1_start]
        raise IndexError(f"LOD{level} gists [{start}, {end}) are not in the cache")
