"""
The long-context evaluation harness: every MegaContext method side by side at one budget.

    python -m megacontext.eval --config configs/eval_cpu.yaml --out DIR [--key=value ...] [--tasks FILE.jsonl]

It loads a base model (base_checkpoints/<model_tag>), optionally the LoRA of an end-to-end run
(`lora`: every method then reads the base through it), and optionally a trained GistNet
(mc_XXXXXX.pt of a JT1 or end-to-end run), and scores every method on the same held-out positions at the
same budget W (`budget_tokens`, token-equivalents: a LOD0 token costs 1, a gist costs 1):

    full          the whole history as tokens (only where history + horizon fits max_seq_len)
    recency       the last W tokens
    meanpool      the WC of WorkingContext.recency(history, W): the longest LOD0 tail that fits,
                  older blocks as mean-pooled gists (GistNet head "mean")
    gist_uniform  the same layout with the trained GistNet's gists (needs `gistnet`)
    oracle        gist_uniform's WC improved greedily: each round tries expanding every gist
                  (collapsing the oldest non-tail LOD0 block when the budget is full; a LOD2
                  gist also with each of its LOD1 children expanded in the same round) and keeps
                  the one that lowers the horizon NLL most, while one does. An upper bound for
                  any focus policy over these gists; costly, so it runs on a stated subset.
    megacontext   LensNet + the Focus Allocator (needs `gistnet` and `lensnet`), run the way the
                  runtime runs them: the history streams in, starting from its first
                  `refocus_every` tokens; after every further `refocus_every` tokens the WC grows
                  (WorkingContext.extend collapses oldest-first when the new tokens overflow W),
                  LensNet scores it and the allocator refocuses (`refocus_rounds` times at most
                  while the WC changes, as runtime.Focus does); one last refocus at the end of
                  the history (the runtime refocuses before every reply). The horizon is then
                  scored over that WC. Without a LensNet it is listed under `absent_methods`.

Every row the model reads starts with BOS (as every training row of the testbed does); the BOS
costs nothing. Metrics follow ../shared/DESIGN.md section 6 (report.json's schema is there):

    bpb            bits per byte of the next `horizon` tokens at natural-text positions of test
                   documents, with history = ratio x W for each ratio; the same positions (all
                   at least max ratio x W deep) for every ratio and method
    gap_closed     (bpb_recency - bpb_m) / (bpb_recency - bpb_full), where full exists
    delta_nll      ΔNLL@H with C = delta_context (default 1056: 32 gisted blocks + the last one,
                   so a whole 1024-token LOD2 span exists) at positions t with t - C a multiple
                   of 1024; per-position means with 95% intervals (normal approximation);
                   recovered = 1 - ΔNLL / ΔNLL_drop, null when ΔNLL_drop <= 0
    passkey        greedy exact match of the pass key by depth x history/W
    needle_recall  share of passkey cases whose key (its first copy in the needle) lies wholly in
                   LOD0 entries at the question
    tasks          accuracy (greedy exact match) and mean answer NLL for each synthetic task at
                   history = task_ratio x W, and for each --tasks file
    testbed        the testbed's own figures (does the base model need distant context?):
                   nll_gap_synthetic / nll_gap_natural = NLL(recency) - NLL(full) in nats/token
                   on the synthetic answers / natural horizons at history = testbed_ratio x W;
                   passkey_full = the lowest full-context passkey accuracy over all cells
    tokens_per_s   history + horizon tokens judged per second of the method's own compute

With MegaPrediction heads (`megaprediction`: an end-to-end run's model tag or mc path whose run had
`megaprediction` on; its GistNet must be the one `gistnet` loads, since the heads predict its gists)
two more sections, absent without heads:

    megaprediction mean cosine of the heads' predicted gist vs the GistNet gist of the real future
                   span (LOD1: the next 32-token block; LOD2: the next 1024 tokens), beside the
                   copy-last-gist baseline (the span just before), at every block end of the
                   `context_tokens` (the heads' training window) before each natural-text position,
                   read on the token path as the heads were trained; per-position-window means with
                   95% intervals, n = windows, block_ends = positions; only block ends where the
                   target and the baseline both exist in the document count; `centered` repeats
                   the cosines after subtracting the level's mean real gist (a GistNet whose gists
                   share one large direction makes every raw cosine close to 1)
    gist_first     (with `gist_first: true`) horizon NLL at the natural-text positions of every
                   history, token-first vs gist-first, over the same WCs (gist_uniform's layout and
                   gists). Gist-first: before each 32-token block of the horizon the planner's plan
                   slots go in right before the block's tokens; `lod_mix` lists the levels whose
                   predicted gists are placed ([1]: the LOD1 plan of the block; [1, 2]: also the LOD2
                   plan of the 1024 tokens from there, placed first, coarse to fine). Each block's
                   plans are predicted from the hidden state at the position just before the block
                   in the gist-first row itself (so block 2's plan has read block 1's plan), one
                   pass per block. Plan slots do NOT count toward budget_tokens: the WC is the very
                   same one, the plans are extra positions like the horizon's own tokens, so the
                   comparison isolates the plans (charging them would change the WC too); the row
                   must still fit max_seq_len. difference = gist_first - token_first per position,
                   with a 95% interval; plan_cosine_lod1 = cosine of the LOD1 plans vs the GistNet
                   gists of the horizon's whole blocks (WC path, not the token path above).

Greedy exact match is read off the teacher-forced pass: greedy decoding reproduces the answer
exactly when, and only when, the argmax at every answer position is the answer's token.

Determinism: the same config and seed give the same report, except the timing keys
(tokens_per_s, timings_s). A `--tasks` line is {"context", "question", "answer", "id"?, "depth"?};
the model reads context + question and is scored on the answer's tokens.

This module owns the methods' views, the metrics and the report files. It never trains
anything and never writes outside --out.
"""

import os
import sys
import json
import math
import time
import random
import subprocess

import numpy as np
import yaml

METHODS = ("full", "recency", "meanpool", "gist_uniform", "oracle", "megacontext")
ABSENT_REASONS = {"megacontext": "needs a trained GistNet and LensNet (set `gistnet:` and `lensnet:`; train LensNet with "
                                 "`python -m nanochat.train --config configs/lensnet_cpu.yaml`)"}
DEFAULTS = {
    "model_tag": "longctx_cpu",   # base_checkpoints/<model_tag>
    "step": None,                 # checkpoint step (None = last)
    "gistnet": None,              # a JT1 run's model tag (its last mc_XXXXXX.pt) or a .pt path; None = no gist methods
    "lensnet": None,              # a JT2 run's model tag (its last mc_XXXXXX.pt) or a .pt path; None = no megacontext method
    "lora": None,                 # an end-to-end run's model tag (or mc path) whose LoRA every method reads the base through
    "refocus_every": 32,          # K: tokens between refocuses of the megacontext method (as the runtime's K)
    "refocus_rounds": 1,          # LensNet + allocator rounds per refocus (runtime.Focus, as the runtime's)
    "allocator": {},              # megacontext.allocator.AllocatorConfig fields (empty = its defaults)
    "device_type": "",            # cuda | cpu | mps ("" = autodetect)
    "budget_tokens": 128,         # W
    "horizon": 32,                # H: tokens scored per natural-text position
    "ratios": [2, 4, 8, 16],      # history / W
    "positions": 48,              # natural-text positions (shared by all ratios)
    "stride": 256,                # spacing of candidate positions in a document
    "positions_by": "length",     # length: uniform over candidates | source: the sources take turns
    "depths": [0.1, 0.3, 0.5, 0.7, 0.9],
    "passkey_cases": 6,           # per depth x ratio cell
    "task_ratio": 8,              # history / W for the synthetic task table and the testbed figures
    "task_cases": 12,             # per synthetic task
    "testbed_ratio": 8,
    "oracle_positions": 8,        # natural-text positions the oracle runs on (the first N)
    "oracle_cases": 2,            # passkey cases per cell the oracle runs on (the first N)
    "oracle_tasks": 4,            # cases per task / --tasks file the oracle runs on
    "oracle_rounds": 2,
    "delta_context": 1056,
    "delta_horizon": 32,
    "delta_positions": 32,
    "batch_rows": 16,             # rows per forward pass
    "seed": 0,
    "methods": list(METHODS),
    "megaprediction": None,       # an end-to-end run's model tag (or mc path) with MegaPrediction heads; None = no sections
    "gist_first": False,          # also score the horizon gist-first (needs megaprediction)
    "lod_mix": [1],               # the levels whose predicted gists are placed as plan slots: [1] or [1, 2]
}


def _coerce(key, value):
    """A config or command-line value as the type of its default (lists and None-defaults read as YAML)."""
    like = DEFAULTS[key]
    if isinstance(value, str) and not isinstance(like, str):
        value = yaml.safe_load(value)
    if isinstance(like, list) and not isinstance(value, list):
        value = [value]
    if isinstance(like, (int, float)) and not isinstance(value, type(like)):
        try:
            value = type(like)(value)
        except (TypeError, ValueError):
            raise ValueError(f"config key '{key}' expects {type(like).__name__}, got {value!r}") from None
    return value


