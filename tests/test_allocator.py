"""
Specification of megacontext/allocator.py: the Focus Allocator.

Property tests (hypothesis) over random histories, budgets, starting WCs, configs and scores
(NaN/+inf/-inf included) check after every refocus: the result is a legal WC (rebuilt through
WorkingContext.from_entries), within the budget, tail LOD0, covering the same history; at most
max_changes actions, each above its threshold, none on an invalid score; the actions replayed
one by one on the starting WC give the result; two fresh allocators agree; over a sequence
of refocuses no pivot changes again inside its cooldown and every recent undo clears the
hysteresis. Unit tests pin the individual rules and the error messages.
"""
import json
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.allocator import Action, AllocatorConfig, FocusAllocator
from megacontext.working_context import DroppedHistoryWarning, WorkingContext

SETTINGS = settings(max_examples=120, deadline=None)


# -----------------------------------------------------------------------------
# helpers

def check_legal(wc, start_wc):
    """Invariants every refocus result keeps, checked independently of the allocator."""
    rebuilt = WorkingContext.from_entries([(e.level, e.index) for e in wc.entries], wc.history_len,
                                          wc.budget, wc.block_size, wc.tail_tokens)  # raises if illegal
    assert rebuilt == wc
    assert wc.history_len == start_wc.history_len and wc.budget == start_wc.budget
    if wc.budget is not None:
        assert wc.cost <= wc.budget
    tail = max(0, wc.history_len - wc.tail_tokens)
    assert all(e.level == 0 for e in wc.entries if e.end > tail)
    if wc.entries:
        assert wc.entries[-1].end == wc.history_len


def replay(wc, actions):
    """Apply the listed actions one by one through WorkingContext's own operations."""
    B = wc.block_size
    for a in actions:
        nodes = [(e.level, e.index) for e in wc.entries]
        if a.kind == "expand":
            wc = wc.expand(nodes.index((a.level, a.index)))
        else:
            first_child = (0, a.index) if a.level == 1 else (1, a.index * B)
            k = nodes.index(first_child)
            assert wc.collapse_group(k)[2] == (a.level, a.index)
            wc = wc.collapse(k)
    return wc


def score_of(start_wc, scores, action):
    """The score an action should carry: its entry's, or its group's mean for a collapse."""
    B = start_wc.block_size
    nodes = [(e.level, e.index) for e in start_wc.entries]
    if action.kind == "expand":
        return scores[nodes.index((action.level, action.index))]
    if action.level == 1:
        members = [(0, action.index)]
    else:
        members = [(1, action.index * B + k) for k in range(B)]
    return float(np.mean([scores[nodes.index(m)] for m in members]))


