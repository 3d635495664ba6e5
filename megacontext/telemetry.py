"""
Telemetry: MegaContext's run metrics as JSON lines on disk, and to wandb when asked.

Every record is one JSON object on one line, written with a single write() call and
flushed, so a crash can leave at most a torn *last* line, which read_jsonl() drops.
Files live under $MEGACONTEXT_ARTIFACT_ROOT/run_logs/<run>-<timestamp>.jsonl (default root:
$NANOCHAT_BASE_DIR/megacontext; timestamp = UTC start time, YYYYmmdd-HHMMSS, so reruns of
one run name never append to each other's file). Set MEGACONTEXT_ENABLE_WANDB=1 to mirror
every record to wandb (project "megacontext"); wandb stays untouched otherwise.

The focus metrics (DESIGN.md section 6) are pure functions, shared with the eval harness:

    swap_rate(n_actions, n_entries)   expand + collapse actions of one refocus / WC entries
    residency(prev_wc, next_wc)       share of prev's entries (nodes) still present in next
    budget_utilization(wc)            WC cost / budget W
    lod_histogram(wc)                 [LOD0 entries, LOD1 entries, LOD2 entries]

Telemetry.log_refocus() records them per refocus with its latencies, the resulting WC's layout
("wc", see wc_layout: runs of consecutive nodes, at most one per entry, so a record stays
bounded by the budget) and, when the caller passes LensNet's scores, the WC they scored
("scored_wc") with the scores in its entry order ("scores", 4 significant digits, null for NaN
or inf); megacontext/viz.py replays them. close() writes a
summary record (means, latency percentiles, tok/s, the last LOD histogram) and warns
(TargetWarning, also listed in the summary) when a run leaves the seed's targets:
ΔNLL@H > 0.10, swap rate outside 0.05-0.20, residency < 90 %.

This module only records; it never changes what is trained, evaluated or decoded.
"""

import os
import json
import math
import time
import warnings

from nanochat.common import get_base_dir

# the seed's targets (DESIGN.md section 6)
MAX_DELTA_NLL = 0.10
SWAP_RATE_RANGE = (0.05, 0.20)
MIN_RESIDENCY = 0.90


class TargetWarning(UserWarning):
    """A run's focus metrics left the seed's targets."""


def artifact_root():
    return os.environ.get("MEGACONTEXT_ARTIFACT_ROOT") or os.path.join(get_base_dir(), "megacontext")

# -----------------------------------------------------------------------------
# Focus metrics (pure: no I/O). A WC is a WorkingContext or any sequence of entries whose
# first two fields are (level, index); an entry's identity is its node, so the partial last
# block growing by a few tokens between two refocuses still counts as the same entry.


def _nodes(wc):
    return [(int(e[0]), int(e[1])) for e in wc]


def swap_rate(n_actions, n_entries):
    """Expand + collapse actions of one refocus over the entries of the WC they acted on
    (NaN for an empty WC: there was nothing to swap)."""
    if n_actions < 0:
        raise ValueError(f"n_actions must be >= 0, got {n_actions}")
    return float(n_actions) / n_entries if n_entries > 0 else float("nan")


def residency(prev_wc, next_wc):
    """Share of prev_wc's entries still present in next_wc (NaN when prev_wc is empty)."""
    prev = _nodes(prev_wc)
    if not prev:
        return float("nan")
    kept = set(_nodes(next_wc))
    return sum(node in kept for node in prev) / len(prev)


def budget_utilization(wc, budget=None):
    """WC cost / budget (the WC's own budget unless one is given; NaN without a budget)."""
    budget = getattr(wc, "budget", None) if budget is None else budget
    if not budget:
        return float("nan")
    cost = getattr(wc, "cost", None)
    if cost is None:  # a plain list of entries: LOD0 costs its tokens, a gist 1
        cost = sum((e[3] - e[2]) if e[0] == 0 else 1 for e in wc)
    return cost / budget


def lod_histogram(wc):
    """[number of LOD0 entries, LOD1 entries, LOD2 entries]."""
    counts = [0, 0, 0]
    for level, _ in _nodes(wc):
        counts[level] += 1
    return counts


def wc_layout(wc):
    """A WC's entries as {"start": first token, "end": history length, "runs": [[level, first
    index, count], ...]}: one run per stretch of consecutive nodes of one level (a WC is
    contiguous, so the runs give back every entry; see wc_entries)."""
    entries = [(int(e[0]), int(e[1]), int(e[2]), int(e[3])) for e in wc]
    runs = []
    for level, index, _, _ in entries:
        if runs and runs[-1][0] == level and runs[-1][1] + runs[-1][2] == index:
            runs[-1][2] += 1
        else:
            runs.append([level, index, 1])
    return {"start": entries[0][2] if entries else 0, "end": entries[-1][3] if entries else 0, "runs": runs}


