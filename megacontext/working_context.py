"""
The Working Context (WC): what the base model actually reads out of a long history.

A WC is a list of entries that covers the history [start, N) contiguously, without gaps or
overlaps, each span present at one level of detail (B = block_size = tree.BLOCK_SIZE = 32):

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
expandable_mask() / collapsible_mask() say which entries may do so legally. swap(i, j) is
the paired collapse-then-expand an allocator makes at full budget. extend(N') follows a
growing history: new tokens arrive as LOD0, and when the budget is exceeded the oldest
collapsible entries collapse; only when nothing can collapse is the oldest history dropped,
always with a DroppedHistoryWarning. first_difference(other) is the first entry two WCs
disagree on (what a KV cache can keep). Every operation returns a new WorkingContext; a WC
is immutable.

Sequence slots. Each entry occupies `cost` consecutive slots of the base model's sequence
(one per LOD0 token, one per gist); slot_offsets gives every entry's first slot, and the
slot index is the rotary position (megacontext/base_inputs.py): a WC of any history is an
ordinary sequence of at most `budget` positions.

Constructors: recency() (the baseline), uniform(), random_mix() (training), pack() (from a
requested level per block), from_entries() (validated). to_tensors() turns one WC into
per-slot tensors; pack_batch() turns a batch of WCs plus their horizons into the inputs of
the base model (idx, targets, gist_mask, gist_vectors, fixed-shape with `length`), the one
packing that ΔNLL, training, the eval harness and the runtime share. Both read tokens and
gists from a MegaContextTree or a TensorStore. TailGistCache keeps LOD2 gists plus the last
K LOD1 gists of a growing tree in memory, for LensNet.

This module decides, checks and packs layouts; it never scores entries (lensnet.py) and never
chooses which ones to change (allocator.py).
"""

import random
import warnings
from typing import NamedTuple

import numpy as np
import torch

from megacontext.tree import BLOCK_SIZE, node_children, node_span


