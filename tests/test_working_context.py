"""
Specification of megacontext/working_context.py: the Working Context.

Every constructor and operation yields a legal WC (a contiguous, gap-free, non-overlapping
cover of the recent history, gists only for complete spans, the tail LOD0, cost within the
budget), checked here by an independent reference checker, mostly with hypothesis. Also:
the recency baseline's exact definition, expand/collapse round trips and costs, legality
masks that never allow a budget violation, validation messages, extend() following a
growing history (collapsing oldest first, dropping only with a warning), swap(),
first_difference(), slot offsets, to_tensors slot by slot, pack_batch's fixed-shape rows,
and the TailGistCache following a growing tree.
"""
import random
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.tree import BLOCK_SIZE, MegaContextTree
from megacontext.working_context import (DroppedHistoryWarning, Entry, TailGistCache, TensorStore, WorkingContext,
                                         pack_batch)

SETTINGS = settings(max_examples=60, deadline=None)


def reference_check(wc):
    """The WC invariants, written out independently of the module's own validation."""
    N, B, W, tail = wc.history_len, wc.block_size, wc.budget, wc.tail_tokens
    size = {0: B, 1: B, 2: B * B}
    covered = wc.entries[0].start if wc.entries else 0
    cost = 0
    for e in wc.entries:
        assert e.start == covered, f"gap or overlap at {e}"
        assert e.start == e.index * size[e.level], f"misaligned {e}"
        want_end = min(e.start + size[e.level], N) if e.level == 0 else e.start + size[e.level]
        assert e.end == want_end and e.end <= N and e.start < e.end, f"bad span {e}"
        if e.level > 0:
            assert e.end <= N  # complete spans only
        if e.end > N - tail:
            assert e.level == 0, f"gist {e} inside the tail"
        cost += (e.end - e.start) if e.level == 0 else 1
        covered = e.end
    assert covered == N
    assert (wc.entries[0].start if wc.entries else 0) <= max(0, N - tail)
    assert cost == wc.cost == int(wc.costs.sum())
    if W is not None:
        assert cost <= W


