"""
What LensNet learns from: counterfactual utilities, an attention-mass warm-up target, and the
JT2 losses.

Counterfactual utilities (the base model frozen, the GistNet trained and frozen). For a WC over a
history and the horizon that follows it, NLL(wc) is the base model's mean NLL over the horizon's
scored tokens (horizon_mask) reading [BOS] + the WC + the horizon. The candidates of a WC:
  expand i    every gist entry i expanded; when the budget is full, paired with collapsing the
              oldest collapsible LOD0 block first (one entry for one, so indices do not move),
              as the harness's oracle does (megacontext/eval.py, Harness._candidates)
  collapse g  every collapse group g (a whole LOD0 block outside the tail, or B aligned LOD1
              siblings) collapsed
  u(c) = NLL(wc) - NLL(c)  in nats per horizon token (> 0: the change helps)
  lookahead   optionally, an expanded LOD2 gist also has one LOD1 child expanded (picked by a
              callable, e.g. LensNet's scores) and its utility is the better of the two (see
              counterfactual_targets)
All candidates of all WCs of a micro-batch go through the base model together, packed into
right-padded batches of `batch_rows` rows (working_context.pack_batch): a few forwards per micro-batch,
not one per candidate.

Signed per-entry target t_i (the score LensNet should give; NaN where the entry has no action):
  e_i = u(expand i)                                     for gists
  c_i = -(u(collapse g(i)) + lam),  lam = max(0, max_i e_i)   for members of a collapse group:
        collapsing is worth it when what it loses is less than the best expansion the freed
        budget could buy, and then the target is negative (collapse); else positive (keep)
  t_i = e_i where only e_i exists, c_i where only c_i exists; where both do (a LOD1 gist of a
        whole sibling group) the one whose action gains more: e_i if e_i >= -c_i else c_i.
  With max_candidates (a random subset of a WC's candidates per step) entries whose candidates
  were not drawn get no target, and lam is the best of the drawn expansions.

Attention-mass target (a cheap warm-up, the way DeepSeek's sparse attention warms its indexer on
dense attention): the full history as tokens is run once; at every layer the softmax attention
probabilities from the horizon's query positions (those predicting scored horizon tokens) to the
history keys are recomputed from the layer's own q, k (rotary, QK-norm, x1.2, sliding window as
in nanochat/gpt.py), renormalised over the history keys, and averaged over layers, heads and
queries: mass (L,) over the history tokens, summing to 1. An entry's mass is the sum over its
span, and its target is the log of its attention share over its token share, clipped:
  a_i = clip(log((mass_i + 1e-6) / (span_i / L_covered)), -3, 3)   (> 0: denser than average)

JT2 losses (scores s_i are LensNet's raw scores; only entries with a target count):
  regression  Huber(s_i - scale * t_i), mean over entries            (scale: target_scale)
  ranking     listwise, per WC over its entries with a target, both ends of the list:
              KL(softmax(scale*t / T) || softmax(s)) + KL(softmax(-scale*t / T) || softmax(-s)),
              mean over WCs (T: temperature). The first term teaches which entry to expand
              first, the second which to collapse first; a pairwise loss over all pairs was
              tried first and stayed at log 2: the many near-zero utilities of a WC drown its
              few large ones, which are what the allocator acts on.
  budget      soft expansions E = sum over gists of tanh(relu(s_i)), soft collapses
              C = sum over collapse-group members of tanh(relu(-s_i)) / group size;
              projected cost = cost + (B-1)(E - C); loss = relu(projected - W) / (B-1),
              mean over WCs (penalises asking for more expansions than the budget and the
              collapses on offer can pay for)

This module owns these definitions. It never trains (no optimizer), never reads files and never
chooses which WCs are sampled (lens_training.py does).
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from megacontext.losses import horizon_nll
from megacontext.working_context import TensorStore

# -----------------------------------------------------------------------------
# WCs as rows the base model reads


def item_store(item):
    """The TensorStore an item's WCs read from: its history tokens and (lod1, lod2) gists."""
    return TensorStore(item["history"], item["lod1"], item["lod2"])


def lens_scores(lensnet, items, embed_fn):
    """LensNet's raw scores of every item's WC (list of (n_i,) tensors), in one padded batch; the
    inputs are built without gradients, so gradients reach LensNet only."""
    from megacontext.lensnet import entry_vectors, entry_features
    batch = []
    with torch.no_grad():
        for it in items:
            batch.append((entry_vectors(it["wc"], item_store(it), embed_fn),
                          entry_features(it["wc"]).to(it["lod1"].device), it["tail"]))
    return lensnet.score_batch(batch)