def parse_args(argv):
    """argv -> (config dict, out dir, task files). Flags are checked before torch is imported."""
    from megacontext.flags import split_argv, read_config_file
    cfg = dict(DEFAULTS)
    overrides, named = split_argv(argv, __doc__, DEFAULTS, {"config": None, "out": None, "tasks": []})
    out, task_files = named["out"], named["tasks"]
    if named["config"] is not None:
        data = read_config_file(named["config"], example="configs/eval_cpu.yaml")
        task_files = list(data.pop("tasks", None) or []) + task_files
        overrides = {**data, **overrides}
    for key, value in overrides.items():
        if key not in DEFAULTS:
            raise ValueError(f"unknown eval config key '{key}'; known keys: {', '.join(DEFAULTS)}")
        cfg[key] = _coerce(key, value)
    if out is None:
        raise ValueError("--out DIR is required (where report.json, report.md and the plots go)")
    unknown = [m for m in cfg["methods"] if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    if cfg["positions_by"] not in ("length", "source"):
        raise ValueError(f"positions_by must be 'length' or 'source', got {cfg['positions_by']!r}")
    check_gist_first_keys(cfg)
    return cfg, out, task_files


def check_gist_first_keys(cfg):
    """The MegaPrediction keys, checked without torch (megaprediction.check_lod_mix says the same later)."""
    lod_mix = cfg["lod_mix"]
    if not lod_mix or any(lv not in (1, 2) for lv in lod_mix) or len(set(lod_mix)) != len(lod_mix):
        raise ValueError(f"lod_mix lists the levels whose predicted gists are placed as plan slots: [1] or [1, 2] "
                         f"(or [2]); got {lod_mix!r}")
    if cfg["gist_first"] and not cfg["megaprediction"]:
        raise ValueError("gist_first needs MegaPrediction heads: set megaprediction to an end-to-end run trained with "
                         "them (python -m nanochat.train --config configs/megaprediction_cpu.yaml)")


def read_task_file(path, tokenizer):
    """A --tasks JSONL file -> list of dicts with history/answer token lists; one clear error per bad line."""
    if not os.path.exists(path):
        raise ValueError(f"--tasks file not found: {path}")
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line is one object with "
                                 f"context, question, answer") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with context, question, answer")
            missing = [k for k in ("context", "question", "answer") if not isinstance(row.get(k), str)]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing or non-text field(s) {', '.join(missing)}; each line "
                                 f"needs context, question and answer as strings")
            answer = tokenizer.encode(row["answer"])
            if not answer:
                raise ValueError(f"{path}:{lineno}: the answer is empty")
            history = tokenizer.encode(row["context"] + row["question"])
            if not history:
                raise ValueError(f"{path}:{lineno}: context + question is empty")
            items.append({"id": row.get("id", f"{lineno}"), "depth": row.get("depth"),
                          "history": history, "answer": answer})
    if not items:
        raise ValueError(f"--tasks file {path} has no lines")
    return items

# -----------------------------------------------------------------------------
# Scoring: rows of entries -> per-token NLL and greedy correctness (nothing here knows methods)


def by_horizon_length(horizons):
    """Row indices grouped by horizon length, longest first (pack_batch wants a (B, H) horizon tensor)."""
    groups = {}
    for i in sorted(range(len(horizons)), key=lambda i: -len(horizons[i])):
        groups.setdefault(len(horizons[i]), []).append(i)
    return groups


def score_wcs(model, wcs, stores, horizons, batch_rows, bos_id):
    """Working contexts, the store each reads from (a TensorStore) and horizons (1-D token lists,
    any lengths) -> (nll list of float arrays, correct list of bool arrays), one per WC. Every
    row is [BOS] + the WC's slots + the horizon, packed by working_context.pack_batch."""
    import torch
    import torch.nn.functional as F
    from megacontext.working_context import pack_batch
    from megacontext.base_inputs import gist_inputs
    base = getattr(model, "_orig_mod", model)
    device = base.get_device()
    nlls, corrects = [None] * len(wcs), [None] * len(wcs)
    groups = by_horizon_length(horizons)
    with torch.no_grad():
        for H, members in groups.items():
            for k in range(0, len(members), batch_rows):
                chunk = members[k:k + batch_rows]
                hz = torch.tensor(np.array([horizons[i] for i in chunk], dtype=np.int64), device=device)
                batch = pack_batch([wcs[i] for i in chunk], [stores[i] for i in chunk], hz, n_embd=base.config.n_embd,
                                   bos_id=bos_id, device=device)
                targets = batch["targets"]
                with gist_inputs(model, batch["gist_mask"], batch["gist_vectors"]):
                    logits = model(batch["idx"])
                logp = F.log_softmax(logits.float(), dim=-1)
                for b, i in enumerate(chunk):
                    where = (targets[b] >= 0).nonzero().squeeze(1)
                    tgt = targets[b, where]
                    nlls[i] = (-logp[b, where].gather(1, tgt[:, None]).squeeze(1)).cpu().numpy()
                    corrects[i] = (logp[b, where].argmax(-1) == tgt).cpu().numpy()
    return nlls, corrects


def gist_first_row(context, horizon, plans=None):
    """One gist-first row: context = (idx (P,), gist mask (P,), vectors (P, D)) = [BOS] + the WC's
    slots, horizon (H,) tokens, plans = per 32-token block of the horizon a (slots, D) tensor or
    None (no plan). -> dict(idx, gist_mask, gist_vectors, targets (-1 except the H positions that
    predict the horizon), before = per block the position whose hidden state predicts its plans).
    The row is context, then per block its plan slots and its tokens, the horizon's last token
    left out (nothing is predicted from it). With no plans it is exactly pack_batch's row."""
    import torch
    from megacontext.tree import BLOCK_SIZE as B
    idx, mask, vec = context
    H, D = len(horizon), vec.size(1)
    pieces_idx, pieces_mask, pieces_vec, at, before = [idx], [mask], [vec], [], []
    pos = len(idx)
    prev = pos - 1  # the position whose logits predict the next horizon token
    for j, a in enumerate(range(0, H, B)):
        before.append(prev)
        plan = plans[j] if plans is not None and j < len(plans) else None
        if plan is not None and len(plan):
            m = len(plan)
            pieces_idx.append(torch.zeros(m, dtype=idx.dtype, device=idx.device))
            pieces_mask.append(torch.ones(m, dtype=torch.bool, device=idx.device))
            pieces_vec.append(plan.to(vec.dtype))
            pos += m
            prev = pos - 1
        block = horizon[a:a + B]
        n_in = min(len(block), H - 1 - a)  # the horizon's last token is never an input
        at.append(prev)
        at.extend(range(pos, pos + len(block) - 1))
        pieces_idx.append(block[:n_in].to(idx.dtype))
        pieces_mask.append(torch.zeros(n_in, dtype=torch.bool, device=idx.device))
        pieces_vec.append(torch.zeros(n_in, D, dtype=vec.dtype, device=vec.device))
        pos += n_in
        prev = pos - 1
    row_idx = torch.cat(pieces_idx)
    targets = torch.full_like(row_idx, -1)
    targets[torch.tensor(at, dtype=torch.long, device=idx.device)] = horizon.to(targets.dtype)
    return dict(idx=row_idx, gist_mask=torch.cat(pieces_mask), gist_vectors=torch.cat(pieces_vec), targets=targets,
                before=before)