def block_levels(wc):
    """The level each block of the history ends up at (-1 for dropped blocks)."""
    B = wc.block_size
    out = np.full(-(-wc.history_len // B), -1)
    for e in wc.entries:
        out[e.start // B:-(-e.end // B)] = e.level
    return out


# histories with blocks of 4 reach LOD2 quickly; 32 is the real block size
histories = st.one_of(
    st.tuples(st.just(4), st.integers(0, 400)),
    st.tuples(st.just(32), st.integers(0, 6000)),
)


@st.composite
def history_and_budget(draw):
    B, N = draw(histories)
    tail_tokens = draw(st.sampled_from([None, 1, B, 3 * B]))
    tail = B if tail_tokens is None else tail_tokens
    tail_cost = N - (max(0, N - tail) // B) * B
    W = draw(st.integers(max(tail_cost, 1), max(tail_cost, 1) + 3 * B * B))
    return N, W, B, tail_tokens


# -----------------------------------------------------------------------------
# recency


@SETTINGS
@given(history_and_budget())
def test_recency_is_legal_and_maximal(args):
    N, W, B, tail_tokens = args
    wc = WorkingContext.recency(N, W, block_size=B, tail_tokens=tail_tokens)
    reference_check(wc)
    levels = block_levels(wc)
    kept = levels[levels >= 0]
    # levels never get finer going back in time: LOD2 ... LOD1 ... LOD0
    assert (np.diff(kept) <= 0).all()
    if wc.start > 0:
        # the oldest part is dropped only when even the cheapest cover does not fit
        cheapest = WorkingContext.uniform(N, 2, None, block_size=B, tail_tokens=tail_tokens)
        assert cheapest.cost > W
        # what is left is the newest part of that cheapest cover, dropping no more than needed
        assert wc.entries == cheapest.entries[-len(wc):]
        assert wc.cost == W  # every dropped entry was a gist of cost 1
        return
    # one more LOD0 block would not fit
    first_lod0 = int(np.argmax(levels == 0)) if (levels == 0).any() else len(levels)
    if first_lod0 > 0:
        more = levels.copy()
        more[first_lod0 - 1] = 0
        more[:first_lod0 - 1] = 2  # the rest as cheap as possible
        assert WorkingContext.pack(N, more, None, block_size=B, tail_tokens=tail_tokens).cost > W
    # and no LOD2 gist could become LOD1 gists
    assert (levels != 2).all() or wc.cost + B - 1 > W


def test_recency_worked_example():
    # 5000 tokens, budget 512: 156 whole blocks + 8 tokens
    wc = WorkingContext.recency(5000, 512)
    levels = [e.level for e in wc]
    assert levels == [2] * 4 + [1] * 13 + [0] * 16
    assert wc.cost == 4 + 13 + 15 * 32 + 8 == 505
    assert wc.entries[-1] == Entry(0, 156, 4992, 5000)
    # a bigger budget turns the newest LOD2 group into 32 LOD1 gists before adding LOD0 blocks
    assert [e.level for e in WorkingContext.recency(5000, 536)] == [2] * 4 + [1] * 12 + [0] * 17
    # at a group boundary one more LOD0 block costs 62 (it splits a LOD2 group); with 32 to
    # spare, the newest LOD2 gist becomes 32 LOD1 gists instead
    wide = WorkingContext.recency(5000, 940)
    assert [e.level for e in wide] == [2] * 3 + [1] * 32 + [0] * 29 and wide.cost == 939
    # a history that fits entirely is all LOD0
    assert set(e.level for e in WorkingContext.recency(300, 512)) == {0}


def test_recency_drops_the_oldest_part_when_even_lod2_does_not_fit():
    N = 1024 * 100 + 40  # 100 LOD2 groups + a block and 8 tokens
    wc = WorkingContext.recency(N, 60)
    reference_check(wc)
    # 40-token LOD0 tail (2 blocks: the last whole one and the partial one) + as many LOD2 as fit
    assert wc.cost == 60 and wc.start == 1024 * 80
    assert [e.level for e in wc] == [2] * 20 + [0] * 2
    with pytest.raises(ValueError, match="cannot hold the LOD0 tail"):
        WorkingContext.recency(N, 39)


# -----------------------------------------------------------------------------
# other constructors


@SETTINGS
@given(history_and_budget(), st.integers(0, 2**32 - 1), st.sampled_from(["random", "numpy", "torch", "int"]))
def test_random_mix_is_legal(args, seed, kind):
    N, W, B, tail_tokens = args
    rng = {"random": lambda: random.Random(seed), "numpy": lambda: np.random.default_rng(seed),
           "torch": lambda: torch.Generator().manual_seed(seed), "int": lambda: seed}[kind]
    wc = WorkingContext.random_mix(rng(), N, W, block_size=B, tail_tokens=tail_tokens)
    reference_check(wc)
    assert wc == WorkingContext.random_mix(rng(), N, W, block_size=B, tail_tokens=tail_tokens)  # reproducible
    full = WorkingContext.random_mix(rng(), N, W, block_size=B, tail_tokens=tail_tokens, fill=1.0)
    reference_check(full)
    assert not full.expandable_mask().any()  # fill=1 uses the budget up


def test_random_mix_varies_levels():
    mixes = {tuple(e.level for e in WorkingContext.random_mix(random.Random(s), 20000, 2048)) for s in range(20)}
    assert len(mixes) > 10
    assert any(1 in m and 2 in m and m.count(0) > 1 for m in mixes)


@SETTINGS
@given(histories, st.sampled_from([0, 1, 2]))
def test_uniform_levels(args, level):
    B, N = args
    wc = WorkingContext.uniform(N, level, block_size=B)
    reference_check(wc)
    levels = block_levels(wc)
    tail_blocks = -(-N // B) - max(0, N - B) // B
    assert (levels[len(levels) - tail_blocks:] == 0).all()
    body = levels[:len(levels) - tail_blocks]
    if level < 2:
        assert (body == level).all()
    else:  # LOD2 for every whole group of blocks before the tail, LOD1 for the rest
        groups = len(body) // B
        assert (body[:groups * B] == 2).all() and (body[groups * B:] == 1).all()


def test_uniform_from_a_start_keeps_groups_aligned_to_the_history():
    wc = WorkingContext.uniform(66 * 32, 2, start=64)  # blocks 2..65: group 1 (blocks 32..63) is whole
    assert [tuple(e[:2]) for e in wc] == [(1, b) for b in range(2, 32)] + [(2, 1), (1, 64), (0, 65)]
    assert wc.start == 64
    with pytest.raises(ValueError, match="start=16 must be a multiple of 32"):
        WorkingContext.uniform(66 * 32, 1, start=16)
    with pytest.raises(ValueError, match="between 0 and 2080"):
        WorkingContext.uniform(66 * 32, 1, start=66 * 32)


def test_uniform_lod0_with_budget_is_the_last_tokens():
    wc = WorkingContext.uniform(10_000, 0, 1000)
    assert wc.start == 10_000 - 16 - 30 * 32 and wc.cost == 16 + 30 * 32  # whole blocks only
    assert all(e.level == 0 for e in wc)


@SETTINGS
@given(histories, st.data())
def test_pack_is_never_coarser_than_asked(args, data):
    B, N = args
    n_blocks = -(-N // B)
    asked = np.array(data.draw(st.lists(st.integers(0, 2), min_size=n_blocks, max_size=n_blocks)), dtype=int)
    wc = WorkingContext.pack(N, asked, block_size=B)
    reference_check(wc)
    got = block_levels(wc)
    assert (got <= asked).all()
    # coarsening happens only where legality forces it: a block asking 2 gets 2 when its whole
    # aligned group asked 2, else 1 (0 in the tail or the partial block)
    tail_from = max(0, N - B) // B
    for b in range(tail_from):
        if asked[b] == 1:
            assert got[b] == 1
        if asked[b] == 2:
            g = b // B
            whole = (g + 1) * B <= tail_from and (asked[g * B:(g + 1) * B] == 2).all()
            assert got[b] == (2 if whole else 1)


def test_pack_over_budget():
    asked = np.zeros(40, dtype=int)
    with pytest.raises(ValueError, match="costs 1280 > budget 1000"):
        WorkingContext.pack(40 * 32, asked, 1000)
    wc = WorkingContext.pack(40 * 32, asked, 1000, drop_oldest=True)
    assert wc.cost == 992 and wc.start == 9 * 32


# -----------------------------------------------------------------------------
# expand / collapse


@st.composite
def any_wc(draw):
    N, W, B, tail_tokens = draw(history_and_budget())
    return WorkingContext.random_mix(random.Random(draw(st.integers(0, 10**6))), N, W, block_size=B,
                                     tail_tokens=tail_tokens)


@SETTINGS
@given(any_wc())
def test_expand_is_legal_costs_b_minus_1_and_collapses_back(wc):
    B = wc.block_size
    mask = wc.expandable_mask()
    for i, e in enumerate(wc):
        if not mask[i]:
            # the mask never allows a budget violation, and expand refuses what it refuses
            assert e.level == 0 or wc.cost + B - 1 > wc.budget
            with pytest.raises(ValueError):
                wc.expand(i)
            continue
        big = wc.expand(i)
        reference_check(big)
        assert big.cost == wc.cost + B - 1 <= wc.budget
        assert len(big) == len(wc) + (B - 1 if e.level == 2 else 0)
        assert big.collapse(i) == wc  # expand then collapse is the identity


@SETTINGS
@given(any_wc())
def test_collapse_is_legal_saves_b_minus_1_and_expands_back(wc):
    B = wc.block_size
    mask = wc.collapsible_mask()
    for i in range(len(wc)):
        group = wc.collapse_group(i)
        assert (group is not None) == bool(mask[i])
        if group is None:
            with pytest.raises(ValueError, match="cannot collapse"):
                wc.collapse(i)
            continue
        first, stop, _ = group
        small = wc.collapse(i)
        reference_check(small)
        assert small.cost == wc.cost - (B - 1)
        assert small.expand(first) == wc
        assert all(wc.collapse(k) == small for k in range(first, stop))  # any member names the group


def test_expand_collapse_by_hand():
    # 34 whole blocks and 5 tokens; only the last token has to stay LOD0
    wc = WorkingContext.from_entries([(2, 0), (1, 32), (0, 33), (0, 34)], 34 * 32 + 5, budget=2000, tail_tokens=1)
    assert wc.cost == 1 + 1 + 32 + 5
    assert list(wc.expandable_mask()) == [True, True, False, False]
    assert list(wc.collapsible_mask()) == [False, False, True, False]  # block 34 is partial
    lod1 = wc.expand(0)
    assert [tuple(e[:2]) for e in lod1][:33] == [(1, k) for k in range(33)]
    assert lod1.expand(5)[5] == Entry(0, 5, 160, 192)
    assert wc.collapse(2) == WorkingContext.from_entries([(2, 0), (1, 32), (1, 33), (0, 34)], 34 * 32 + 5, 2000,
                                                         tail_tokens=1)
    # with the default tail (the last 32 tokens), block 33 is inside it and must stay LOD0
    wide = WorkingContext.from_entries(wc.entries, wc.history_len, 2000)
    assert not wide.collapsible_mask().any()
    tight = WorkingContext.from_entries(wc.entries, wc.history_len, budget=wc.cost + 30, tail_tokens=1)
    assert not tight.expandable_mask().any()
    with pytest.raises(ValueError, match="costs 31 more"):
        tight.expand(0)
    with pytest.raises(ValueError, match="LOD0 already"):
        wc.expand(3)


# -----------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("entries, n, budget, match", [
    ([(0, 0), (0, 2)], 96, None, "leave a gap"),
    ([(2, 0), (1, 5), (0, 32)], 32 * 33, None, "leave a overlap"),
    ([(0, 0)], 64, None, "ends at token 32"),
    ([(0, 0), (1, 1)], 64, None, "inside the tail"),
    ([(0, 0), (1, 1)], 50, None, "gists exist for complete spans"),
    ([(2, 0)], 1000, None, "complete spans"),
    ([(0, 0), (0, 1)], 64, 63, "costs 64 > budget 63"),
    ([(0, 0), (0, 3)], 64, None, "beyond the history"),
    ([(3, 0)], 64, None, "not a"),
    ([], 64, None, "empty"),
])
def test_from_entries_refuses_illegal_layouts(entries, n, budget, match):
    with pytest.raises(ValueError, match=match):
        WorkingContext.from_entries(entries, n, budget)


def test_tail_is_at_least_one_token():
    with pytest.raises(ValueError, match="tail_tokens must be >= 1"):
        WorkingContext.recency(640, 100, tail_tokens=0)


def test_start_inside_the_tail_is_refused():
    with pytest.raises(ValueError, match="inside the LOD0 tail"):
        WorkingContext.from_entries([(0, 3)], 128, None, tail_tokens=64)
    WorkingContext.from_entries([(0, 2), (0, 3)], 128, None, tail_tokens=64)


def test_empty_history():
    wc = WorkingContext.recency(0, 100)
    assert len(wc) == 0 and wc.cost == 0
    out = wc.to_tensors(TensorStore(torch.zeros(0, dtype=torch.long)), lambda ids: torch.zeros(*ids.shape, 4))
    assert out["inputs_embeds"].shape == (0, 0) and out["token_ids"].shape == (0,)


# -----------------------------------------------------------------------------
# to_tensors


def make_history(N, D=8, B=32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(100, D, generator=g)
    ids = torch.randint(0, 100, (N,), generator=g)
    embed = lambda x: table[x]
    F = N // B
    lod1 = table[ids[:F * B]].view(F, B, D).mean(1)
    lod1.requires_grad_(requires_grad)
    lod2 = lod1[:(F // B) * B].view(-1, B, D).mean(1)
    return ids, embed, TensorStore(ids, lod1, lod2)


@settings(max_examples=25, deadline=None)
@given(history_and_budget(), st.integers(0, 1000))
def test_to_tensors_slot_by_slot(args, seed):
    N, W, B, tail_tokens = args
    ids, embed, store = make_history(N, B=B, seed=seed % 7)
    wc = WorkingContext.random_mix(random.Random(seed), N, W, block_size=B, tail_tokens=tail_tokens)
    out = wc.to_tensors(store, embed, gist_token_id=99)
    T = wc.cost
    for key in ("token_ids", "gist_mask", "positions", "token_positions", "lod", "entry_index"):
        assert out[key].shape == (T,), key
    assert torch.equal(out["positions"], torch.arange(T))  # the rotary index is the slot index
    assert out["inputs_embeds"].shape == (T, 8) if T else True
    slot = 0
    for k, e in enumerate(wc):
        n = e.cost
        sl = slice(slot, slot + n)
        assert (out["entry_index"][sl] == k).all() and (out["lod"][sl] == e.level).all()
        if e.level == 0:
            assert torch.equal(out["token_ids"][sl], ids[e.start:e.end])
            assert torch.equal(out["token_positions"][sl], torch.arange(e.start, e.end))
            assert torch.equal(out["inputs_embeds"][sl], embed(ids[e.start:e.end]))
            assert not out["gist_mask"][sl].any()
        else:
            assert out["token_ids"][slot] == 99 and out["gist_mask"][slot]
            assert out["token_positions"][slot] == e.start
            want = (store.lod1 if e.level == 1 else store.lod2)[e.index]
            assert torch.equal(out["inputs_embeds"][slot], want)
        slot += n
    assert slot == T


def test_all_lod0_is_exactly_the_token_path_and_gists_keep_gradients():
    ids, embed, store = make_history(700, requires_grad=True)
    lod0 = WorkingContext.uniform(700, 0).to_tensors(store, embed)
    assert torch.equal(lod0["token_ids"], ids) and torch.equal(lod0["inputs_embeds"], embed(ids))
    assert not lod0["gist_mask"].any() and torch.equal(lod0["token_positions"], torch.arange(700))
    mixed = WorkingContext.uniform(700, 1).to_tensors(store, embed)
    mixed["inputs_embeds"].sum().backward()
    assert store.lod1.grad is not None and store.lod1.grad[:20].abs().sum() > 0


# -----------------------------------------------------------------------------
# extend: a growing history


def grow(wc, n):
    """wc.extend(n), returning (new WC, DroppedHistoryWarnings raised)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = wc.extend(n)
    return out, [w for w in caught if issubclass(w.category, DroppedHistoryWarning)]


@SETTINGS
@given(any_wc(), st.integers(1, 3000))
def test_extend_keeps_every_invariant_and_only_coarsens(wc, step):
    B, W, N0 = wc.block_size, wc.budget, wc.history_len
    N = N0 + step
    tail_cost = N - (max(0, N - wc.tail_tokens) // B) * B
    if tail_cost > W:
        with pytest.raises(ValueError, match="cannot hold the LOD0 tail"):
            wc.extend(N)
        return
    new, dropped = grow(wc, N)
    reference_check(new)
    assert new.history_len == N and new.budget == W and new.tail_tokens == wc.tail_tokens
    assert new == grow(wc, N)[0]  # deterministic
    before, after = block_levels(wc), block_levels(new)
    n_old = len(before) - (1 if N0 % B else 0)  # whole blocks of the old history
    kept = after[:n_old] >= 0
    assert (after[:n_old][kept] >= before[:n_old][kept]).all()  # old blocks never get finer
    if not dropped:
        assert new.start == wc.start
    plain = list(wc.entries[:-1] if N0 % B else wc.entries)  # the partial last block regrows
    plain += [Entry(0, b, b * B, min((b + 1) * B, N)) for b in range(N0 // B, -(-N // B))]
    if sum(e.cost for e in plain) <= W:
        assert list(new.entries) == plain and not dropped  # fits: new tokens simply appended as LOD0
    elif not dropped:
        assert new.cost + B - 1 > W  # it collapsed only as much as needed
    else:
        # dropping only once nothing could collapse, with one warning naming the tokens dropped
        assert len(dropped) == 1 and new.start > wc.start
        assert not new.collapsible_mask().any()
        assert f"dropped the oldest {new.start - wc.start} tokens" in str(dropped[0].message)


@SETTINGS
@given(history_and_budget(), st.integers(1, 6000))
def test_extend_of_the_recency_baseline_is_the_recency_baseline(args, step):
    # oldest-first collapsing of a recency WC gives the recency WC of the longer history,
    # as long as neither has dropped history (extend cannot win back what was dropped)
    N, W, B, tail_tokens = args
    wc = WorkingContext.recency(N, W, block_size=B, tail_tokens=tail_tokens)
    tail = B if tail_tokens is None else tail_tokens
    tail_cost = (N + step) - (max(0, N + step - tail) // B) * B
    if wc.start > 0 or tail_cost > W:
        return
    want = WorkingContext.recency(N + step, W, block_size=B, tail_tokens=tail_tokens)
    if want.start == 0:
        assert wc.extend(N + step) == want


def test_extend_token_by_token_from_an_empty_history():
    wc = WorkingContext.recency(0, 200)
    for n in range(1, 3000):
        wc = wc.extend(n)
        assert wc.cost <= 200 and wc.entries[-1].end == n
    assert wc == WorkingContext.recency(2999, 200)
    assert wc.extend(2999) is wc


def test_extend_past_what_can_collapse_warns_and_moves_the_start():
    B = BLOCK_SIZE
    wc = WorkingContext.recency(40 * 1024, 110)  # 39 LOD2 + 31 LOD1 gists + the 32-token tail = 102
    assert wc.start == 0
    with pytest.warns(DroppedHistoryWarning, match=r"dropped the oldest \d+ tokens") as record:
        big = wc.extend(60 * 1024)
    reference_check(big)
    # 59 LOD2 + 31 LOD1 + 32 = 122 > 110 with nothing left to collapse: the 12 oldest LOD2 gists go
    assert big.start == 12 * 1024 and big.cost == 110
    assert f"dropped the oldest {big.start} tokens" in str(record[0].message)
    assert big.entries[-1] == Entry(0, 60 * B - 1, 60 * 1024 - B, 60 * 1024)
    with pytest.raises(ValueError, match="cannot hold the LOD0 tail"):
        WorkingContext.recency(20, 40).extend(20 + 2 * B)  # the tail alone needs 64 > 40
    with pytest.raises(ValueError, match="only grows a history"):
        wc.extend(100)

# -----------------------------------------------------------------------------
# swap and first_difference


@SETTINGS
@given(any_wc(), st.data())
def test_swap_is_collapse_then_expand_at_unchanged_cost(wc, data):
    n = len(wc)
    if n == 0:
        return
    i = data.draw(st.integers(0, n - 1))
    j = data.draw(st.integers(0, n - 1))
    group = wc.collapse_group(i)
    if group is None:
        with pytest.raises(ValueError, match="cannot collapse"):
            wc.swap(i, j)
        return
    first, stop, _ = group
    if first <= j < stop:
        with pytest.raises(ValueError, match="part of the group"):
            wc.swap(i, j)
        return
    if wc[j].level == 0:
        with pytest.raises(ValueError, match="LOD0 already"):
            wc.swap(i, j)
        return
    swapped = wc.swap(i, j)
    reference_check(swapped)
    assert swapped.cost == wc.cost
    assert swapped == wc.collapse(i).expand(j if j < first else j - (stop - first - 1))
    # the gist at j became its children, the group at i became its parent; nothing else moved
    assert wc[j] not in swapped.entries and all(wc[k] not in swapped.entries for k in range(first, stop))


def test_swap_works_at_full_budget_where_expand_alone_cannot():
    # 2 whole LOD1 blocks, 1 LOD1 and LOD0 tail; budget exactly used
    wc = WorkingContext.from_entries([(1, 0), (0, 1), (1, 2), (0, 3)], 4 * 32, budget=1 + 32 + 1 + 32)
    assert not wc.can_expand(0)
    swapped = wc.swap(1, 0)  # collapse block 1, expand gist 0
    assert [tuple(e[:2]) for e in swapped] == [(0, 0), (1, 1), (1, 2), (0, 3)] and swapped.cost == wc.cost
    with pytest.raises(ValueError, match="cannot collapse"):
        wc.swap(3, 0)  # the tail
    with pytest.raises(ValueError, match="LOD0 already"):
        wc.swap(1, 3)
    with pytest.raises(ValueError, match="part of the group"):
        wc.swap(1, 1)
    with pytest.raises(ValueError, match="not an entry index"):
        wc.swap(4, 0)


def test_first_difference():
    wc = WorkingContext.from_entries(WorkingContext.recency(5000, 600).entries, 5000, None)  # LOD2/1/0 x 4/10/19
    assert wc.first_difference(wc) == len(wc)
    assert wc.first_difference(wc.expand(3)) == wc.expand(3).first_difference(wc) == 3
    assert wc.first_difference(wc.collapse(20)) == 20
    short, long = WorkingContext.uniform(640, 0), WorkingContext.uniform(704, 0)
    assert short.first_difference(long) == long.first_difference(short) == len(short) == 20  # a prefix
    grown = WorkingContext.uniform(650, 0)  # the partial last block grows by one token
    assert grown.extend(651).first_difference(grown) == len(grown) - 1
    with pytest.raises(ValueError, match="same block_size"):
        wc.first_difference(WorkingContext.recency(100, 100, block_size=4))


@SETTINGS
@given(any_wc())
def test_slot_offsets_are_every_entrys_first_slot(wc):
    offsets = wc.slot_offsets
    assert offsets.shape == (len(wc) + 1,) and offsets[0] == 0 and offsets[-1] == wc.cost
    assert (np.diff(offsets) == wc.costs).all()


# -----------------------------------------------------------------------------
# pack_batch


def test_pack_batch_rows_slot_by_slot():
    B, H, D = BLOCK_SIZE, 5, 8
    ids, embed, store = make_history(3000, D=D)
    wcs = [WorkingContext.recency(3000, 200), WorkingContext.uniform(1500, 1),
           WorkingContext.random_mix(random.Random(3), 2500, 300)]
    horizons = torch.randint(0, 100, (3, H), generator=torch.Generator().manual_seed(9))
    out = pack_batch(wcs, store, horizons, n_embd=D, bos_id=7)
    T = 1 + max(wc.cost for wc in wcs) + H - 1
    assert out["idx"].shape == out["targets"].shape == out["gist_mask"].shape == (3, T)
    assert out["gist_vectors"].shape == (3, T, D) and out["gist_vectors"].dtype == torch.float32
    for b, wc in enumerate(wcs):
        P = 1 + wc.cost
        idx, tgt, mask, vec = (out[k][b] for k in ("idx", "targets", "gist_mask", "gist_vectors"))
        assert idx[0] == 7 and not mask[0]
        for k, e in enumerate(wc):
            at = 1 + int(wc.slot_offsets[k])
            if e.level == 0:
                assert torch.equal(idx[at:at + e.cost], ids[e.start:e.end]) and not mask[at:at + e.cost].any()
            else:
                assert idx[at] == 0 and mask[at]
                assert torch.equal(vec[at], (store.lod1 if e.level == 1 else store.lod2)[e.index])
        assert int(mask.sum()) == int((wc.levels > 0).sum()) and not vec[~mask].any()
        assert torch.equal(idx[P:P + H - 1], horizons[b, :-1]) and not idx[P + H - 1:].any()
        assert torch.equal(tgt[P - 1:P - 1 + H], horizons[b])  # the last context slot predicts horizon[0]
        assert (tgt[:P - 1] == -1).all() and (tgt[P - 1 + H:] == -1).all()


def test_pack_batch_has_fixed_shapes_with_a_length():
    ids, embed, store = make_history(4000, D=8)
    W, H = 256, 16
    length = 1 + W + H - 1
    shapes = set()
    for n in (10, 300, 1200, 4000):
        out = pack_batch([WorkingContext.recency(n, W), WorkingContext.uniform(n, 2, W)], store,
                         torch.zeros(2, H, dtype=torch.long), n_embd=8, bos_id=1, length=length)
        shapes.add(tuple((k, tuple(v.shape), v.dtype) for k, v in out.items()))
    assert len(shapes) == 1 and dict((k, s) for k, s, _ in next(iter(shapes)))["idx"] == (2, length)
    with pytest.raises(ValueError, match=r"row 0 needs 272 positions \(1 BOS \+ 256 WC slots \+ 15 horizon tokens\) "
                                         r"but length=200"):
        pack_batch([WorkingContext.uniform(4000, 0, W)], store, torch.zeros(1, H, dtype=torch.long), n_embd=8,
                   bos_id=1, length=200)


def test_pack_batch_of_an_all_lod0_wc_is_the_token_row():
    ids, embed, store = make_history(500, D=8)
    horizon = ids[400:410]
    out = pack_batch([WorkingContext.uniform(400, 0)], store, [horizon.tolist()], n_embd=8, bos_id=3)
    assert torch.equal(out["idx"][0], torch.cat([torch.tensor([3]), ids[:400], horizon[:-1]]))
    assert not out["gist_mask"].any() and not out["gist_vectors"].any()
    no_bos = pack_batch([WorkingContext.uniform(400, 0)], [store], horizon[None], n_embd=8)
    assert torch.equal(no_bos["idx"][0], torch.cat([ids[:400], horizon[:-1]]))
    assert torch.equal(no_bos["targets"][0, 399:], horizon)


def test_pack_batch_gradients_reach_the_stores_gists():
    ids, embed, store = make_history(2048, D=8, requires_grad=True)
    other = TensorStore(ids, store.lod1.detach().clone().requires_grad_(True))
    wcs = [WorkingContext.uniform(2048, 1), WorkingContext.uniform(1024, 1)]
    out = pack_batch(wcs, [store, other], torch.zeros(2, 4, dtype=torch.long), n_embd=8)
    weights = torch.randn(out["gist_vectors"].shape)
    (out["gist_vectors"] * weights).sum().backward()
    # each gist's gradient is the weight at its slot, in its own store
    slots = out["gist_mask"][0].nonzero().squeeze(1)
    assert torch.equal(store.lod1.grad[:len(slots)], weights[0, slots])
    assert store.lod1.grad[len(slots):].abs().sum() == 0
    assert torch.equal(other.lod1.grad[:31], weights[1, out["gist_mask"][1]])


def test_pack_batch_refuses_bad_input():
    ids, embed, store = make_history(300, D=8)
    wc = WorkingContext.uniform(300, 1)
    with pytest.raises(ValueError, match="different lengths"):
        pack_batch([wc, wc], store, [[1, 2], [1, 2, 3]], n_embd=8)
    with pytest.raises(ValueError, match=r"horizons must be \(B, H\)"):
        pack_batch([wc, wc], store, torch.zeros(3, 4, dtype=torch.long), n_embd=8)
    with pytest.raises(ValueError, match="2 stores for 1 working contexts"):
        pack_batch([wc], [store, store], torch.zeros(1, 4, dtype=torch.long), n_embd=8)
    with pytest.raises(ValueError, match=r"expected \(8, 16\)"):
        pack_batch([wc], store, torch.zeros(1, 4, dtype=torch.long), n_embd=16)
    with pytest.raises(ValueError, match="empty working context and no BOS"):
        pack_batch([WorkingContext.recency(0, 10)], store, torch.zeros(1, 4, dtype=torch.long), n_embd=8)


def test_pack_batch_reads_a_tree_like_a_tensor_store(tmp_path):
    B, D = 4, 6
    table = torch.randn(50, D)
    mean = lambda x, level: x.float().mean(dim=1)
    tree = MegaContextTree.create(tmp_path / "t", "m", D, "mean", embed_fn=lambda x: table[x], gist_fn=mean,
                                  block_size=B, dtype="bf16", durable=False)
    tree.ingest(np.random.default_rng(0).integers(0, 50, 150))
    store = TensorStore(torch.from_numpy(tree.tokens()), torch.from_numpy(tree.gists(1)), torch.from_numpy(tree.gists(2)))
    wc = WorkingContext.recency(150, 20, block_size=B)
    assert set(wc.levels) == {0, 1, 2}
    horizon = torch.tensor([[1, 2, 3]])
    from_tree, from_store = (pack_batch([wc], s, horizon, n_embd=D, bos_id=0) for s in (tree, store))
    assert all(torch.equal(from_tree[k], from_store[k]) for k in from_store)
    tree.close()


def test_tensor_store_window_uses_history_indices():
    ids = torch.arange(1000, 1064)
    lod1 = torch.randn(2, 4)
    store = TensorStore(ids, lod1, first_token=1024 + 64, first_lod1=34)
    assert torch.equal(store.tokens(1024 + 70, 1024 + 72), torch.tensor([1006, 1007]))
    assert torch.equal(store.gists(1, 35, 36), lod1[1:])
    with pytest.raises(IndexError, match=r"holds \[34, 36\)"):
        store.gists(1, 33, 35)
    with pytest.raises(IndexError, match="holds"):
        store.tokens(0, 10)


# -----------------------------------------------------------------------------
# TailGistCache


def test_tail_gist_cache_follows_a_growing_tree(tmp_path):
    B, D = 4, 6
    table = torch.randn(50, D)
    embed = lambda x: table[x]
    mean = lambda x, level: x.float().mean(dim=1)
    tree = MegaContextTree.create(tmp_path / "t", "m", D, "mean", embed_fn=embed, gist_fn=mean,
                                  block_size=B, dtype="bf16", durable=False, batch_blocks=3)
    cache = TailGistCache(tree, lod1_tail=10)
    assert cache.lod1.shape == (0, D) and cache.lod2.shape == (0, D)
    rng = np.random.default_rng(0)
    for n in [3, 1, 40, 0, 7, 150, 2, 33]:
        tree.ingest(rng.integers(0, 50, n))
        before = (cache.lod1_start + len(cache.lod1), len(cache.lod2))
        new1, new2 = cache.update()
        assert (new1, new2) == (tree.num_gists(1) - before[0], tree.num_gists(2) - before[1])
        n1 = tree.num_gists(1)
        assert cache.lod1_start == max(0, n1 - 10)
        assert torch.equal(cache.lod1, torch.from_numpy(tree.gists(1, cache.lod1_start, n1)))
        assert torch.equal(cache.lod2, torch.from_numpy(tree.gists(2)))
    # a WC over the cached range turns into tensors straight from the cache
    wc = WorkingContext.recency(tree.num_tokens, 40, block_size=B)
    assert torch.equal(wc.to_tensors(cache_and_tokens(cache, tree), embed)["inputs_embeds"],
                       wc.to_tensors(tree, embed)["inputs_embeds"])
    # refreshing the tree's gists makes the cache start over
    tree.refresh(lambda x, level: x.float().amax(dim=1), "max")
    cache.update()
    assert torch.equal(cache.lod2, torch.from_numpy(tree.gists(2)))
    with pytest.raises(IndexError, match="not in the cache"):
        cache.gists(1, 0, 1)
    tree.close()


class cache_and_tokens:
    def __init__(self, cache, tree):
        self.cache, self.tree = cache, tree

    def tokens(self, start, end):
        return self.tree.tokens(start, end)

    def gists(self, level, start, end):
        return self.cache.gists(level, start, end)
