"""
The Focus Allocator: turns LensNet's scores into expand/collapse actions on a Working Context.

One call of refocus(wc, scores) is one refocus. scores hold one float per WC entry: positive =
worth expanding (more detail), negative = worth collapsing (less detail), 0 = leave it.

Rules (B = block size, 32; tau_e = tau_expand, tau_c = tau_collapse):

  Candidates. A gist entry (LOD1/LOD2) is an expand candidate when its score > tau_e. A
    collapse candidate is a whole group that WorkingContext.collapse() may merge: a whole
    LOD0 block outside the tail (-> its LOD1 gist) or all B aligned sibling LOD1 gists
    (-> their LOD2 gist); a group's score is the mean of its members' scores, and it is a
    candidate when that mean < -tau_c. A LOD2 gist never collapses (it is the root level)
    and the tail never collapses (WorkingContext enforces it).
  Invalid scores. NaN and +-inf scores are invalid: they count in Refocus.invalid_scores,
    their entry is treated as score 0 and is never acted on, and a group holding one never
    collapses. If every score is invalid (a broken scorer), the allocator does not guess:
    with on_all_invalid="recency" (default) it returns the recency baseline WC of the same
    history and budget (WorkingContext.recency; all LOD0 with no budget), with
    on_all_invalid="keep" the WC unchanged;
    either way Refocus.fallback names what happened so telemetry reports it, and no actions
    are listed or remembered.
  Greedy order. Candidates are taken strongest first: by |score| descending, ties by entry
    position (an expand before a collapse at the same position); no randomness, so the same
    (state, wc, scores) always gives the same result. A collapse is applied on its own. An
    expand (cost + B-1) is applied if it fits the budget; if not, it is paired with a collapse
    that makes room (WorkingContext.swap: collapse first, then expand, cost unchanged): the
    lowest-scored intact collapse group that does not hold the expanded entry, whose score is
    < -tau_c, or with make_room=True (default) any such group with a score < 0 (its score < 0 <
    the expand's, so detail moves from where the scorer wants less to where it wants more);
    the paired collapse obeys the cooldown and hysteresis too. An expand that finds no room
    is skipped.
  Standalone collapses. standalone_collapses=False drops the collapse candidates: a group then
    collapses only paired with an expand that needs its room (above), so the budget stays spent
    and detail only moves. On the CPU testbed a LensNet's lone collapses of recent LOD0 blocks cost
    natural-text bpb (budget utilization ~0.4); without them it used ~0.83 (docs/benchmarks.md).
  One change per node per refocus. Every action names its pivot node (level, index): the gist
    that expands, or the parent gist a group collapses into; expand and collapse of the same
    pivot are each other's inverse. Entries created by this refocus are not touched again in it,
    and candidates whose entries were consumed by an earlier action are dropped.
  Cooldown. A pivot changed at refocus r may not change again before refocus r + cooldown
    (so nothing is undone at once; cooldown=0 disables it). Candidates held back count in
    Refocus.cooled_down.
  Hysteresis. For hysteresis_refocuses refocuses after a pivot changed, changing it again
    needs |score| > tau + hysteresis (the threshold to undo a recent change is raised).
  Cap. At most max_changes actions per refocus; a paired collapse + expand counts as 2.
  Budget. The result never costs more than wc.budget (every step is checked), is a legal
    WorkingContext (contiguous, gap-free, tail LOD0) and covers the same history.

Action(kind, level, index, score): kind "expand" | "collapse", (level, index) the pivot node,
score the score that triggered it (the group mean for a collapse).

The allocator's state (refocus count, recent changes per pivot) is small and bounded: changes
older than max(cooldown, hysteresis_refocuses) refocuses are forgotten. state_dict() is plain
ints and strings (JSON- and torch.save-friendly); reset() starts over for a new document.

This module only chooses actions; it never scores entries (lensnet.py), never checks WC
legality itself (working_context.py does) and never reads the tree.
"""

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

from megacontext.working_context import WorkingContext