def random_scores(seed, n, p_invalid, masked_wc=None):
    """Scores in [-1, 1] with a share of NaN/+inf/-inf; with masked_wc, LensNet-style: positive
    only where an entry may expand, negative only where it may collapse."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(-1, 1, n)
    if masked_wc is not None:
        s = np.where(s > 0, s * masked_wc.levels.clip(0, 1), s * masked_wc.collapsible_mask())
    bad = rng.random(n) < p_invalid
    s[bad] = rng.choice([np.nan, np.inf, -np.inf], size=int(bad.sum()))
    return s


@st.composite
def setups(draw):
    B = draw(st.sampled_from([4, 32]))
    N = draw(st.integers(0, 40_000 if B == 32 else 3_000))
    tail_tokens = draw(st.sampled_from([None, 1, 2 * B]))
    tail = B if tail_tokens is None else tail_tokens
    tail_cost = N - (max(0, N - tail) // B) * B
    W = draw(st.integers(max(tail_cost, 1), 3_000))
    seed = draw(st.integers(0, 2**31))
    kind = draw(st.sampled_from(["recency", "random_mix", "uniform1"]))
    if kind == "recency":
        wc = WorkingContext.recency(N, W, B, tail_tokens)
    elif kind == "random_mix":
        wc = WorkingContext.random_mix(seed, N, W, B, tail_tokens)
    else:
        wc = WorkingContext.uniform(N, 1, W, B, tail_tokens)
    return wc, seed


configs = st.builds(
    AllocatorConfig,
    tau_expand=st.sampled_from([0.0, 0.05, 0.3]),
    tau_collapse=st.sampled_from([0.0, 0.05, 0.3]),
    max_changes=st.integers(0, 8),
    cooldown=st.integers(0, 3),
    hysteresis=st.sampled_from([0.0, 0.1]),
    hysteresis_refocuses=st.integers(0, 5),
    make_room=st.booleans(),
    standalone_collapses=st.booleans(),
    on_all_invalid=st.sampled_from(["recency", "keep"]),
)


# -----------------------------------------------------------------------------
# properties

@SETTINGS
@given(setups(), configs, st.sampled_from([0.0, 0.1, 1.0]), st.booleans())
def test_one_refocus_keeps_every_invariant(setup, cfg, p_invalid, masked):
    wc, seed = setup
    scores = random_scores(seed, len(wc), p_invalid, wc if masked else None)
    out = FocusAllocator(cfg).refocus(wc, scores)
    check_legal(out.wc, wc)
    assert len(out.actions) <= cfg.max_changes
    assert out.invalid_scores == int((~np.isfinite(scores)).sum())
    again = FocusAllocator(cfg).refocus(wc, scores.copy())
    assert again.wc == out.wc and again.actions == out.actions and again.fallback == out.fallback
    if len(wc) and out.invalid_scores == len(wc):
        assert out.actions == [] and out.fallback == cfg.on_all_invalid
        expect = wc if cfg.on_all_invalid == "keep" else WorkingContext.recency(
            wc.history_len, wc.budget, wc.block_size, wc.tail_tokens)
        assert out.wc == expect
        return
    assert out.fallback is None
    assert replay(wc, out.actions) == out.wc
    pivots = [(a.level, a.index) for a in out.actions]
    assert len(set(pivots)) == len(pivots)  # one change per node per refocus
    for a in out.actions:
        score = score_of(wc, scores, a)
        assert np.isfinite(score) and score == pytest.approx(a.score)
        if a.kind == "expand":
            assert a.score > cfg.tau_expand
        else:
            assert a.score < (0.0 if cfg.make_room else -cfg.tau_collapse)
    if not cfg.standalone_collapses:  # every collapse is the first half of a pair: the budget stays spent
        kinds = [a.kind for a in out.actions]
        assert all(k == "expand" or kinds[i + 1:i + 2] == ["expand"] for i, k in enumerate(kinds))
        assert out.wc.cost >= wc.cost
    if not out.actions:
        assert out.wc is wc


@settings(max_examples=60, deadline=None)
@given(setups(), configs, st.integers(2, 7), st.booleans(), st.booleans())
def test_a_sequence_of_refocuses_respects_cooldown_and_hysteresis(setup, cfg, n_refocus, masked, grow):
    wc, seed = setup
    alloc = FocusAllocator(cfg)
    last = {}  # pivot -> refocus of its last change, kept independently of the allocator
    growth = np.random.default_rng(seed).integers(0, 300, n_refocus)
    for r in range(n_refocus):
        # the runtime's loop: the history grows between refocuses (budgets that can hold any tail)
        if grow and r and wc.budget >= wc.tail_tokens + 2 * wc.block_size:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DroppedHistoryWarning)
                wc = wc.extend(wc.history_len + int(growth[r]))
        scores = random_scores(seed + r, len(wc), 0.05, wc if masked else None)
        if r == n_refocus // 2:  # a state_dict round trip (through JSON) continues identically
            twin = FocusAllocator(cfg)
            twin.load_state_dict(json.loads(json.dumps(alloc.state_dict())))
            twin_out = twin.refocus(wc, scores)
        out = alloc.refocus(wc, scores)
        if r == n_refocus // 2:
            assert twin_out == out
        assert out.refocus_index == r
        check_legal(out.wc, wc)
        assert len(out.actions) <= cfg.max_changes
        for a in out.actions:
            pivot = (a.level, a.index)
            if pivot in last:
                age = r - last[pivot]
                assert age >= cfg.cooldown, f"{a} changed again {age} refocuses after its last change"
                if age < cfg.hysteresis_refocuses:
                    base = cfg.tau_expand if a.kind == "expand" else (0.0 if cfg.make_room else cfg.tau_collapse)
                    assert abs(a.score) > base + cfg.hysteresis
            last[pivot] = r
        if out.fallback is not None:
            last.clear()  # nothing to check across a fallback (it is not a list of actions)
        wc = out.wc


# -----------------------------------------------------------------------------
# the rules, one by one (B = 32, blocks 0..39, block 39 is the tail)

N40 = 40 * 32


def lod1_wc(budget=None, lod0_blocks=(38, 39)):
    """Blocks 0..39: LOD1 gists except lod0_blocks (raw)."""
    return WorkingContext.from_entries([(0 if b in lod0_blocks else 1, b) for b in range(40)], N40, budget)


def position(wc, node):
    return [(e.level, e.index) for e in wc.entries].index(node)


def test_a_positive_score_expands_that_gist():
    wc = lod1_wc(budget=1000)
    scores = np.zeros(len(wc))
    scores[5] = 0.7
    out = FocusAllocator().refocus(wc, scores)
    assert out.actions == [Action("expand", 1, 5, 0.7)]
    assert out.wc == wc.expand(5) and out.wc.cost == wc.cost + 31


def test_scores_within_tau_do_nothing():
    wc = lod1_wc(budget=1000)
    cfg = AllocatorConfig(tau_expand=0.1, tau_collapse=0.1)
    scores = np.linspace(-0.1, 0.1, len(wc))  # |score| <= tau everywhere
    out = FocusAllocator(cfg).refocus(wc, scores)
    assert out.actions == [] and out.wc is wc


def test_at_full_budget_an_expand_is_paired_with_the_lowest_scored_collapse():
    wc = lod1_wc()
    wc = WorkingContext.from_entries([(e.level, e.index) for e in wc], N40, budget=wc.cost)  # no room left
    scores = np.zeros(len(wc))
    scores[3] = 0.9
    scores[position(wc, (0, 38))] = -0.02  # weakly prefers less detail: only make_room takes it
    out = FocusAllocator().refocus(wc, scores)
    assert out.actions == [Action("collapse", 1, 38, -0.02), Action("expand", 1, 3, 0.9)]
    assert out.wc.cost == wc.cost
    strict = FocusAllocator(AllocatorConfig(make_room=False)).refocus(wc, scores)
    assert strict.actions == [] and strict.wc is wc
    # a pair counts as two changes: with one change left the expand is skipped
    capped = FocusAllocator(AllocatorConfig(max_changes=1)).refocus(wc, scores)
    assert capped.actions == []


def test_a_strong_collapse_happens_on_its_own_and_frees_room_first():
    wc = lod1_wc(budget=lod1_wc().cost)
    scores = np.zeros(len(wc))
    scores[3] = 0.5
    scores[position(wc, (0, 38))] = -0.8  # stronger than the expand: taken first, on its own
    out = FocusAllocator(AllocatorConfig(make_room=False)).refocus(wc, scores)
    assert out.actions == [Action("collapse", 1, 38, -0.8), Action("expand", 1, 3, 0.5)]
    check_legal(out.wc, wc)


def test_without_standalone_collapses_a_collapse_only_makes_room():
    wc = lod1_wc(budget=lod1_wc().cost)
    scores = np.zeros(len(wc))
    scores[position(wc, (0, 38))] = -0.8  # a strong wish for less detail, and no expand to make room for
    assert FocusAllocator().refocus(wc, scores).actions == [Action("collapse", 1, 38, -0.8)]
    paired_only = FocusAllocator(AllocatorConfig(standalone_collapses=False))
    out = paired_only.refocus(wc, scores)
    assert out.actions == [] and out.wc is wc
    scores[3] = 0.5  # now an expand needs the room: the collapse comes as its pair
    out = FocusAllocator(AllocatorConfig(standalone_collapses=False)).refocus(wc, scores)
    assert out.actions == [Action("collapse", 1, 38, -0.8), Action("expand", 1, 3, 0.5)]
    assert out.wc.cost == wc.cost


def test_greedy_order_is_by_strength_then_entry_order_and_capped():
    wc = lod1_wc(budget=5000)
    scores = np.zeros(len(wc))
    scores[[2, 7, 11, 20, 30]] = [0.4, 0.9, 0.4, 0.6, 0.4]
    out = FocusAllocator(AllocatorConfig(max_changes=3)).refocus(wc, scores)
    assert [(a.index, a.score) for a in out.actions] == [(7, 0.9), (20, 0.6), (2, 0.4)]


def test_expands_stop_at_the_budget():
    wc = lod1_wc()
    wc = WorkingContext.from_entries([(e.level, e.index) for e in wc], N40, budget=wc.cost + 2 * 31 + 5)
    scores = np.zeros(len(wc))
    scores[:10] = 0.5  # ten wishes, room for two (nothing negative to trade)
    out = FocusAllocator(AllocatorConfig(max_changes=10)).refocus(wc, scores)
    assert [a.index for a in out.actions] == [0, 1] and out.wc.cost <= wc.budget


def test_a_lod1_group_collapses_only_with_all_its_siblings():
    full = lod1_wc(budget=1000)  # LOD1 0..31 form the whole group of LOD2 gist 0
    out = FocusAllocator().refocus(full, np.full(len(full), -0.5))
    assert Action("collapse", 2, 0, -0.5) in out.actions
    assert out.wc.entries[0][:2] == (2, 0)
    # block 5 raw: the group is broken, so only the LOD0 block itself collapses this refocus
    broken = WorkingContext.from_entries([(0, 5) if b == 5 else (0 if b in (38, 39) else 1, b)
                                          for b in range(40)], N40, 1000)
    alloc = FocusAllocator()
    first = alloc.refocus(broken, np.full(len(broken), -0.5))
    assert [(a.kind, a.level, a.index) for a in first.actions] == [("collapse", 1, 5), ("collapse", 1, 38)]
    second = alloc.refocus(first.wc, np.full(len(first.wc), -0.5))  # now whole: LOD2 gist 0
    assert ("collapse", 2, 0) in [(a.kind, a.level, a.index) for a in second.actions]
    assert all(e.level == 0 for e in second.wc.entries[-1:])  # the tail never collapses


def test_a_group_mean_decides_and_an_expand_wish_inside_it_wins_when_stronger():
    wc = lod1_wc(budget=1000)
    scores = np.full(len(wc), -0.2)
    scores[4] = 0.9  # group mean still < -tau, but the expand is stronger and breaks the group
    out = FocusAllocator().refocus(wc, scores)
    kinds = [(a.kind, a.level, a.index) for a in out.actions]
    assert kinds[0] == ("expand", 1, 4) and ("collapse", 2, 0) not in kinds


def test_cooldown_blocks_an_undo_and_hysteresis_raises_its_threshold():
    cfg = AllocatorConfig(tau_expand=0.05, tau_collapse=0.05, cooldown=2, hysteresis=0.1)
    alloc = FocusAllocator(cfg)
    wc = lod1_wc(budget=1000)
    scores = np.zeros(len(wc))
    scores[3] = 0.5
    wc = alloc.refocus(wc, scores).wc  # refocus 0: expand gist 3 -> block 3 raw
    def undo(score):
        s = np.zeros(len(wc))
        s[position(wc, (0, 3))] = score
        return s
    held = alloc.refocus(wc, undo(-0.9))  # refocus 1: inside the cooldown
    assert held.actions == [] and held.cooled_down == 1 and held.wc is wc
    weak = alloc.refocus(wc, undo(-0.09))  # refocus 2: allowed, but -0.09 does not clear 0.05 + 0.1
    assert weak.actions == [] and weak.cooled_down == 0
    strong = alloc.refocus(wc, undo(-0.18))  # refocus 3: -0.18 clears it
    assert strong.actions == [Action("collapse", 1, 3, -0.18)]
    # a fresh allocator has no history: the weak undo is an ordinary collapse
    assert FocusAllocator(cfg).refocus(wc, undo(-0.09)).actions == [Action("collapse", 1, 3, -0.09)]


def test_old_changes_are_forgotten():
    cfg = AllocatorConfig(cooldown=1, hysteresis_refocuses=3)
    alloc = FocusAllocator(cfg)
    wc = lod1_wc(budget=1000)
    scores = np.zeros(len(wc))
    scores[3] = 0.5
    alloc.refocus(wc, scores)
    assert alloc.state_dict()["last_change"] == [[1, 3, 0]]
    for _ in range(3):
        alloc.refocus(wc, np.zeros(len(wc)))
    assert alloc.state_dict()["last_change"] == [] and alloc.refocus_count == 4
    alloc.reset()
    assert alloc.refocus_count == 0


def test_invalid_scores_are_counted_and_never_acted_on():
    wc = lod1_wc(budget=1000)
    scores = np.full(len(wc), -0.5)
    scores[0] = np.nan  # poisons the LOD1 group 0..31: it must not collapse
    scores[35] = np.inf  # an inf wish to expand is not a wish
    scores[36] = -np.inf
    out = FocusAllocator(AllocatorConfig(max_changes=8)).refocus(wc, scores)
    assert out.invalid_scores == 3 and out.fallback is None
    assert [(a.kind, a.level, a.index) for a in out.actions] == [("collapse", 1, 38)]


@pytest.mark.parametrize("policy", ["recency", "keep"])
def test_all_invalid_scores_fall_back_and_say_so(policy):
    wc = WorkingContext.random_mix(3, 5000, 600)
    out = FocusAllocator(AllocatorConfig(on_all_invalid=policy)).refocus(wc, np.full(len(wc), np.nan))
    assert out.fallback == policy and out.actions == [] and out.invalid_scores == len(wc)
    assert out.wc == (wc if policy == "keep" else WorkingContext.recency(5000, 600))
    assert wc != WorkingContext.recency(5000, 600)  # the fallback is visible, not a no-op


def test_torch_scores_and_an_empty_history():
    wc = lod1_wc(budget=1000)
    scores = torch.zeros(len(wc))
    scores[5] = 0.7
    assert FocusAllocator().refocus(wc, scores).actions[0][:3] == ("expand", 1, 5)
    empty = WorkingContext.recency(0, 64)
    out = FocusAllocator().refocus(empty, [])
    assert out.wc is empty and out.actions == [] and out.fallback is None


def test_bad_input_messages():
    wc = lod1_wc(budget=1000)
    with pytest.raises(ValueError, match="scores has 3 values but the working context has 40 entries"):
        FocusAllocator().refocus(wc, [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="cannot hold the LOD0 tail"):
        WorkingContext.recency(N40, 16)  # a budget smaller than the tail never makes a WC
    over = WorkingContext(wc.entries, N40, 50, _check=False)
    with pytest.raises(ValueError, match="costs 102 > its budget 50"):
        FocusAllocator().refocus(over, np.zeros(len(over)))
    with pytest.raises(ValueError, match="tau_expand must be a finite number >= 0"):
        AllocatorConfig(tau_expand=float("nan"))
    with pytest.raises(ValueError, match="max_changes must be an integer >= 0"):
        AllocatorConfig(max_changes=-1)
    with pytest.raises(ValueError, match="on_all_invalid must be 'recency' or 'keep'"):
        AllocatorConfig(on_all_invalid="random")
    state = FocusAllocator(AllocatorConfig(cooldown=5)).state_dict()
    with pytest.raises(ValueError, match="saved with config"):
        FocusAllocator().load_state_dict(state)