def score_gist_first(model, wcs, stores, horizons, planner, batch_rows, bos_id):
    """Token-first and gist-first horizon NLL over the same WCs -> (token_first, gist_first, plans):
    per WC a float array of per-token NLL each, and the plans (n_blocks, slots, D) (None without a
    planner). The first pass is the token-first row (exactly score_wcs's batch: same groups, same
    padding) and predicts block 0's plans; pass j predicts block j's from the row holding the plans
    of blocks < j; the last pass scores the gist-first row. planner=None: no plan slots at all, so
    gist_first is the token-first NLL exactly."""
    import torch
    import torch.nn.functional as F
    from megacontext.base_inputs import gist_inputs
    from megacontext.megaprediction import capture_hidden
    from megacontext.tree import BLOCK_SIZE as B
    from megacontext.working_context import pack_batch
    base = getattr(model, "_orig_mod", model)
    device = base.get_device()
    token_first, gist_first, all_plans = [None] * len(wcs), [None] * len(wcs), [None] * len(wcs)

    def forward(rows):
        T = max(len(r["idx"]) for r in rows)
        if T > base.config.sequence_len:
            raise ValueError(f"a gist-first row needs {T} positions but the model's sequence_len is "
                             f"{base.config.sequence_len}; lower budget_tokens or horizon, or use fewer lod_mix levels")
        pad = lambda x, fill: F.pad(x, (0, T - len(x)), value=fill)
        idx = torch.stack([pad(r["idx"], 0) for r in rows])
        targets = torch.stack([pad(r["targets"], -1) for r in rows])
        mask = torch.stack([pad(r["gist_mask"], False) for r in rows])
        vec = torch.stack([F.pad(r["gist_vectors"], (0, 0, 0, T - len(r["idx"]))) for r in rows])
        with capture_hidden(model) as cap, gist_inputs(model, mask, vec):
            logits = model(idx)
        logp = F.log_softmax(logits.float(), dim=-1)
        nll = []
        for b in range(len(rows)):
            where = (targets[b] >= 0).nonzero().squeeze(1)
            nll.append((-logp[b, where].gather(1, targets[b, where][:, None]).squeeze(1)).cpu().numpy())
        return nll, cap.hidden

    groups = by_horizon_length(horizons)
    with torch.no_grad():
        for H, members in groups.items():
            n_blocks = -(-H // B)
            for k in range(0, len(members), batch_rows):
                chunk = members[k:k + batch_rows]
                hz = torch.tensor(np.array([horizons[i] for i in chunk], dtype=np.int64), device=device)
                batch = pack_batch([wcs[i] for i in chunk], [stores[i] for i in chunk], hz, n_embd=base.config.n_embd,
                                   bos_id=bos_id, device=device)
                contexts = []
                for b, i in enumerate(chunk):
                    P = 1 + wcs[i].cost
                    contexts.append((batch["idx"][b, :P], batch["gist_mask"][b, :P], batch["gist_vectors"][b, :P]))
                plans = [[] for _ in chunk]
                passes = n_blocks + 1 if planner is not None else 1
                for j in range(passes):
                    rows = [gist_first_row(ctx, hz[b], plans[b]) for b, ctx in enumerate(contexts)]
                    nll, hidden = forward(rows)
                    if j == 0:
                        for b, i in enumerate(chunk):
                            token_first[i] = nll[b]
                    if j < n_blocks and planner is not None:
                        h = torch.stack([hidden[b, rows[b]["before"][j]] for b in range(len(chunk))])
                        for b, p in enumerate(planner.plans(h)):
                            plans[b].append(p)
                    if j == passes - 1:
                        for b, i in enumerate(chunk):
                            gist_first[i] = nll[b]
                            all_plans[i] = torch.stack(plans[b]) if plans[b] else None
    return token_first, gist_first, all_plans


def prediction_quality(model, gistnet, heads, corpus, positions, context_tokens, bos_id):
    """The megaprediction section: at every block end of the context_tokens tokens before each
    natural-text position (d, t), read as BOS + those tokens (token path), the heads' cosine to the
    real future span's gist and the copy-last-gist baseline's, per level (see the module docstring).
    `centered` repeats them after subtracting the mean target gist of the level from prediction,
    baseline and target alike: when a GistNet's gists share one large direction, the raw cosine is
    close to 1 for any guess near it, and only the centered one sees whether the part that differs
    from block to block was predicted."""
    import torch
    from megacontext.megaprediction import block_end_hidden, copy_last_gist, span_gists
    from megacontext.tree import BLOCK_SIZE as B
    device = model.get_device()
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8)
    windows = {1: [], 2: []}  # per level, per window: (head predictions, copy-last predictions, targets)
    with torch.no_grad():
        for d, t in positions:
            doc = corpus.arrays[d].astype(np.int64)
            L = min(context_tokens, t // B * B)
            K, start = L // B, t - L
            if K == 0:
                continue
            before = min(B, start // B)  # blocks before the window: the LOD2 baseline's previous 1024 tokens
            a = start - B * before
            n = min((len(doc) - a) // B, before + K + B)
            lod1, lod2 = span_gists(model, gistnet, torch.as_tensor(doc[a:a + B * n], device=device)[None])
            lod1, lod2 = lod1[0], lod2[0]
            row = torch.as_tensor(np.concatenate([[bos_id], doc[start:t]]), device=device)[None]
            hidden = block_end_hidden(model, row, K)[0]            # row k - 1: block end k, at document position start + 32k
            js = before + torch.arange(1, K + 1, device=device)    # the span index of the block that starts there
            for lv, gists, span in ((1, lod1, 1), (2, lod2, B)):
                ok = (js < len(gists)) & (js >= span)
                if bool(ok.any()):
                    copy_pred, _ = copy_last_gist(gists, span)     # row j predicts span j + span
                    windows[lv].append((heads(hidden[ok], lv), copy_pred[js[ok] - span], gists[js[ok]]))
    out = {}
    for lv, items in windows.items():
        if not items:
            continue
        center = torch.cat([target for _, _, target in items]).mean(0)
        block = {"block_ends": sum(len(target) for _, _, target in items)}
        for name, c in (("raw", None), ("centered", center)):
            shift = (lambda x: x) if c is None else (lambda x, c=c: x - c)
            head = [float(cos(shift(p), shift(tg)).mean()) for p, _, tg in items]
            copy = [float(cos(shift(q), shift(tg)).mean()) for _, q, tg in items]
            part = {"head": _mean_ci(head), "copy_last": _mean_ci(copy), "gain": _mean_ci(np.subtract(head, copy))}
            if c is None:
                block.update(part)
            else:
                block["centered"] = part
        out[f"lod{lv}"] = block
    return out

# -----------------------------------------------------------------------------
# Methods: how each one turns a history into the entries the model reads


class Harness:
    def __init__(self, model, tokenizer, cfg, gistnet=None, lensnet=None):
        import torch
        from megacontext.gistnet import GistNet, GistNetConfig
        self.torch = torch
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.device = model.get_device()
        self.bos = tokenizer.get_bos_token_id()
        self.W = cfg["budget_tokens"]
        self.seq_len = model.config.sequence_len
        self.mean_gistnet = GistNet(GistNetConfig(n_embd=model.config.n_embd, head="mean")).to(self.device).eval()
        self.gistnet = gistnet
        self.lensnet = lensnet
        self.seconds = {}
        self.tokens = {}
        self.focus_log = None  # a list while a workload's focus figures are being collected (see evaluate)

    def available(self, method):
        if method == "megacontext":
            return self.gistnet is not None and self.lensnet is not None
        if method in ("gist_uniform", "oracle"):
            return self.gistnet is not None
        return True

    def _gists(self, histories, gistnet):
        """Per history (multiple of nothing): (lod1 (n_blocks, D), lod2 (n_groups, D)) over its whole blocks."""
        import torch
        from megacontext.gistnet import history_gists
        with torch.no_grad():
            return [(lod1, lod2) for lod1, lod2, _ in history_gists(self.model, gistnet, histories)]

    def base_wc(self, n):
        from megacontext.working_context import WorkingContext
        return WorkingContext.recency(n, self.W)

    def store(self, history, gists=None):
        """The TensorStore a WC over `history` reads from: its tokens and (lod1, lod2) gists."""
        from megacontext.working_context import TensorStore
        lod1, lod2 = gists if gists is not None else (None, None)
        return TensorStore(self.torch.as_tensor(np.asarray(history, dtype=np.int64)), lod1, lod2)

    def score(self, wcs, stores, horizons):
        return score_wcs(self.model, wcs, stores, horizons, self.cfg["batch_rows"], self.bos)

    def views(self, method, histories):
        """-> (wcs, stores, whether the WCs are the method's own layout) for a non-oracle method.
        full and recency are all-LOD0 WCs over the whole history / over its last W tokens."""
        from megacontext.working_context import WorkingContext
        W = self.W
        if method == "full":
            return [WorkingContext.uniform(len(h), 0) for h in histories], [self.store(h) for h in histories], False
        if method == "recency":
            return ([WorkingContext.uniform(len(h[-W:]), 0) for h in histories],
                    [self.store(h[-W:]) for h in histories], False)
        gistnet = self.mean_gistnet if method == "meanpool" else self.gistnet
        gists = self._gists(histories, gistnet)
        return [self.base_wc(len(h)) for h in histories], [self.store(h, g) for h, g in zip(histories, gists)], True

    def fits_full(self, history, horizon):
        return 1 + len(history) + len(horizon) - 1 <= self.seq_len

    def run(self, method, histories, horizons):
        """Score one method on items -> dict(nll=[arrays], correct=[arrays], wcs=[...] or None).
        `full` is only called on items where it fits (the caller checks fits_full)."""
        t0 = time.time()
        if method == "oracle":
            result = self._oracle(histories, horizons)
        elif method == "megacontext":
            result = self._megacontext(histories, horizons)
        else:
            wcs, stores, own_layout = self.views(method, histories)
            nll, correct = self.score(wcs, stores, horizons)
            result = dict(nll=nll, correct=correct, wcs=wcs if own_layout else None)
        self.seconds[method] = self.seconds.get(method, 0.0) + time.time() - t0
        self.tokens[method] = self.tokens.get(method, 0) + sum(len(h) + len(z) for h, z in zip(histories, horizons))
        return result

    def _candidates(self, wc):
        """Every WC one expansion away (collapsing the oldest non-tail LOD0 block when needed), and
        for each expanded LOD2 gist every WC with one of its LOD1 children expanded too: a LOD2 ->
        LOD1 step alone rarely lowers the NLL, so a greedy search without it never reaches a fact
        inside a LOD2 span (a focus policy gets there in two refocus rounds)."""
        from megacontext.lens_targets import candidates, children_of, expand_with_room
        out = []
        for kind, members, c in candidates(wc):
            if kind != "expand":
                continue
            out.append(c)
            parent = wc.entries[members[0]]
            if parent.level == 2:
                out += [d for d in (expand_with_room(c, j) for j in children_of(parent, c)) if d is not None]
        return out

    def _oracle(self, histories, horizons):
        gists = self._gists(histories, self.gistnet)
        wcs = [self.base_wc(len(h)) for h in histories]
        stores = [self.store(h, g) for h, g in zip(histories, gists)]
        nll, correct = self.score(wcs, stores, horizons)
        for i in range(len(histories)):
            current = float(nll[i].mean())
            for _ in range(self.cfg["oracle_rounds"]):
                cands = self._candidates(wcs[i])
                if not cands:
                    break
                c_nll, c_correct = self.score(cands, [stores[i]] * len(cands), [horizons[i]] * len(cands))
                means = [float(x.mean()) for x in c_nll]
                best = min(range(len(cands)), key=lambda k: means[k])
                if means[best] >= current:
                    break
                wcs[i], nll[i], correct[i], current = cands[best], c_nll[best], c_correct[best], means[best]
        return dict(nll=nll, correct=correct, wcs=wcs)

    def _megacontext(self, histories, horizons):
        gists = self._gists(histories, self.gistnet)
        stores = [self.store(h, g) for h, g in zip(histories, gists)]
        wcs = [self.focus(st, len(h), g) for st, h, g in zip(stores, histories, gists)]
        nll, correct = self.score(wcs, stores, horizons)
        return dict(nll=nll, correct=correct, wcs=wcs)

    def gist_first(self, histories, horizons, planner):
        """Token-first vs gist-first horizon NLL on gist_uniform's WCs -> dict(token_first, gist_first:
        per-item mean NLL lists; plan_cos: per-item mean cosine of the LOD1 plans to the GistNet gists
        of the horizon's whole blocks, when lod_mix has LOD1 and the horizon a whole block)."""
        import torch
        from megacontext.gistnet import token_embeddings
        from megacontext.tree import BLOCK_SIZE as B
        wcs, stores, _ = self.views("gist_uniform", histories)
        tf, gf, plans = score_gist_first(self.model, wcs, stores, horizons, planner, self.cfg["batch_rows"], self.bos)
        out = {"token_first": [float(x.mean()) for x in tf], "gist_first": [float(x.mean()) for x in gf], "plan_cos": []}
        whole = len(horizons[0]) // B if horizons else 0
        if 1 in planner.order and whole:
            slot = planner.order.index(1)
            with torch.no_grad():
                blocks = torch.as_tensor(np.stack([np.asarray(z[:whole * B]) for z in horizons]), device=self.device)
                true = self.gistnet(token_embeddings(self.model, blocks.view(-1, B)), 1).float().view(len(horizons), whole, -1)
            for i, p in enumerate(plans):
                out["plan_cos"].append(float(torch.nn.functional.cosine_similarity(
                    p[:whole, slot].float(), true[i], dim=-1).mean()))
        return out

    def focus(self, store, history_len, gists):
        """The WC LensNet + the allocator arrive at when a history of history_len tokens (read
        from store) streams in (see the module docstring); appends one record per refocus to
        self.focus_log when it is a list."""
        from megacontext.allocator import AllocatorConfig, FocusAllocator
        from megacontext.gistnet import token_embeddings
        from megacontext.lensnet import tail_gists_of
        from megacontext.runtime import Focus
        from megacontext.telemetry import budget_utilization, residency, swap_rate
        from megacontext.tree import BLOCK_SIZE as B
        from megacontext.working_context import WorkingContext
        lod1, lod2 = gists
        K, W = self.cfg["refocus_every"], self.W
        embed_fn = lambda ids: token_embeddings(self.model, ids.to(self.device))
        focus = Focus(self.lensnet, FocusAllocator(AllocatorConfig(**self.cfg["allocator"])), self.cfg["refocus_rounds"])
        n = min(history_len, K)
        wc = WorkingContext.recency(n, W)
        previous = None  # the WC after the last refocus (residency compares consecutive ones)
        while True:
            tail = tail_gists_of(lod1[:n // B], lod2[:n // (B * B)])  # what a TailGistCache holds at n tokens
            refocus = focus.refocus(wc, store, embed_fn, tail)
            if self.focus_log is not None:
                self.focus_log.append({"swap_rate": swap_rate(len(refocus.actions), len(wc)),
                                       "residency": residency(previous, refocus.wc) if previous is not None else None,
                                       "budget_utilization": budget_utilization(refocus.wc),
                                       "invalid_scores": refocus.invalid_scores})
            wc = previous = refocus.wc
            if n == history_len:
                return wc
            n = min(history_len, n + K)
            wc = wc.extend(n)

# -----------------------------------------------------------------------------
# Workloads


def natural_positions(corpus, cfg, rng):
    """(doc index, t) pairs at least max(ratios) x W deep with a full horizon after them.

    positions_by "length": drawn uniformly from all candidates, so each source weighs by its
    length (the offline test split is ~86% plays). "source": the sources take turns (each
    source's candidates shuffled), so code, reference text and plays weigh alike while a
    source has candidates left."""
    deepest = max(cfg["ratios"]) * cfg["budget_tokens"]
    candidates = []
    for d, arr in enumerate(corpus.arrays):
        for t in range(deepest, len(arr) - cfg["horizon"] + 1, cfg["stride"]):
            candidates.append((d, t))
    rng.shuffle(candidates)
    if cfg["positions_by"] == "length":
        return sorted(candidates[:cfg["positions"]])
    by_source = {}
    for d, t in candidates:
        by_source.setdefault(corpus.sources[d], []).append((d, t))
    queues = [by_source[src] for src in sorted(by_source)]
    chosen = []
    while len(chosen) < cfg["positions"] and any(queues):
        for q in queues:
            if q and len(chosen) < cfg["positions"]:
                chosen.append(q.pop())
    return sorted(chosen)


def delta_positions(corpus, cfg, rng):
    C, H = cfg["delta_context"], cfg["delta_horizon"]
    candidates = [(d, t) for d, arr in enumerate(corpus.arrays) for t in range(C, len(arr) - H + 1, 1024)]
    rng.shuffle(candidates)
    return sorted(candidates[:cfg["delta_positions"]])


def _key_span(case):
    """History positions (no BOS) of the first copy of the answer inside the needle: the tokens
    that must be LOD0 at the question for the model to read the key (the whole needle if the
    answer's tokens do not appear in it as such)."""
    needle, ans = case.tokens[case.needle_start:case.needle_end], case.answer
    for j in range(len(needle) - len(ans) + 1):
        if (needle[j:j + len(ans)] == ans).all():
            return case.needle_start - 1 + j, case.needle_start - 1 + j + len(ans)
    return case.needle_start - 1, case.needle_end - 1


def _mean_ci(values):

    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return None
    m = float(v.mean())
    half = 1.96 * float(v.std(ddof=1)) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return {"value": m, "ci95": [m - half, m + half], "n": int(len(v))}


def _git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def evaluate(model, tokenizer, cfg, gistnet=None, task_files=(), token_bytes=None, progress=True, device_name="",
             corpus=None, lensnet=None, heads=None, heads_info=None):
    """Run every workload -> the report dict (DESIGN.md section 6). corpus: the held-out
    TokenCorpus (default: the test split of the offline long documents). heads: MegaPrediction
    heads (megaprediction.load_megaprediction), heads_info: what it returned beside them."""

    import torch
    from tqdm import tqdm
    from megacontext.longdocs import load_corpus
    from megacontext.synthetic import make_case, TASKS
    from megacontext.losses import delta_nll
    from megacontext.tree import BLOCK_SIZE

    W, H = cfg["budget_tokens"], cfg["horizon"]
    if W < BLOCK_SIZE or W % BLOCK_SIZE:
        raise ValueError(f"budget_tokens={W} must be a positive multiple of {BLOCK_SIZE}")
    if W + H > model.config.sequence_len:
        raise ValueError(f"budget_tokens + horizon = {W + H} exceeds the model's sequence_len "
                         f"{model.config.sequence_len}; lower budget_tokens or horizon")
    C, DH = cfg["delta_context"], cfg["delta_horizon"]
    if 1 + C + DH - 1 > model.config.sequence_len:
        raise ValueError(f"delta_context + delta_horizon = {C + DH} (plus the BOS) exceeds the model's sequence_len "
                         f"{model.config.sequence_len}; lower delta_context or delta_horizon")
    if C % BLOCK_SIZE or C < 2 * BLOCK_SIZE:
        raise ValueError(f"delta_context={C} must be a multiple of {BLOCK_SIZE} and at least {2 * BLOCK_SIZE}")
    if cfg["refocus_every"] < 1:
        raise ValueError(f"refocus_every={cfg['refocus_every']} must be at least 1 (tokens between refocuses)")
    if cfg["refocus_rounds"] < 1:
        raise ValueError(f"refocus_rounds={cfg['refocus_rounds']} must be at least 1 (LensNet + allocator rounds per refocus)")
    planner, heads_info = None, dict(heads_info or {})
    if cfg.get("gist_first") and heads is None:
        raise ValueError("gist_first needs MegaPrediction heads: set megaprediction to an end-to-end run trained with them")
    if heads is not None:
        from megacontext.megaprediction import Planner
        if gistnet is None:
            raise ValueError("megaprediction is set but gistnet is not: the heads predict GistNet's gists; set gistnet "
                             "to the same end-to-end run")
        trained_on = heads_info.get("gistnet_identity")
        if trained_on and trained_on != gistnet.identity():
            raise ValueError(f"the MegaPrediction heads were trained on gists of {trained_on} but gistnet is "
                             f"{gistnet.identity()}; set gistnet to the run that trained the heads")
        if cfg.get("gist_first"):
            planner = Planner(heads, cfg.get("lod_mix") or [1])
    harness = Harness(model, tokenizer, cfg, gistnet, lensnet)
    methods = [m for m in cfg["methods"] if harness.available(m)]
    absent = {m: ABSENT_REASONS.get(m, "needs a trained GistNet (set `gistnet:` to a JT1 mc_XXXXXX.pt)")
              for m in cfg["methods"] if m not in methods}
    ratios = [int(r) for r in cfg["ratios"]]
    timings = {}
    report = {"config": cfg, "commit": _git_commit(), "device": device_name or str(harness.device),
              "budget_tokens": W, "methods": methods, "absent_methods": absent}
    if token_bytes is None:
        from nanochat.tokenizer import get_token_bytes
        token_bytes = get_token_bytes(device="cpu")
    token_bytes = token_bytes.cpu().numpy()
    corpus = corpus if corpus is not None else load_corpus(tokenizer, "test")
    deepest = max(ratios) * W
    long_corpus = corpus.longer_than(deepest + H)
    report["documents"] = {"test_documents": len(corpus), "used_for_bpb": len(long_corpus),
                           "skipped_shorter_than_history_plus_horizon": len(long_corpus.skipped) - len(corpus.skipped),
                           "skipped": {k: int(v) for k, v in long_corpus.skipped.items()}}
    bar = tqdm(total=0, desc="megacontext.eval", unit="item", disable=not progress, dynamic_ncols=True)

    def run_all(histories, horizons, oracle_subset):
        """{method: result} for items; full only on items where it fits, oracle on oracle_subset (indices)."""
        results = {}
        oracle_subset = set(oracle_subset)
        bar.total += len(histories) * len(methods)
        bar.refresh()
        for m in methods:
            idx = list(range(len(histories)))
            if m == "full":
                idx = [i for i in idx if harness.fits_full(histories[i], horizons[i])]
            elif m == "oracle":
                idx = [i for i in idx if i in oracle_subset]
            if idx:
                r = harness.run(m, [histories[i] for i in idx], [horizons[i] for i in idx])
                results[m] = {"index": idx, **r}
            bar.update(len(histories))
        return results

    # --- natural text: bpb by history length ---------------------------------
    t0 = time.time()
    rng = random.Random(cfg["seed"])
    positions = natural_positions(long_corpus, cfg, rng)
    if not positions:
        raise ValueError(f"no test document has the {deepest + H} tokens that history {max(ratios)}x W plus the "
                         f"horizon need; lower ratios or budget_tokens")
    report["bpb"], report["gap_closed"], report["lod_composition"] = {}, {}, {}
    natural_nll = {}  # (method, ratio) -> mean NLL nats/token, for the testbed figures
    natural_gap_by_position = []  # (source, NLL recency - full) at the testbed ratio
    harness.focus_log = []  # the focus figures are those of the natural-text workload (the eval corpus)
    gist_first, gist_first_s = {}, 0.0
    for r in ratios:
        n = r * W
        histories = [long_corpus.arrays[d][t - n:t].astype(np.int64) for d, t in positions]
        horizons = [long_corpus.arrays[d][t:t + H].astype(np.int64) for d, t in positions]
        results = run_all(histories, horizons, range(cfg["oracle_positions"]))
        if planner is not None:
            t_gf = time.time()
            gist_first[str(n)] = harness.gist_first(histories, horizons, planner)
            gist_first_s += time.time() - t_gf
        for m, res in results.items():
            if res["wcs"]:  # mean WC make-up: LOD0 tokens, LOD1 gists, LOD2 gists
                counts = np.array([[sum(e.cost for e in wc.entries if e.level == lv) for lv in range(3)]
                                   for wc in res["wcs"]], dtype=np.float64)
                report["lod_composition"].setdefault(m, {})[str(n)] = dict(zip(("lod0_tokens", "lod1_gists", "lod2_gists"),
                                                                               counts.mean(0).tolist()))

        def bpb_of(res, keep=None):
            ks = [k for k, i in enumerate(res["index"]) if keep is None or i in keep]
            nll = np.concatenate([res["nll"][k] for k in ks])
            nbytes = np.concatenate([token_bytes[horizons[res["index"][k]]] for k in ks])
            return float(nll.sum() / (math.log(2) * max(1, nbytes.sum()))), float(nll.mean())

        for m, res in results.items():
            report["bpb"].setdefault(m, {})[str(n)], natural_nll[(m, r)] = bpb_of(res)
        if r == cfg["testbed_ratio"] and "full" in results and "recency" in results:
            # per position: NLL(recency) - NLL(full), for the natural gap's interval and its split by source
            full_of = {i: x.mean() for i, x in zip(results["full"]["index"], results["full"]["nll"])}
            natural_gap_by_position = [(long_corpus.sources[positions[i][0]], float(x.mean() - full_of[i]))
                                       for i, x in zip(results["recency"]["index"], results["recency"]["nll"])
                                       if i in full_of]
        if "oracle" in results and len(results["oracle"]["index"]) < len(histories):
            # the oracle's figure is over its subset: give the WC it starts from on the same positions
            sub = report.setdefault("oracle_subset", {})
            sub["bpb"] = f"first {len(results['oracle']['index'])} of {len(histories)} positions"
            keep = set(results["oracle"]["index"])
            for m in ("gist_uniform", "recency", "full"):
                if m in results and keep <= set(results[m]["index"]):
                    sub.setdefault(f"bpb_{m}_same_positions", {})[str(n)] = bpb_of(results[m], keep)[0]
    same = report.get("oracle_subset", {})
    for m, by_hist in report["bpb"].items():
        for hist, value in by_hist.items():
            full, rec = report["bpb"].get("full", {}).get(hist), report["bpb"].get("recency", {}).get(hist)
            if m == "oracle" and "bpb" in same:  # its own positions: recency and full on the same ones
                full = same.get("bpb_full_same_positions", {}).get(hist)
                rec = same.get("bpb_recency_same_positions", {}).get(hist)
            if full is not None and rec is not None and rec - full > 0:
                report["gap_closed"].setdefault(m, {})[hist] = (rec - value) / (rec - full)
    report["natural_positions"] = len(positions)
    if "megacontext" in methods:
        log, harness.focus_log = harness.focus_log, None
        for key in ("swap_rate", "residency", "budget_utilization"):
            values = [rec[key] for rec in log if rec[key] is not None]
            report[key] = {"megacontext": float(np.mean(values))} if values else {}
        report["focus"] = {"refocuses": len(log), "invalid_scores": int(sum(rec["invalid_scores"] for rec in log)),
                           "refocus_every": cfg["refocus_every"], "refocus_rounds": cfg["refocus_rounds"]}
    harness.focus_log = None
    timings["bpb"] = time.time() - t0 - gist_first_s
    if planner is not None:
        timings["gist_first"] = gist_first_s
        by_history = {}
        for hist, res in gist_first.items():
            entry = {"token_first_nll": float(np.mean(res["token_first"])), "gist_first_nll": float(np.mean(res["gist_first"])),
                     "difference": _mean_ci(np.subtract(res["gist_first"], res["token_first"]))}
            if res["plan_cos"]:
                entry["plan_cosine_lod1"] = _mean_ci(res["plan_cos"])
            by_history[hist] = entry
        report["gist_first"] = {"lod_mix": sorted(planner.order), "placement": [f"LOD{lv}" for lv in planner.order],
                                "wc": "gist_uniform", "plan_slots_in_budget": False,
                                "plan_slots_per_block": planner.slots, "positions": len(positions),
                                "by_history": by_history}
    if heads is not None:
        t0 = time.time()
        ctx = heads_info.get("context_tokens") or 1024
        ctx = min(ctx, (model.config.sequence_len - 1) // BLOCK_SIZE * BLOCK_SIZE)
        report["megaprediction"] = {"heads": heads_info.get("path"), "context_tokens": ctx, "positions": len(positions),
                                    **prediction_quality(model, gistnet, heads, long_corpus, positions, ctx, harness.bos)}
        timings["megaprediction"] = time.time() - t0

    # --- ΔNLL@H ---------------------------------------------------------------
    t0 = time.time()
    dpos = delta_positions(corpus, cfg, random.Random(cfg["seed"] + 1))
    gisters = {"gistnet": gistnet} if gistnet is not None else {}
    gisters["meanpool"] = harness.mean_gistnet
    per = {name: {"lod1": [], "lod2": [], "drop": []} for name in gisters}
    bar.total += len(dpos)
    with torch.no_grad():
        for d, t in dpos:
            doc = torch.as_tensor(corpus.arrays[d].astype(np.int64))
            for name, g in gisters.items():
                r = delta_nll(model, g, doc, t, context_tokens=C, horizon=DH, bos=harness.bos)
                per[name]["lod1"].append(r["delta_lod1"])
                per[name]["lod2"].append(r["delta_lod2"])
                per[name]["drop"].append(r["delta_drop"])
            bar.update(1)

    def delta_block(values):
        out = {k: _mean_ci(v) for k, v in values.items()}
        drop = out["drop"]["value"] if out["drop"] else None
        for lod in ("lod1", "lod2"):
            ok = drop is not None and drop > 0 and out[lod] is not None
            out[f"recovered_{lod}"] = 1.0 - out[lod]["value"] / drop if ok else None
        return out

    if dpos:
        report["delta_nll"] = delta_block(per["gistnet" if gistnet is not None else "meanpool"])
        report["delta_nll"]["gister"] = "gistnet" if gistnet is not None else "meanpool"
        report["delta_nll_meanpool"] = delta_block(per["meanpool"])
    timings["delta_nll"] = time.time() - t0

    # --- passkey by depth x ratio, and needle recall ---------------------------
    t0 = time.time()
    report["passkey"], report["needle_recall"] = {}, {}
    for r in ratios:
        n = r * W
        cases = [make_case("passkey", random.Random(f"{cfg['seed']}:passkey:{r}:{depth}:{k}"), tokenizer, corpus,
                           n + 1, depth) for depth in cfg["depths"] for k in range(cfg["passkey_cases"])]
        histories = [c.history[1:] for c in cases]  # the row's BOS stands for the case's own
        horizons = [c.answer for c in cases]
        oracle_subset = [i for i in range(len(cases)) if i % cfg["passkey_cases"] < cfg["oracle_cases"]]
        if "oracle" in methods and len(oracle_subset) < len(cases):
            report.setdefault("oracle_subset", {})["passkey"] = (f"first {cfg['oracle_cases']} of "
                                                                 f"{cfg['passkey_cases']} cases per cell")
        for m, res in run_all(histories, horizons, oracle_subset).items():
            for k, i in enumerate(res["index"]):
                c = cases[i]
                cell = report["passkey"].setdefault(m, {}).setdefault(str(r), {}).setdefault(str(c.depth), [])
                cell.append(bool(res["correct"][k].all()))
                start, end = _key_span(c)
                if m == "full":
                    seen = True
                elif m == "recency":
                    seen = start >= len(histories[i]) - W
                else:
                    wc = res["wcs"][k]
                    seen = all(e.level == 0 for e in wc.entries if e.end > start and e.start < end)
                rec = report["needle_recall"].setdefault(m, {}).setdefault(str(r), {}).setdefault(str(c.depth), [])
                rec.append(seen)
    for table in (report["passkey"], report["needle_recall"]):
        for m in table:
            for r in table[m]:
                for dep in table[m][r]:
                    table[m][r][dep] = float(np.mean(table[m][r][dep]))
    timings["passkey"] = time.time() - t0

    # --- synthetic tasks and --tasks files ------------------------------------
    t0 = time.time()
    report["tasks"] = {}
    synthetic_nll = {}
    n_task = cfg["task_ratio"] * W
    trng = random.Random(f"{cfg['seed']}:tasks")
    workloads = []
    for kind in TASKS:
        cases = [make_case(kind, random.Random(f"{cfg['seed']}:{kind}:{k}"), tokenizer, corpus, n_task + 1,
                           trng.random()) for k in range(cfg["task_cases"])]
        workloads.append((kind, [c.history[1:] for c in cases], [c.answer for c in cases], [c.depth for c in cases]))
    for path in task_files:
        items = read_task_file(path, tokenizer)
        name = os.path.splitext(os.path.basename(path))[0]
        workloads.append((name, [np.asarray(it["history"], dtype=np.int64) for it in items],
                          [np.asarray(it["answer"], dtype=np.int64) for it in items], [it["depth"] for it in items]))
    for name, histories, horizons, depths in workloads:
        for m, res in run_all(histories, horizons, range(cfg["oracle_tasks"])).items():
            acc = [bool(c.all()) for c in res["correct"]]
            nll = [float(x.mean()) for x in res["nll"]]
            entry = {"accuracy": float(np.mean(acc)), "answer_nll": float(np.mean(nll)), "n": len(acc)}
            if len(res["index"]) < len(histories):
                entry["subset"] = f"first {len(res['index'])} of {len(histories)}"
            report["tasks"].setdefault(name, {})[m] = entry
            if name in TASKS:
                synthetic_nll.setdefault(m, []).extend(nll)
    timings["tasks"] = time.time() - t0
    bar.close()

    # --- the testbed figures ----------------------------------------------------
    tr = cfg["testbed_ratio"]
    testbed = {}
    if "full" in synthetic_nll and "recency" in synthetic_nll and tr == cfg["task_ratio"]:
        testbed["nll_gap_synthetic"] = float(np.mean(synthetic_nll["recency"]) - np.mean(synthetic_nll["full"]))
    if ("full", tr) in natural_nll and ("recency", tr) in natural_nll:
        testbed["nll_gap_natural"] = natural_nll[("recency", tr)] - natural_nll[("full", tr)]
        if natural_gap_by_position:  # testbed keeps DESIGN §6's three keys; the gap's spread goes beside it
            report["testbed_natural_gap"] = {
                **_mean_ci([g for _, g in natural_gap_by_position]),
                "by_source": {src: _mean_ci([g for s, g in natural_gap_by_position if s == src])
                              for src in sorted({s for s, _ in natural_gap_by_position})}}
    if "full" in report["passkey"]:
        testbed["passkey_full"] = min(v for by_depth in report["passkey"]["full"].values() for v in by_depth.values())
    report["testbed"] = testbed
    report["testbed_history_tokens"] = tr * W
    report["tokens_per_s"] = {m: harness.tokens[m] / harness.seconds[m] for m in methods if harness.seconds.get(m)}
    report["timings_s"] = timings
    return report

# -----------------------------------------------------------------------------
# Report files


def _fmt(x, digits=3):
    if x is None:
        return "n/a"
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


TESTBED_GOALS = {"nll_gap_synthetic": (1.0, "nats/token, recency - full on synthetic answers"),
                 "nll_gap_natural": (0.05, "nats/token, recency - full on natural text"),
                 "passkey_full": (0.95, "lowest full-context passkey exact match over depths x ratios")}


FOCUS_TARGETS = {"swap_rate": "0.05 - 0.20", "residency": ">= 0.90", "budget_utilization": "close to 1"}


def report_markdown(report):
    W = report["budget_tokens"]
    lines = [f"# Long-context evaluation (W = {W} token-equivalents)", "",
             f"commit `{report['commit']}`, device {report['device']}, model `{report['config']['model_tag']}`, "
             f"GistNet `{report['config']['gistnet'] or 'none'}`, LensNet `{report['config'].get('lensnet') or 'none'}`", "",
             f"Methods: {', '.join(report['methods'])}."]
    for m, why in report["absent_methods"].items():
        lines.append(f"Absent: **{m}**: {why}.")
    for what, how in report.get("oracle_subset", {}).items():
        if isinstance(how, str):
            lines.append(f"Oracle subset ({what}): {how}.")
    same = report.get("oracle_subset", {}).get("bpb_gist_uniform_same_positions")
    if same:
        lines.append("On the oracle's positions, bpb oracle vs gist_uniform: " + ", ".join(
            f"{int(h) // report['budget_tokens']}W {_fmt(report['bpb']['oracle'].get(h))} vs {_fmt(v)}"
            for h, v in same.items()) + ".")
    lines += ["", f"## Testbed: does the base model need distant context? (history = {report['testbed_history_tokens']} tokens)", "",
              "| figure | value | goal | met |", "|---|---|---|---|"]
    for key, (goal, what) in TESTBED_GOALS.items():
        v = report["testbed"].get(key)
        lines.append(f"| {key} ({what}) | {_fmt(v)} | >= {goal} | {'yes' if v is not None and v >= goal else 'no'} |")
    gap = report.get("testbed_natural_gap")
    if gap:
        lines += ["", f"Natural gap per position (positions by {report['config']['positions_by']}): "
                  f"{_fmt(gap['value'])} [{_fmt(gap['ci95'][0])}, {_fmt(gap['ci95'][1])}], n = {gap['n']}; by source: "
                  + ", ".join(f"{src} {_fmt(g['value'])} [{_fmt(g['ci95'][0])}, {_fmt(g['ci95'][1])}] (n = {g['n']})"
                              for src, g in gap["by_source"].items()) + "."]
    hists = sorted({int(h) for by in report["bpb"].values() for h in by})
    lines += ["", f"## Long-document bits per byte (next {report['config']['horizon']} tokens, "
              f"{report['natural_positions']} positions of {report['documents']['used_for_bpb']} test documents)", "",
              "| method | " + " | ".join(f"{h // W}W ({h})" for h in hists) + " |", "|---|" + "---|" * len(hists)]
    for m in report["methods"]:
        if m in report["bpb"]:
            lines.append(f"| {m} | " + " | ".join(_fmt(report["bpb"][m].get(str(h))) for h in hists) + " |")
    lines += ["", "Gap closed, (bpb_recency - bpb_m) / (bpb_recency - bpb_full) (the oracle's on its own positions):", "",
              "| method | " + " | ".join(f"{h // W}W" for h in hists) + " |", "|---|" + "---|" * len(hists)]
    for m in report["methods"]:
        if m in report["gap_closed"]:
            lines.append(f"| {m} | " + " | ".join(_fmt(report["gap_closed"][m].get(str(h))) for h in hists) + " |")
    comp = report.get("lod_composition", {})
    if comp:
        lines += ["", "WC make-up (mean LOD0 tokens / LOD1 gists / LOD2 gists):", "",
                  "| method | " + " | ".join(f"{h // W}W" for h in hists) + " |", "|---|" + "---|" * len(hists)]
        for m, by in comp.items():
            lines.append(f"| {m} | " + " | ".join(
                "/".join(f"{by[str(h)][k]:.0f}" for k in ("lod0_tokens", "lod1_gists", "lod2_gists")) if str(h) in by else ""
                for h in hists) + " |")
    if report.get("swap_rate"):
        f = report["focus"]
        lines += ["", f"## Focus (megacontext, natural-text workload: {f['refocuses']} refocuses, one every "
                  f"{f['refocus_every']} tokens, up to {f.get('refocus_rounds', 1)} rounds each; "
                  f"{f['invalid_scores']} invalid scores)", "",
                  "| figure | value | seed target |", "|---|---|---|"]
        for key, goal in FOCUS_TARGETS.items():
            lines.append(f"| {key} | {_fmt(report[key].get('megacontext'))} | {goal} |")
    if "delta_nll" in report:
        lines += ["", f"## ΔNLL@H (C = {report['config']['delta_context']}, H = {report['config']['delta_horizon']}, "
                  f"nats/token, 95% intervals)", "", "| gister | LOD1 | LOD2 | drop | recovered LOD1 | recovered LOD2 |",
                  "|---|---|---|---|---|---|"]
        for name, block in (("GistNet" if report["delta_nll"]["gister"] == "gistnet" else "mean pool", report["delta_nll"]),
                            ("mean pool", report["delta_nll_meanpool"])):
            cells = [f"{_fmt(block[k]['value'])} [{_fmt(block[k]['ci95'][0])}, {_fmt(block[k]['ci95'][1])}]"
                     for k in ("lod1", "lod2", "drop")]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt(block['recovered_lod1'])} | {_fmt(block['recovered_lod2'])} |")
            if report["delta_nll"]["gister"] != "gistnet":
                break
        lines.append(f"\n(n = {report['delta_nll']['lod1']['n']} positions)")
    if "megaprediction" in report:
        mp = report["megaprediction"]
        lines += ["", f"## MegaPrediction: predicted vs real next gist (cosine, 95% intervals; every block end of the "
                  f"{mp['context_tokens']} tokens before {mp['positions']} natural-text positions, token path)", "",
                  "| level | heads | copy-last baseline | heads - baseline | windows | block ends |", "|---|---|---|---|---|---|"]
        ci = lambda b: f"{_fmt(b['value'])} [{_fmt(b['ci95'][0])}, {_fmt(b['ci95'][1])}]"
        for lv, what in (("lod1", "LOD1 (next 32 tokens)"), ("lod2", "LOD2 (next 1024 tokens)")):
            if lv in mp:
                for b, how in ((mp[lv], ""), (mp[lv]["centered"], ", centered")):
                    lines.append(f"| {what}{how} | {ci(b['head'])} | {ci(b['copy_last'])} | {ci(b['gain'])} | "
                                 f"{b['head']['n']} | {mp[lv]['block_ends']} |")
        lines.append("\n(centered: cosines after subtracting the level's mean real gist from all three vectors.)")
    if "gist_first" in report:
        gf = report["gist_first"]
        lines += ["", f"## Gist-first decoding (lod_mix {gf['lod_mix']}: plan slots {' + '.join(gf['placement'])} before "
                  f"each horizon block; same {gf['wc']} WCs; plan slots not charged to W; {gf['positions']} positions)", "",
                  "| history | token-first NLL | gist-first NLL | gist - token (95% CI) | LOD1 plan cosine |",
                  "|---|---|---|---|---|"]
        for hist, e in sorted(gf["by_history"].items(), key=lambda kv: int(kv[0])):
            d = e["difference"]
            plan = e.get("plan_cosine_lod1")
            lines.append(f"| {int(hist) // W}W ({hist}) | {_fmt(e['token_first_nll'])} | {_fmt(e['gist_first_nll'])} | "
                         f"{_fmt(d['value'])} [{_fmt(d['ci95'][0])}, {_fmt(d['ci95'][1])}] | "
                         f"{_fmt(plan['value']) if plan else 'n/a'} |")
        lines.append("\n(NLL in nats/token; negative differences mean the plans helped.)")
    lines += ["", "## Passkey exact match (rows: depth; columns: history / W)", ""]
    for m, by_ratio in report["passkey"].items():
        ratios = sorted(by_ratio, key=int)
        depths = sorted({d for r in by_ratio.values() for d in r}, key=float)
        lines += [f"**{m}** (needle recall in parentheses)", "", "| depth | " + " | ".join(f"{r}W" for r in ratios) + " |",
                  "|---|" + "---|" * len(ratios)]
        for d in depths:
            cells = []
            for r in ratios:
                v = by_ratio[r].get(d)
                rec = report["needle_recall"].get(m, {}).get(r, {}).get(d)
                cells.append(f"{_fmt(v, 2)} ({_fmt(rec, 2)})" if v is not None else "")
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"## Tasks (history = {report['config']['task_ratio']}W for the synthetic ones): accuracy / answer NLL", "",
              "| task | " + " | ".join(report["methods"]) + " |", "|---|" + "---|" * len(report["methods"])]
    for task, by_m in report["tasks"].items():
        cells = [f"{_fmt(by_m[m]['accuracy'], 2)} / {_fmt(by_m[m]['answer_nll'], 2)}" if m in by_m else "" for m in report["methods"]]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines += ["", "## Cost", "", "| method | tokens/s |", "|---|---|"]
    lines += [f"| {m} | {v:,.0f} |" for m, v in report["tokens_per_s"].items()]
    lines += ["", "Time by workload: " + ", ".join(f"{k} {v:.0f}s" for k, v in report["timings_s"].items()) + "."]
    skipped = report["documents"]["skipped_shorter_than_history_plus_horizon"]
    lines += ["", f"Test documents: {report['documents']['test_documents']}; {skipped} skipped for bpb "
              f"(shorter than {max(report['config']['ratios'])}W + H tokens)."]
    return "\n".join(lines) + "\n"


def write_plots(report, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    W = report["budget_tokens"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ticks = set()
    for m, by in report["bpb"].items():
        hs = sorted(by, key=int)
        label = f"{m} ({report['oracle_subset']['bpb']})" if m == "oracle" and "bpb" in report.get("oracle_subset", {}) else m
        ax.plot([int(h) // W for h in hs], [by[h] for h in hs], marker="o", label=label)
        ticks |= {int(h) // W for h in hs}
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ticks), [f"{t}W" for t in sorted(ticks)])
    ax.set_xlabel("history / W")
    ax.set_ylabel("bits per byte (horizon)")
    ax.set_title(f"Long-document bpb at W = {W}")
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out, "bpb_vs_history.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    for m, by_ratio in report["passkey"].items():
        ratios = sorted(by_ratio, key=int)
        depths = sorted({d for r in by_ratio.values() for d in r}, key=float)
        grid = np.array([[by_ratio[r].get(d, np.nan) for r in ratios] for d in depths], dtype=float)
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(ratios)), [f"{r}W" for r in ratios])
        ax.set_yticks(range(len(depths)), depths)
        ax.set_xlabel("history / W")
        ax.set_ylabel("needle depth")
        ax.set_title(f"passkey exact match: {m}")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        paths.append(os.path.join(out, f"passkey_{m}.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    for m, by in report.get("lod_composition", {}).items():
        hs = sorted(by, key=int)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        bottom = np.zeros(len(hs))
        for key, label in (("lod0_tokens", "LOD0 tokens"), ("lod1_gists", "LOD1 gists"), ("lod2_gists", "LOD2 gists")):
            vals = np.array([by[h][key] for h in hs])
            ax.bar(range(len(hs)), vals, bottom=bottom, label=label)
            bottom += vals
        ax.set_xticks(range(len(hs)), [f"{int(h) // W}W" for h in hs])
        ax.set_xlabel("history / W")
        ax.set_ylabel("WC cost (token-equivalents)")
        ax.set_title(f"WC make-up by LOD: {m}")
        ax.legend()
        fig.tight_layout()
        paths.append(os.path.join(out, f"lod_composition_{m}.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    if "delta_nll" in report:
        blocks = [("GistNet" if report["delta_nll"]["gister"] == "gistnet" else "mean pool", report["delta_nll"])]
        if report["delta_nll"]["gister"] == "gistnet":
            blocks.append(("mean pool", report["delta_nll_meanpool"]))
        fig, ax = plt.subplots(figsize=(6, 4))
        keys = ["lod1", "lod2", "drop"]
        width = 0.8 / len(blocks)
        for j, (name, block) in enumerate(blocks):
            vals = [block[k]["value"] for k in keys]
            err = [[v - block[k]["ci95"][0] for k, v in zip(keys, vals)], [block[k]["ci95"][1] - v for k, v in zip(keys, vals)]]
            ax.bar(np.arange(len(keys)) + j * width, vals, width, yerr=np.nan_to_num(err), capsize=4, label=name)
        ax.set_xticks(np.arange(len(keys)) + width * (len(blocks) - 1) / 2, ["ΔNLL LOD1", "ΔNLL LOD2", "ΔNLL drop"])
        ax.set_ylabel("nats / token")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.legend()
        ax.set_title("ΔNLL@H with 95% intervals")
        fig.tight_layout()
        paths.append(os.path.join(out, "delta_nll.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def write_report(report, out):
    """report.json (temp then rename), report.md and the plots into out."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "report.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2, sort_keys=False)
    os.replace(path + ".tmp", path)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report_markdown(report))
    return [path, os.path.join(out, "report.md")] + write_plots(report, out)


def headline(report):
    """The few lines speedrun.sh prints at the end."""
    W = report["budget_tokens"]
    tb = report["testbed"]
    lines = [f"testbed (history {report['testbed_history_tokens']}): NLL gap synthetic {_fmt(tb.get('nll_gap_synthetic'))} "
             f"(goal >= 1.0), natural {_fmt(tb.get('nll_gap_natural'))} (goal >= 0.05), passkey full "
             f"{_fmt(tb.get('passkey_full'), 2)} (goal >= 0.95)"]
    gap = report.get("testbed_natural_gap")
    if gap:
        lines.append(f"natural NLL gap by source (positions by {report['config'].get('positions_by', 'length')}): "
                     + ", ".join(f"{src} {_fmt(g['value'])} (n = {g['n']})" for src, g in gap["by_source"].items()))
    h8 = str(8 * W)
    bpb8 = {m: v[h8] for m, v in report["bpb"].items() if h8 in v}
    if bpb8:
        lines.append(f"bpb at history 8W: " + ", ".join(f"{m} {v:.3f}" for m, v in bpb8.items()))
    if "delta_nll" in report:
        d = report["delta_nll"]
        lines.append(f"ΔNLL@H ({d['gister']}): LOD1 {_fmt(d['lod1']['value'])}, LOD2 {_fmt(d['lod2']['value'])}, "
                     f"drop {_fmt(d['drop']['value'])}, recovered LOD1 {_fmt(d['recovered_lod1'])}")
    gap8 = report["gap_closed"].get("megacontext", {}).get(h8)
    if gap8 is not None:
        lines.append(f"megacontext at 8W: gap closed {gap8:.2f} (recency -> full); swap rate "
                     f"{_fmt(report['swap_rate'].get('megacontext'))}, residency {_fmt(report['residency'].get('megacontext'))}")
    mp = report.get("megaprediction", {})
    if "lod1" in mp:
        lines.append(f"MegaPrediction cosine LOD1 {_fmt(mp['lod1']['head']['value'])} (copy-last "
                     f"{_fmt(mp['lod1']['copy_last']['value'])})" + (f", LOD2 {_fmt(mp['lod2']['head']['value'])} (copy-last "
                     f"{_fmt(mp['lod2']['copy_last']['value'])})" if "lod2" in mp else ""))
    for hist, e in report.get("gist_first", {}).get("by_history", {}).items():
        lines.append(f"gist-first at {hist}: NLL {_fmt(e['gist_first_nll'])} vs token-first {_fmt(e['token_first_nll'])} "
                     f"(difference {_fmt(e['difference']['value'])})")
    if report["absent_methods"]:
        lines.append("absent: " + ", ".join(report["absent_methods"]))
    return "\n".join(lines)


def resolve_gistnet(spec):
    """A .pt path as given, or a JT1 model tag -> base_checkpoints/<tag>/mc_<last step>.pt."""
    from megacontext.variant import last_mc_file
    return last_mc_file(spec, "GistNet", "python -m nanochat.train --config configs/gistnet_longctx_cpu.yaml")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--headline"]:  # print the headline figures of an existing report.json
        if len(argv) != 2 or not os.path.exists(argv[1]):
            print("error: --headline needs the path of an existing report.json", file=sys.stderr)
            return 2
        with open(argv[1]) as f:
            print(headline(json.load(f)))
        return 0
    try:
        cfg, out, task_files = parse_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        import torch
        from nanochat.common import autodetect_device_type, get_base_dir
        from nanochat.checkpoint_manager import load_model
        device_type = cfg["device_type"] or autodetect_device_type()
        device = torch.device(device_type)
        ckpt_dir = os.path.join(get_base_dir(), "base_checkpoints", cfg["model_tag"])
        if not os.path.isdir(ckpt_dir):
            raise FileNotFoundError(f"no base checkpoint at {ckpt_dir}; train the testbed with "
                                    f"`python -m nanochat.train --config configs/longctx_cpu.yaml` (or set model_tag)")
        model, tokenizer, _ = load_model("base", device, phase="eval", model_tag=cfg["model_tag"], step=cfg["step"])
        if cfg["lora"]:  # every method, full and recency included, reads the same model: the base + this LoRA
            from megacontext.end_to_end import attach_trained_lora
            lora, lora_path = attach_trained_lora(model, cfg["lora"])
            print(f"LoRA: rank {lora.config.rank} on {', '.join(lora.config.targets)} from {lora_path}")
        gistnet = None
        if cfg["gistnet"]:
            from megacontext.ingest import load_gister  # the one loader of GistNet checkpoints
            gistnet = load_gister(resolve_gistnet(cfg["gistnet"]), model.config.n_embd, device)
            print(f"GistNet: {gistnet.identity()}")
        lensnet = None
        if cfg["lensnet"] and "megacontext" in cfg["methods"]:
            if gistnet is None:
                raise ValueError("lensnet is set but gistnet is not: LensNet scores GistNet's gists; set gistnet too")
            from megacontext.lensnet import load_lensnet
            lensnet = load_lensnet(cfg["lensnet"], model.config.n_embd, device)
            lensnet.check_gistnet(gistnet.identity())
        heads, heads_info = None, None
        if cfg["megaprediction"]:
            from megacontext.megaprediction import load_megaprediction
            heads, heads_info = load_megaprediction(cfg["megaprediction"], model.config.n_embd, device)
            print(f"MegaPrediction: {heads.config.head} heads ({heads.num_params():,} params) from {heads_info['path']}")
        task_files = list(task_files)
        for path in task_files:  # fail on a bad file before the long work starts
            read_task_file(path, tokenizer)
        device_name = torch.cuda.get_device_name(0) if device_type == "cuda" else f"{device_type} ({os.cpu_count()} cores)"
        t0 = time.time()
        report = evaluate(model, tokenizer, cfg, gistnet, task_files, device_name=device_name, lensnet=lensnet,
                          heads=heads, heads_info=heads_info)
        report["wall_time_s"] = time.time() - t0
        paths = write_report(report, out)
    except (FileNotFoundError, ValueError) as e:
        if os.environ.get("NANOCHAT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(headline(report))
    print(f"wrote {', '.join(os.path.basename(p) for p in paths)} to {out} in {report['wall_time_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