class DroppedHistoryWarning(UserWarning):
    """The oldest part of the history no longer fits the budget, even fully collapsed, and was dropped."""


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

    def __init__(self, entries, history_len, budget, block_size=BLOCK_SIZE, tail_tokens=None, _check=True):
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
    def from_entries(cls, entries, history_len, budget, block_size=BLOCK_SIZE, tail_tokens=None):
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
    def pack(cls, history_len, block_levels, budget=None, block_size=BLOCK_SIZE, tail_tokens=None, drop_oldest=False):
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
    def recency(cls, history_len, budget, block_size=BLOCK_SIZE, tail_tokens=None):
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
    def uniform(cls, history_len, level, budget=None, block_size=BLOCK_SIZE, tail_tokens=None, start=0):
        """Everything outside the LOD0 tail at `level` (for LOD2: whole aligned groups, LOD1
        for the blocks around them). With a budget, the oldest entries are dropped to fit, so
        uniform(N, 0, W) is 'the last W tokens' in whole blocks. start (a multiple of B, at
        most the tail's first token) leaves out the history before it: uniform(t, 1,
        start=t - C) is ΔNLL's LOD1 layout of the C tokens before t, its LOD2 groups still
        aligned to token 0 of the history."""
        if level not in (0, 1, 2):
            raise ValueError(f"level must be 0, 1 or 2, got {level}")
        N, B = int(history_len), int(block_size)
        tail_tokens = B if tail_tokens is None else int(tail_tokens)
        tb = _tail_start(N, tail_tokens, B) // B
        if start < 0 or start % B or start // B > tb:
            raise ValueError(f"start={start} must be a multiple of {B} between 0 and {tb * B} (the first token "
                             f"of the LOD0 tail)")
        entries = _region(level, start // B, tb, N, B) + _region(0, tb, -(-N // B), N, B)
        _check_tail_fits(N, tail_tokens, B, budget)
        return cls(_drop_oldest(entries, budget), N, budget, B, tail_tokens)

    @classmethod
    def random_mix(cls, rng, history_len, budget, block_size=BLOCK_SIZE, tail_tokens=None, fill=None):
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
    def slot_offsets(self):
        """(n + 1,) int64: the first sequence slot of every entry (a cumsum of costs from 0);
        entry k occupies slots [slot_offsets[k], slot_offsets[k + 1]) and slot_offsets[-1] == cost."""
        return np.concatenate([[0], np.cumsum(self.costs)]).astype(np.int64)

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

    def collapse_groups(self):
        """Every group collapse() may merge, in history order, as (first, stop, parent) (see collapse_group)."""
        i = 0
        while i < len(self):
            group = self.collapse_group(i)
            if group is None:
                i += 1
                continue
            yield group
            i = group[1]

    def collapsible_mask(self):
        """(n,) bool: entries that are part of a group collapse() may merge."""
        mask = np.zeros(len(self), dtype=bool)
        for first, stop, _ in self.collapse_groups():
            mask[first:stop] = True
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

    def swap(self, collapse_i, expand_j):
        """Collapse the group holding entry collapse_i, then expand entry expand_j (both
        indices into this WC): the paired move of an allocator at full budget, cost unchanged.
        ValueError if either half is illegal or expand_j lies inside the collapsing group."""
        n = len(self)
        for name, k in (("collapse_i", collapse_i), ("expand_j", expand_j)):
            if not 0 <= k < n:
                raise ValueError(f"swap: {name}={k} is not an entry index of this WC (0..{n - 1})")
        group = self.collapse_group(collapse_i)
        if group is None:
            self.collapse(collapse_i)  # raises the collapse error
        first, stop, _ = group
        if first <= expand_j < stop:
            raise ValueError(f"swap: entry {expand_j} is part of the group [{first}, {stop}) that collapsing entry "
                             f"{collapse_i} merges; expand an entry outside it")
        if self.entries[expand_j].level == 0:
            raise ValueError(f"swap: entry {expand_j} is LOD0 already; only gists expand")
        after = expand_j if expand_j < first else expand_j - (stop - first - 1)
        return self.collapse(collapse_i).expand(after)

    def extend(self, history_len):
        """This WC after the history grew to `history_len` tokens: the partial last block
        grows and new blocks are appended, all LOD0. Over budget, the oldest collapsible
        entries collapse first, in history order (a whole LOD0 block outside the tail to its
        LOD1 gist, B aligned LOD1 gists to their LOD2 gist, a collapse that completes an
        older group collapsing that group next), until the WC fits. Only if nothing can
        collapse are the oldest entries dropped, with a DroppedHistoryWarning naming how many
        tokens. Deterministic; a budget below the LOD0 tail's cost is a ValueError."""
        N0, N, B, W = self.history_len, int(history_len), self.block_size, self.budget
        if N < N0:
            raise ValueError(f"extend() only grows a history: {N} < {N0} tokens; build a new WC for a shorter one")
        if N == N0:
            return self
        entries = list(self.entries)
        first_new = N0 // B  # the partial last block (if any) grows, later blocks are new
        if entries and entries[-1].level == 0 and entries[-1].index == first_new:
            entries.pop()
        entries += [_entry(0, b, N, B) for b in range(first_new, -(-N // B))]
        cost = sum(e.cost for e in entries)
        if W is None or cost <= W:
            return WorkingContext(entries, N, W, B, self.tail_tokens, _check=False)
        _check_tail_fits(N, self.tail_tokens, B, W)
        # one pass from the oldest entry: every collapse before the current entry has been made,
        # so the first collapsible group of what is left is always the next one reached
        lod0_until = max(0, N - self.tail_tokens)  # a LOD0 block may collapse if it ends by here
        out, k = [], 0
        while k < len(entries) and cost > W:
            e = entries[k]
            k += 1
            if e.level == 0 and e.end - e.start == B and e.end <= lod0_until:
                e = _entry(1, e.index, N, B)
                cost -= B - 1
            out.append(e)
            if (cost > W and e.level == 1 and e.index % B == B - 1 and len(out) >= B
                    and out[-B].index == e.index - (B - 1) and all(x.level == 1 for x in out[-B:])):
                del out[-B:]  # the B LOD1 gists of an aligned group, all present
                out.append(_entry(2, e.index // B, N, B))
                cost -= B - 1
        out += entries[k:]
        if cost > W:
            old_start = out[0].start
            out = _drop_oldest(out, W)
            warnings.warn(f"working context over budget {W} with nothing left to collapse: dropped the oldest "
                          f"{out[0].start - old_start} tokens of the history (it now starts at token {out[0].start} "
                          f"of {N}); raise the budget to keep them", DroppedHistoryWarning, stacklevel=2)
        return WorkingContext(out, N, W, B, self.tail_tokens, _check=False)

    def first_difference(self, other):
        """Index of the first entry where this WC and `other` differ; min(len) when one is a
        prefix of the other (len when equal). Slots before slot_offsets[k] hold the same
        inputs in both, so a KV cache of them stays valid. A partial last block that grew
        counts as changed (its span differs), though its earlier slots are the same tokens."""
        if not isinstance(other, WorkingContext) or other.block_size != self.block_size:
            raise ValueError("first_difference compares two WorkingContexts of the same block_size")
        n = min(len(self), len(other))
        for k in range(n):
            if self.entries[k] != other.entries[k]:
                return k
        return n

    # --- model inputs ---

    def to_tensors(self, store, embed_fn, gist_token_id=0, device=None, dtype=None):
        """Per-slot tensors of this WC, one slot per LOD0 token and per gist:

            inputs_embeds   (T, D)  token embeddings (embed_fn) for LOD0, gist vectors for gists
            token_ids       (T,)    LOD0 token ids; gist_token_id at gist slots (a valid id, so
                                    id-indexed lookups such as value embeddings never go out of range)
            gist_mask       (T,)    True at gist slots
            positions       (T,)    the slot index 0..T-1: the base model's rotary position
            token_positions (T,)    history position: the token's for LOD0, the span's first for gists
            lod             (T,)    level of each slot
            entry_index     (T,)    which WC entry each slot belongs to

        store: a MegaContextTree or a TensorStore (anything with tokens(start, end) and
        gists(level, i, j)). embed_fn(token_ids (n, L)) -> (n, L, D). Gists keep autograd when
        the store holds tensors that require grad. For a batch of base-model rows use pack_batch."""
        device = torch.device(device) if device is not None else _store_device(store)
        ids, lod, pos, owner, vectors = [], [], [], [], []
        for level, k, stop in _runs(self.entries):
            run = self.entries[k:stop]
            if level == 0:
                t = _read_tokens(store, run[0].start, run[-1].end, device)
                pos.append(torch.arange(run[0].start, run[-1].end, device=device))
                counts = torch.tensor([e.cost for e in run], device=device)
                vectors.append(None)  # embedded below, all LOD0 tokens in one embed_fn call
            else:
                t = torch.full((len(run),), gist_token_id, dtype=torch.long, device=device)
                pos.append(torch.tensor([e.start for e in run], device=device))
                counts = torch.ones(len(run), dtype=torch.long, device=device)
                vectors.append(_read_gists(store, level, run[0].index, run[-1].index + 1, device))
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
                "positions": torch.arange(len(token_ids), device=device), "token_positions": cat(pos),
                "lod": lod, "entry_index": cat(owner)}


def _runs(entries):
    """(level, first, stop) for every maximal run of same-level entries: a run's nodes have
    consecutive indices (the cover is contiguous), so one store call reads it."""
    runs, k, n = [], 0, len(entries)
    while k < n:
        stop = k
        while stop < n and entries[stop].level == entries[k].level:
            stop += 1
        runs.append((entries[k].level, k, stop))
        k = stop
    return runs


def _store_device(store):
    return store.token_ids.device if isinstance(store, TensorStore) else torch.device("cpu")


def _read_tokens(store, start, end, device):
    return torch.as_tensor(store.tokens(start, end)).to(device=device, dtype=torch.long)


def _read_gists(store, level, start, end, device):
    g = store.gists(level, start, end)
    if not isinstance(g, torch.Tensor):
        g = torch.from_numpy(np.array(g, dtype=np.float32))  # copy: the tree's are read-only maps
    return g.to(device)

# -----------------------------------------------------------------------------
# A batch of WCs as the base model's inputs


def pack_batch(wcs, stores, horizons, *, n_embd, bos_id=None, length=None, device=None, dtype=torch.float32):
    """B working contexts and their horizons -> the inputs of the base model, as a dict of

        idx          (B, T) long   row b: [BOS] + the slots of wcs[b] + horizons[b][:-1];
                                   gist slots hold token 0 (any valid id: base_inputs ignores it)
        targets      (B, T) long   -1 except the H positions predicting the horizon (the last
                                   context slot predicts horizons[b][0])
        gist_mask    (B, T) bool   True at gist slots
        gist_vectors (B, T, D)     the gists at gist slots, 0 elsewhere (autograd reaches the
                                   store's gist tensors, e.g. GistNet outputs in a TensorStore)

    feed them as `with base_inputs.gist_inputs(model, gist_mask, gist_vectors): model(idx, targets)`.
    Rows are right-padded to `length` (default: the longest row) with token 0, target -1 and
    no gist; causal attention and the smear only look back, so padding changes nothing before
    it. A fixed `length` (e.g. 1 + budget + H - 1) gives the same shapes and dtypes on every
    call, so a compiled model runs without recompiling; a row longer than `length` is a
    ValueError. stores: one per WC, or one shared by all (tree or TensorStore). horizons: a
    (B, H) tensor or B equal-length sequences of token ids. device: default that of a horizons
    tensor, else of the first TensorStore, else CPU. dtype: of gist_vectors (float32 holds
    fp16/bf16/fp32 gists exactly; the model casts them to its own dtype)."""
    wcs = list(wcs)
    B = len(wcs)
    if B == 0:
        raise ValueError("pack_batch needs at least one working context")
    if isinstance(stores, (list, tuple)):
        if len(stores) != B:
            raise ValueError(f"pack_batch got {len(stores)} stores for {B} working contexts; pass one per WC "
                             f"or a single shared store")
    else:
        stores = [stores] * B
    if device is None:
        device = horizons.device if isinstance(horizons, torch.Tensor) else _store_device(stores[0])
    device = torch.device(device)
    horizons = _as_horizons(horizons, B, device)
    H = horizons.size(1)
    head = 0 if bos_id is None else 1
    n_context = [head + wc.cost for wc in wcs]
    for b, P in enumerate(n_context):
        if P < 1:
            raise ValueError(f"row {b} has an empty working context and no BOS; the first horizon token needs a "
                             f"position to be predicted from")
    row_lens = [P + H - 1 for P in n_context]
    T = max(row_lens) if length is None else int(length)
    for b, n in enumerate(row_lens):
        if n > T:
            raise ValueError(f"row {b} needs {n} positions ({head} BOS + {wcs[b].cost} WC slots + {H - 1} horizon "
                             f"tokens) but length={T}; raise length or lower the WC's budget")
    if T < 2:
        raise ValueError("context + horizon must span at least 2 positions (GPT.forward needs T > 1)")
    idx = torch.zeros(B, T, dtype=torch.long, device=device)
    targets = torch.full((B, T), -1, dtype=torch.long, device=device)
    gist_mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    gist_at, gists = [], []  # flat slot b * T + t of every gist, and the gists themselves
    for b, (wc, store) in enumerate(zip(wcs, stores)):
        pieces = [] if bos_id is None else [torch.tensor([bos_id], dtype=torch.long, device=device)]
        slot = head
        for level, k, stop in _runs(wc.entries):
            run = wc.entries[k:stop]
            if level == 0:
                pieces.append(_read_tokens(store, run[0].start, run[-1].end, device))
            else:
                g = _read_gists(store, level, run[0].index, run[-1].index + 1, device)
                if g.ndim != 2 or g.shape != (len(run), n_embd):
                    raise ValueError(f"the store's LOD{level} gists [{run[0].index}, {run[-1].index + 1}) have shape "
                                     f"{tuple(g.shape)}, expected ({len(run)}, {n_embd}) (n_embd)")
                pieces.append(torch.zeros(len(run), dtype=torch.long, device=device))
                gist_at.append(torch.arange(b * T + slot, b * T + slot + len(run), device=device))
                gists.append(g)
            slot += len(pieces[-1])
        seq = torch.cat(pieces + [horizons[b, :-1]])
        P = n_context[b]
        idx[b, :len(seq)] = seq
        targets[b, P - 1:P - 1 + H] = horizons[b]
    vectors = torch.zeros(B * T, n_embd, dtype=dtype, device=device)
    if gists:
        at = torch.cat(gist_at)
        gist_mask.view(-1)[at] = True
        # out-of-place, so autograd carries the gradient back into the gist tensors
        vectors = vectors.index_copy(0, at, torch.cat([g.to(dtype) for g in gists]))
    return {"idx": idx, "targets": targets, "gist_mask": gist_mask, "gist_vectors": vectors.view(B, T, n_embd)}


def _as_horizons(horizons, n_rows, device):
    if isinstance(horizons, torch.Tensor):
        h = horizons
    else:
        rows = [torch.as_tensor(np.asarray(r) if not isinstance(r, torch.Tensor) else r) for r in horizons]
        lengths = sorted({len(r) for r in rows})
        if len(lengths) > 1:
            raise ValueError(f"horizons have different lengths {lengths}; pack rows of one horizon length together")
        h = torch.stack(rows) if rows else torch.zeros(0, 0, dtype=torch.long)
    if h.ndim != 2 or h.size(0) != n_rows or h.size(1) < 1 or h.is_floating_point() or h.dtype == torch.bool:
        raise ValueError(f"horizons must be (B, H) token ids with B = {n_rows} rows and H >= 1, got {h.dtype} of "
                         f"shape {tuple(h.shape)}")
    return h.to(device=device, dtype=torch.long)


# -----------------------------------------------------------------------------
# Stores that to_tensors and pack_batch read from


class TensorStore:
    """A history held in memory as tensors: token ids and gists per level, e.g. during
    training where the gists come straight out of GistNet and must keep their gradients.
    It may hold a window of a longer history: token_ids[0] is token first_token, lod1[0] is
    LOD1 gist first_lod1 and lod2[0] LOD2 gist first_lod2 (all 0 by default)."""

    def __init__(self, token_ids, lod1=None, lod2=None, first_token=0, first_lod1=0, first_lod2=0):
        self.token_ids = torch.as_tensor(token_ids).reshape(-1)
        self.lod1, self.lod2 = lod1, lod2
        self.first_token, self.first = int(first_token), {1: int(first_lod1), 2: int(first_lod2)}

    def tokens(self, start, end):
        lo, hi = start - self.first_token, end - self.first_token
        if lo < 0 or hi > len(self.token_ids):
            raise IndexError(f"tokens [{start}, {end}) requested but the store holds [{self.first_token}, "
                             f"{self.first_token + len(self.token_ids)})")
        return self.token_ids[lo:hi]

    def gists(self, level, start, end):
        g = {1: self.lod1, 2: self.lod2}.get(level)
        first = self.first.get(level, 0)
        if g is None or start < first or end - first > len(g):
            have = 0 if g is None else len(g)
            raise IndexError(f"LOD{level} gists [{start}, {end}) requested but the store holds [{first}, "
                             f"{first + have})")
        return g[start - first:end - first]


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