def masked_horizon_nll(model, wcs, stores, horizons, horizon_masks, bos_id=None, length=None):
    """One packed batch: the mean NLL over each WC's scored horizon tokens -> ((R,) tensor on the
    model's device, (R,) count of scored tokens). wcs: R WorkingContexts, each read from stores[r]
    (rows [BOS] + WC + horizon, pack_batch; `length` pads to a fixed shape); horizons (R, H) token
    ids; horizon_masks (R, H) bool (False = not scored, e.g. the filler of a synthetic row). A row
    with no scored token gets 0. Differentiable (gists in the stores, the model) unless the caller
    runs under no_grad. losses.horizon_nll with its mask, on the model's device."""
    device = getattr(model, "_orig_mod", model).get_device()
    return horizon_nll(model, wcs, horizons.to(device), stores, bos_id=bos_id, length=length,
                       horizon_mask=horizon_masks.to(device), counts=True)


def horizon_nlls(model, wcs, stores, horizons, horizon_masks, bos_id=None, batch_rows=32):
    """masked_horizon_nll in batches of batch_rows rows, without gradients -> (R,) float32 CPU
    tensor; a row with no scored token gets NaN."""
    out = torch.empty(len(wcs), dtype=torch.float32)
    with torch.no_grad():
        for k in range(0, len(wcs), batch_rows):
            nll, n = masked_horizon_nll(model, wcs[k:k + batch_rows], stores[k:k + batch_rows],
                                        horizons[k:k + batch_rows], horizon_masks[k:k + batch_rows], bos_id)
            out[k:k + len(nll)] = nll.float().cpu().masked_fill(n.cpu() == 0, float("nan"))
    return out


def _bos_of(items):
    bos = {it["bos"] for it in items}
    if len(bos) > 1:
        raise ValueError(f"items mix BOS ids {sorted(map(str, bos))}; score them in separate calls")
    return bos.pop() if bos else None


# -----------------------------------------------------------------------------
# Counterfactual utilities


def expand_with_room(wc, i, oldest_lod0=None):
    """wc with entry i expanded, paired with collapsing its oldest collapsible LOD0 block when the
    budget is full (one entry for one, so i still names the same entry); None if neither fits."""
    if wc.can_expand(i):
        return wc.expand(i)
    if oldest_lod0 is None:
        oldest_lod0 = next((j for j, e in enumerate(wc.entries) if e.level == 0 and wc.collapse_group(j)), None)
    if oldest_lod0 is not None:
        freed = wc.collapse(oldest_lod0)
        if freed.can_expand(i):
            return freed.expand(i)
    return None


def candidates(wc):
    """[(kind, entries (tuple of WC indices), candidate WC)] one action away from wc (module docstring)."""
    out = []
    oldest_lod0 = next((j for j, e in enumerate(wc.entries) if e.level == 0 and wc.collapse_group(j)), None)
    for i, e in enumerate(wc.entries):
        if e.level == 0:
            continue
        expanded = expand_with_room(wc, i, oldest_lod0)
        if expanded is not None:
            out.append(("expand", (i,), expanded))
    for first, stop, _ in wc.collapse_groups():
        out.append(("collapse", tuple(range(first, stop)), wc.collapse(first)))
    return out


def children_of(parent, wc):
    """Indices of wc's LOD1 entries inside the span of `parent` (an Entry of another WC)."""
    return [j for j, e in enumerate(wc.entries) if e.level == parent.level - 1 and parent.start <= e.start < parent.end]


def signed_targets(n_entries, actions, utilities):
    """Per-entry signed targets (n,) float32, NaN where no action (formula in the module docstring).
    actions: [(kind, entries, _)] as candidates() returns; utilities: u per action."""
    e = np.full(n_entries, np.nan, dtype=np.float64)
    u_col = np.full(n_entries, np.nan, dtype=np.float64)
    for (kind, members, _), u in zip(actions, utilities):
        (e if kind == "expand" else u_col)[list(members)] = u
    lam = max(0.0, float(np.nanmax(e))) if np.isfinite(e).any() else 0.0
    c = -(u_col + lam)
    t = np.where(np.isnan(e), c, np.where(np.isnan(c) | (e >= -c), e, c))
    return t.astype(np.float32)