def wc_entries(layout, block_size=32):
    """wc_layout's inverse: [(level, index, start, end), ...], LOD0 blocks clipped to the end."""
    out = []
    for level, first, count in layout["runs"]:
        span = block_size ** max(level, 1)
        for index in range(first, first + count):
            start, end = index * span, (index + 1) * span
            out.append((level, index, start, min(end, layout["end"]) if level == 0 else end))
    return out


def rounded_scores(scores):
    """Scores as JSON numbers of 4 significant digits (None for NaN and +-inf)."""
    return [float(f"{s:.4g}") if math.isfinite(s) else None for s in (float(x) for x in scores)]


def target_warnings(summary):
    """One line per seed target the summary's means leave (missing or NaN metrics are skipped)."""
    out = []

    def value(key):
        v = summary.get(key)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

    d = value("delta_nll")
    if d is not None and d > MAX_DELTA_NLL:
        out.append(f"ΔNLL@H {d:.3f} nats/token is above the target {MAX_DELTA_NLL:.2f}")
    s = value("swap_rate")
    lo, hi = SWAP_RATE_RANGE
    if s is not None and not lo <= s <= hi:
        out.append(f"swap rate {s:.3f} per refocus is outside the target {lo:.2f}-{hi:.2f}")
    r = value("residency")
    if r is not None and r < MIN_RESIDENCY:
        out.append(f"residency {r:.1%} is below the target {MIN_RESIDENCY:.0%}")
    return out


def _mean(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def _percentile(values, q):
    values = sorted(values)
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))]

# -----------------------------------------------------------------------------
# The logger