@dataclass
class AllocatorConfig:
    tau_expand: float = 0.05          # expand a gist only when its score exceeds this
    tau_collapse: float = 0.05        # collapse a group only when its mean score is below -tau_collapse
    max_changes: int = 4              # actions per refocus (a paired collapse + expand counts 2)
    cooldown: int = 2                 # refocuses before a changed pivot may change again
    hysteresis: float = 0.05          # added to tau for changing a recently changed pivot again
    hysteresis_refocuses: int = 8     # how long a change counts as recent for the hysteresis
    make_room: bool = True            # a paired collapse may take any group scored < 0 (else < -tau_collapse)
    standalone_collapses: bool = True  # False: collapse only to make room for an expand (paired)
    on_all_invalid: str = "recency"   # every score NaN/inf: "recency" baseline WC or "keep" the WC

    def __post_init__(self):
        for name in ("tau_expand", "tau_collapse", "hysteresis"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"AllocatorConfig.{name} must be a finite number >= 0, got {value!r}")
        for name in ("max_changes", "cooldown", "hysteresis_refocuses"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 0:
                raise ValueError(f"AllocatorConfig.{name} must be an integer >= 0, got {value!r}")
        if self.on_all_invalid not in ("recency", "keep"):
            raise ValueError(f"AllocatorConfig.on_all_invalid must be 'recency' or 'keep', "
                             f"got {self.on_all_invalid!r}")


class Action(NamedTuple):
    """One change: kind "expand" | "collapse", pivot node (level, index), triggering score."""
    kind: str
    level: int
    index: int
    score: float


class Refocus(NamedTuple):
    """What one refocus did."""
    wc: WorkingContext          # the new WC (the same object when nothing changed)
    actions: list               # Actions in the order applied
    invalid_scores: int         # NaN/inf scores, treated as 0
    fallback: str = None        # None, or "recency" / "keep" when every score was invalid
    cooled_down: int = 0        # candidates held back by the cooldown
    refocus_index: int = 0      # which refocus of this allocator this was (0 = the first)


def _as_scores(scores, n):
    if hasattr(scores, "detach"):  # a torch tensor, wherever it lives
        scores = scores.detach().float().cpu().numpy()
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size != n:
        raise ValueError(f"scores has {s.size} values but the working context has {n} entries; "
                         f"give one score per entry")
    return s


class FocusAllocator:
    """Greedy, deterministic expand/collapse under the budget, with cooldown and hysteresis."""

    def __init__(self, config=None):
        self.config = config if config is not None else AllocatorConfig()
        self.reset()

    def reset(self):
        """Forget all history (a new document)."""
        self.refocus_count = 0
        self.last_change = {}  # pivot (level, index) -> refocus index of its last change

    # --- state ---

    def state_dict(self):
        return {"refocus_count": self.refocus_count,
                "last_change": [[lv, i, r] for (lv, i), r in sorted(self.last_change.items())],
                "config": asdict(self.config)}

    def load_state_dict(self, state):
        """Restore state_dict(); refuses state saved under a different config (its cooldowns
        and thresholds would silently mean something else)."""
        if state.get("config", asdict(self.config)) != asdict(self.config):
            raise ValueError(f"allocator state was saved with config {state['config']} but this allocator has "
                             f"{asdict(self.config)}; build it with the saved config")
        self.refocus_count = int(state["refocus_count"])
        self.last_change = {(int(lv), int(i)): int(r) for lv, i, r in state["last_change"]}

    # --- the rules ---

    def _threshold(self, pivot, tau, r):
        """(allowed, threshold) for changing `pivot` at refocus r."""
        cfg = self.config
        last = self.last_change.get(pivot)
        if last is None:
            return True, tau
        age = r - last
        if age < cfg.cooldown:
            return False, tau
        return True, tau + (cfg.hysteresis if age < cfg.hysteresis_refocuses else 0.0)

    def refocus(self, wc, scores):
        """Apply `scores` (one per entry of wc) to wc; returns a Refocus (see the module docstring)."""
        cfg = self.config
        if wc.budget is not None and wc.cost > wc.budget:
            raise ValueError(f"the working context costs {wc.cost} > its budget {wc.budget}; "
                             f"build it with WorkingContext so it fits")
        s = _as_scores(scores, len(wc))
        invalid = ~np.isfinite(s)
        n_invalid = int(invalid.sum())
        r = self.refocus_count
        self.refocus_count += 1
        self._forget(r)
        if len(wc) and n_invalid == len(wc):
            if cfg.on_all_invalid == "keep":
                return Refocus(wc, [], n_invalid, "keep", 0, r)
            if wc.budget is None:
                out = WorkingContext.uniform(wc.history_len, 0, None, wc.block_size, wc.tail_tokens)
            else:
                out = WorkingContext.recency(wc.history_len, wc.budget, wc.block_size, wc.tail_tokens)
            return Refocus(out, [], n_invalid, "recency", 0, r)
        s = np.where(invalid, 0.0, s)

        # candidates over the starting WC: (strength, position, order, kind, payload)
        candidates, groups, cooled = [], [], 0
        for k, e in enumerate(wc.entries):
            if e.level > 0 and not invalid[k] and s[k] > cfg.tau_expand:
                allowed, tau = self._threshold((e.level, e.index), cfg.tau_expand, r)
                if not allowed:
                    cooled += 1
                elif s[k] > tau:
                    candidates.append((-s[k], k, 0, "expand", (e.level, e.index)))
        for first, stop, parent in wc.collapse_groups():
            if invalid[first:stop].any():
                continue
            members = tuple((e.level, e.index) for e in wc.entries[first:stop])
            score = float(s[first:stop].mean())
            groups.append((score, first, parent, members))
            if cfg.standalone_collapses and score < -cfg.tau_collapse:
                allowed, tau = self._threshold(parent, cfg.tau_collapse, r)
                if not allowed:
                    cooled += 1
                elif score < -tau:
                    candidates.append((score, first, 1, "collapse", (parent, members)))
        candidates.sort(key=lambda c: c[:3])
        groups.sort(key=lambda g: g[:2])  # lowest score first, ties by position

        # entries are tracked by node, since every action shifts the positions after it
        actions, used = [], set()  # used: pivots changed in this refocus
        where = {(e.level, e.index): k for k, e in enumerate(wc.entries)}
        for strength, _, _, kind, payload in candidates:
            room = cfg.max_changes - len(actions)
            if room <= 0:
                break
            if kind == "collapse":
                parent, members = payload
                if all(m in where for m in members):  # not broken up by an earlier expand
                    wc = wc.collapse(where[members[0]])
                    where = {(e.level, e.index): k for k, e in enumerate(wc.entries)}
                    used.add(parent)
                    actions.append(Action("collapse", parent[0], parent[1], float(strength)))
                continue
            node = payload
            if node not in where:  # consumed by an earlier collapse
                continue
            score = -float(strength)
            if wc.can_expand(where[node]):
                wc = wc.expand(where[node])
            else:
                if room < 2:
                    continue
                pair = self._room_maker(groups, node, where, used, r)
                if pair is None:
                    continue
                parent, members, pair_score = pair
                wc = wc.swap(where[members[0]], where[node])  # collapse first, then expand: cost unchanged
                used.add(parent)
                actions.append(Action("collapse", parent[0], parent[1], pair_score))
            where = {(e.level, e.index): k for k, e in enumerate(wc.entries)}
            used.add(node)
            actions.append(Action("expand", node[0], node[1], score))
        for a in actions:
            self.last_change[(a.level, a.index)] = r
        return Refocus(wc, actions, n_invalid, None, cooled, r)

    def _room_maker(self, groups, node, where, used, r):
        """(parent, members, score) of the collapse that makes room for expanding `node`, or None."""
        cfg = self.config
        limit = 0.0 if cfg.make_room else -cfg.tau_collapse
        for score, _, parent, members in groups:
            if score >= limit:
                break  # sorted: no lower score follows
            if parent in used or node in members or not all(m in where for m in members):
                continue
            allowed, tau = self._threshold(parent, -limit, r)
            if allowed and score < -tau:
                return parent, members, score
        return None

    def _forget(self, r):
        keep = max(self.config.cooldown, self.config.hysteresis_refocuses)
        self.last_change = {p: t for p, t in self.last_change.items() if r - t < keep}