def counterfactual_targets(model, items, batch_rows=32, max_candidates=None, rng=None, lookahead=None):
    """items: list of dicts (wc, history, lod1, lod2, horizon (H,), horizon_mask (H,), bos).
    Returns a list of dicts per item: nll (base WC), targets (n,) float32 (NaN = no action or not
    sampled), actions, utilities (np.ndarray), lookaheads (how many deep candidates were scored).
    max_candidates: keep a random subset per WC (rng: numpy Generator), to bound the cost of a step.

    lookahead(candidate_wc, item, children) -> one of `children` (indices of candidate_wc) or None:
    for every sampled expansion of a LOD2 gist, the LOD1 child it picks is expanded too (paired
    collapse when full) and the expansion's utility is the better of the two, u = max(u(expand),
    u(expand + child)). Expanding a LOD2 gist alone only trades one gist for 32 coarser ones, which
    rarely changes what the base model can read, so without this a LOD2 span holding the fact the
    horizon needs looks worthless; with it the span is worth what reaching the fact is worth (which
    a refocus with rounds >= 2 realises: runtime.Focus). JT2 picks with LensNet's own scores."""
    wcs, stores, horizons, masks = [], [], [], []
    plans, deep_plans = [], []
    for k, item in enumerate(items):
        actions = candidates(item["wc"])
        if max_candidates is not None and len(actions) > max_candidates:
            rng = rng if rng is not None else np.random.default_rng(0)
            keep = np.sort(rng.choice(len(actions), max_candidates, replace=False))
            actions = [actions[j] for j in keep]
        deep = []  # (action index, deep candidate WC)
        if lookahead is not None:
            for a, (kind, members, cand) in enumerate(actions):
                parent = item["wc"].entries[members[0]]
                if kind != "expand" or parent.level != 2:
                    continue
                children = children_of(parent, cand)
                j = lookahead(cand, item, children) if children else None
                further = expand_with_room(cand, j) if j is not None else None
                if further is not None:
                    deep.append((a, further))
        plans.append(actions)
        deep_plans.append(deep)
        store = item_store(item)
        for wc in [item["wc"]] + [a[2] for a in actions] + [d for _, d in deep]:
            wcs.append(wc)
            stores.append(store)
            horizons.append(item["horizon"])
            masks.append(item["horizon_mask"])
    nll = horizon_nlls(model, wcs, stores, torch.stack(horizons), torch.stack(masks), _bos_of(items), batch_rows).numpy()
    out, cursor = [], 0
    for item, actions, deep in zip(items, plans, deep_plans):
        base_nll = float(nll[cursor])
        utilities = base_nll - nll[cursor + 1:cursor + 1 + len(actions)].astype(np.float64)
        cursor += 1 + len(actions)
        for a, _ in deep:
            utilities[a] = max(utilities[a], base_nll - float(nll[cursor]))
            cursor += 1
        out.append(dict(nll=base_nll, actions=actions, utilities=utilities, lookaheads=len(deep),
                        targets=signed_targets(len(item["wc"]), actions, utilities)))
    return out


# -----------------------------------------------------------------------------
# Attention mass


def _capture_attention_inputs(model):
    """Forward pre-hooks on every attention module recording (x, cos_sin, window_size) per layer."""
    captured, handles = [], []
    for block in model.transformer.h:
        def hook(module, args, captured=captured):
            x, _, cos_sin, window_size, _ = args
            captured.append((module, x, cos_sin, window_size))
        handles.append(block.attn.register_forward_pre_hook(hook))
    return captured, handles


def attention_probs(attn, x, cos_sin, window_size):
    """Softmax attention probabilities (B, heads, T, T) of one nanochat CausalSelfAttention on its
    input x, recomputed the way its forward computes q and k (SDPA does not expose them)."""
    from nanochat.gpt import apply_rotary_emb, norm
    B, T, _ = x.shape
    q = attn.c_q(x).view(B, T, attn.n_head, attn.head_dim)
    k = attn.c_k(x).view(B, T, attn.n_kv_head, attn.head_dim)
    cos, sin = cos_sin
    q, k = norm(apply_rotary_emb(q, cos, sin)) * 1.2, norm(apply_rotary_emb(k, cos, sin)) * 1.2
    q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()
    if attn.n_kv_head != attn.n_head:
        k = k.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(attn.head_dim)
    pos = torch.arange(T, device=x.device)
    allowed = pos[None, :] <= pos[:, None]
    left = window_size[0]
    if left is not None and 0 <= left < T:
        allowed &= pos[None, :] >= pos[:, None] - left
    return logits.masked_fill(~allowed, float("-inf")).softmax(-1)