class Telemetry:
    """Append-only JSONL log for one run (rank 0 writes; other ranks get a no-op logger).

    The summary statistics are gathered even when disabled, so a caller that does not want a
    file (a benchmark) still gets summary() and the target warnings."""

    def __init__(self, run_name, config=None, enabled=True, wandb=True):
        self.enabled = enabled
        self.run_name = run_name
        self.wandb_run = None
        self._refocus = []   # (swap_rate, residency, budget_utilization, refocus_s) per refocus
        self._decode = []    # (tokens, seconds) per decode stretch
        self._delta_nll = []
        self._last_histogram = None
        self._fallbacks = []
        self._counts = {"refocuses": 0, "actions": 0, "budget_collapses": 0, "dropped_tokens": 0,
                        "recomputed_slots": 0, "reusable_slots": 0}
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        run_logs = os.path.join(artifact_root(), "run_logs")
        self.path = os.path.join(run_logs, f"{run_name}-{stamp}.jsonl")
        if not enabled:
            return
        os.makedirs(run_logs, exist_ok=True)
        for k in range(1, 1000):  # two runs of one name in the same second get -2, -3, ...
            try:
                self._file = open(self.path, "x", encoding="utf-8")
                break
            except FileExistsError:
                self.path = os.path.join(run_logs, f"{run_name}-{stamp}-{k + 1}.jsonl")
        # wandb=False: a training variant's records, which nanochat's trainer already logs to its own wandb run
        if wandb and os.environ.get("MEGACONTEXT_ENABLE_WANDB") == "1":
            import wandb
            self.wandb_run = wandb.init(project="megacontext", name=run_name, config=config or {})
        start = {"event": "start", "run": run_name, "config": config or {}}
        if getattr(self.wandb_run, "url", None):  # the viewer links to it
            start["wandb_url"] = self.wandb_run.url
        self.log(start)

    def log(self, record, step=None):
        if not self.enabled:
            return
        # NaN/inf (e.g. a recovered share whose drop is <= 0) become null: the file stays strict JSON,
        # which the viewer's JSON.parse needs, and "no value" is what they mean
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        record.setdefault("time", time.time())
        if step is not None:
            record["step"] = step
        self._file.write(json.dumps(record, default=float) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "time"}
            self.wandb_run.log(numbers, step=step)

    # --- the runtime's records ---

    def log_refocus(self, prev_wc, next_wc, n_actions, refocus_s, *, budget_collapses=0, dropped_tokens=0,
                    recomputed_slots=None, reusable_slots=None, step=None, scores=None, **extra):
        """One refocus: `prev_wc` the WC the focus acted on (after the new tokens joined it),
        `next_wc` the result, `n_actions` the allocator's expand/collapse actions, `scores`
        LensNet's scores of prev_wc's entries (None without a LensNet). The swap rate
        counts every change of layout (allocator actions + collapses that kept the budget);
        residency compares consecutive refocus results. Returns the record."""
        n_changes = n_actions + budget_collapses
        previous = getattr(self, "_previous_wc", None)
        record = {"event": "refocus", "entries": len(next_wc), "actions": n_actions,
                  "budget_collapses": budget_collapses, "dropped_tokens": dropped_tokens,
                  "swap_rate": swap_rate(n_changes, len(prev_wc)),
                  "focus_swap_rate": swap_rate(n_actions, len(prev_wc)),
                  "residency": residency(previous, next_wc) if previous is not None else None,
                  "budget_utilization": budget_utilization(next_wc),
                  "lod_histogram": lod_histogram(next_wc), "refocus_s": refocus_s}
        if recomputed_slots is not None:
            record["recomputed_slots"] = recomputed_slots
            record["reusable_slots"] = reusable_slots
        record["wc"] = wc_layout(next_wc)
        if scores is not None:
            record["scored_wc"] = wc_layout(prev_wc)
            record["scores"] = rounded_scores(scores)
        record.update(extra)
        self._previous_wc = next_wc
        self._refocus.append((record["swap_rate"], record["residency"], record["budget_utilization"], refocus_s))
        self._last_histogram = record["lod_histogram"]
        c = self._counts
        c["refocuses"] += 1
        c["actions"] += n_actions
        c["budget_collapses"] += budget_collapses
        c["dropped_tokens"] += dropped_tokens
        c["recomputed_slots"] += recomputed_slots or 0
        c["reusable_slots"] += reusable_slots or 0
        self.log(record, step=step)
        return record

    def log_decode(self, tokens, seconds, step=None, **extra):
        """A stretch of `tokens` decoded in `seconds` (one forward per token)."""
        self._decode.append((tokens, seconds))
        self.log({"event": "decode", "tokens": tokens, "decode_s": seconds,
                  "decode_ms_per_token": 1000 * seconds / tokens if tokens else None, **extra}, step=step)

    def log_delta_nll(self, value, step=None, **extra):
        """ΔNLL@H (nats/token) against a reference, when the caller has one."""
        self._delta_nll.append(float(value))
        self.log({"event": "delta_nll", "delta_nll": float(value), **extra}, step=step)

    def log_fallback(self, reason, step=None):
        """A documented safe fallback was taken (e.g. a recency-only WC); the summary lists it."""
        self._fallbacks.append(reason)
        self.log({"event": "fallback", "reason": reason}, step=step)

    def summary(self):
        """Means over the refocuses so far, latency percentiles, decode tok/s, target warnings."""
        swap, resid, util, latency = (list(x) for x in zip(*self._refocus)) if self._refocus else ([], [], [], [])
        tokens = sum(t for t, _ in self._decode)
        decode_s = sum(s for _, s in self._decode)
        c = self._counts
        recomputable = c["recomputed_slots"] + c["reusable_slots"]
        out = dict(c, swap_rate=_mean(swap), residency=_mean(resid), budget_utilization=_mean(util),
                   lod_histogram=self._last_histogram,
                   refocus_ms_mean=None if not latency else 1000 * _mean(latency),
                   refocus_ms_p50=None if not latency else 1000 * _percentile(latency, 0.5),
                   refocus_ms_max=None if not latency else 1000 * max(latency),
                   decoded_tokens=tokens, decode_s=decode_s,
                   decode_tok_per_s=tokens / decode_s if decode_s > 0 else None,
                   refocus_share_of_decode=(sum(latency) / decode_s) if decode_s > 0 and latency else None,
                   recomputed_share=c["recomputed_slots"] / recomputable if recomputable else None,
                   delta_nll=_mean(self._delta_nll), fallbacks=list(self._fallbacks))
        out["warnings"] = target_warnings(out)
        return out

    def close(self):
        """Write the summary (and warn about targets left), end the file. Returns the summary."""
        summary = self.summary()
        for line in summary["warnings"]:
            warnings.warn(f"{self.run_name}: {line}", TargetWarning, stacklevel=2)
        if not self.enabled:
            return summary
        self.log({"event": "summary", **summary})
        self.log({"event": "end"})
        self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            self.wandb_run.finish()
        self.enabled = False
        return summary


def read_jsonl(path):
    """All whole records of a telemetry file; a torn last line (crash mid-write) is dropped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # torn tail: the writer died mid-line
            records.append(json.loads(line))
    return records