def attention_mass(model, histories, horizons, horizon_masks, bos=None):
    """Per history token, the attention mass it gets from the horizon (module docstring).
    histories: list of 1-D token tensors; horizons (R, H); horizon_masks (R, H) bool.
    Returns a list of (L_r,) float32 tensors, each summing to 1 (zeros for a row with nothing scored)."""
    base = getattr(model, "_orig_mod", model)
    device = base.get_device()
    offset = 0 if bos is None else 1
    lengths = [len(h) for h in histories]
    T = offset + max(lengths) + horizons.size(1) - 1
    idx = torch.zeros(len(histories), T, dtype=torch.long, device=device)
    for r, h in enumerate(histories):
        seq = torch.cat([h.to(device), horizons[r, :-1].to(device)])
        if bos is not None:
            idx[r, 0] = bos
        idx[r, offset:offset + len(seq)] = seq
    captured, handles = _capture_attention_inputs(base)
    try:
        with torch.no_grad():
            base(idx)
            totals = [torch.zeros(L, device=device) for L in lengths]
            for attn, x, cos_sin, window_size in captured:
                probs = attention_probs(attn, x, cos_sin, window_size)  # (R, heads, T, T)
                for r, L in enumerate(lengths):
                    queries = offset + L - 1 + torch.nonzero(horizon_masks[r].to(device)).squeeze(1)
                    p = probs[r][:, queries, offset:offset + L]  # (heads, q, L)
                    p = p / p.sum(-1, keepdim=True).clamp(min=1e-30)
                    totals[r] += p.sum((0, 1)) if len(queries) else 0.0
    finally:
        for h in handles:
            h.remove()
    out = []
    for t in totals:
        s = t.sum()
        out.append((t / s if s > 0 else t).float().cpu())
    return out


def attention_targets(wc, mass):
    """Signed per-entry attention targets (n,) float32 from per-token mass (see the docstring);
    NaN where the entry has no action."""
    spans = wc.spans
    covered = max(1, wc.history_len - wc.start)
    csum = np.concatenate([[0.0], np.cumsum(mass.numpy().astype(np.float64))])
    entry_mass = csum[spans[:, 1]] - csum[spans[:, 0]]
    share = (spans[:, 1] - spans[:, 0]) / covered
    t = np.clip(np.log((entry_mass + 1e-6) / share), -3.0, 3.0)
    can_expand, can_collapse = wc.levels > 0, wc.collapsible_mask()
    t[~(can_expand | can_collapse)] = np.nan
    return t.astype(np.float32)


# -----------------------------------------------------------------------------
# JT2 losses


def _listwise(s, t, temperature):
    """KL(softmax(t / temperature) || softmax(s)) over one WC's entries (ListNet with a KL)."""
    p = F.softmax(t / temperature, dim=0)
    return (p * (torch.log(p.clamp(min=1e-30)) - F.log_softmax(s, dim=0))).sum()


def lens_losses(scores, targets, wcs, scale=10.0, temperature=1.0):
    """scores: list of (n_i,) raw LensNet score tensors; targets: list of (n_i,) float arrays (NaN
    = none); wcs: the WCs. -> dict of scalar tensors: regression, ranking, budget."""
    reg, rank, budget = [], [], []
    for s, t, wc in zip(scores, targets, wcs):
        t = torch.as_tensor(np.asarray(t, dtype=np.float32), device=s.device) * scale
        valid = torch.isfinite(t)
        if valid.any():
            reg.append(F.huber_loss(s[valid], t[valid], reduction="none"))
            sv, tv = s[valid], t[valid]
            if len(sv) > 1:
                rank.append(_listwise(sv, tv, temperature) + _listwise(-sv, -tv, temperature))
        can_expand = torch.as_tensor(wc.levels > 0, device=s.device)
        collapsible = wc.collapsible_mask()
        group_size = torch.ones(len(wc), device=s.device)
        group_size[torch.as_tensor(collapsible & (wc.levels == 1), device=s.device)] = wc.block_size
        expansions = (torch.tanh(F.relu(s)) * can_expand).sum()
        collapses = (torch.tanh(F.relu(-s)) * torch.as_tensor(collapsible, device=s.device) / group_size).sum()
        projected = wc.cost + (wc.block_size - 1) * (expansions - collapses)
        budget.append(F.relu(projected - wc.budget) / (wc.block_size - 1))
    zero = scores[0].sum() * 0.0
    return {
        "regression": torch.cat(reg).mean() if reg else zero,
        "ranking": torch.stack(rank).mean() if rank else zero,
        "budget": torch.stack(budget).mean() if budget else zero,
    }
