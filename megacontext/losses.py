"""
Horizon losses of the base model reading gisted contexts: the ΔNLL@H metric and GistNet's
training losses.

ΔNLL@H (DESIGN.md section 6), at a block-aligned position t of a held-out document:
    context  = the C tokens before t (default 512), horizon = the next H tokens (default 32)
    NLL_full   horizon NLL with the whole context as tokens
    NLL_L      every context block except the last replaced by its LOD-L gist
               (LOD2: a LOD2 gist for each whole 1024-token span, LOD1 for the other blocks)
    NLL_drop   those blocks removed: the model sees only the last block
    ΔNLL_L = NLL_L - NLL_full,  fraction recovered = 1 - ΔNLL_L / ΔNLL_drop
All in nats per horizon token. LOD2 spans are the tree's: aligned to multiples of 1024 tokens
from the start of the document, so a span counts only if it lies whole inside the replaced
blocks [t - C, t - 32). With the default C = 512 there is none and NLL_lod2 equals NLL_lod1.
The four contexts are WorkingContexts over the document's first t tokens, starting at t - C
(delta_nll_layouts), so the metric reads exactly what a runtime WC of that layout would.
With bos=None no BOS is added: every variant starts at its first entry. With bos=<id> every
row (full, gisted, dropped) starts with that one token, as every row of a model trained on
long-document rows does (megacontext/window_loader.py); the BOS costs nothing.

Training losses for GistNet (the base model frozen, gradients reaching GistNet through it):
    pooling_mse_loss   gist vs the mean of its inputs, compared after norm (a warm-up target)
    delta_nll_loss     ΔNLL of a batch of windows with LOD-L gisted contexts, differentiable

How a context is handed over: as a WorkingContext plus the store its tokens and gists come
from (a TensorStore holding the GistNet outputs, so gradients reach GistNet);
horizon_nll() packs WCs and horizons with working_context.pack_batch (one right-padded
batch) and runs the model under base_inputs.gist_inputs.

This module owns these definitions. It never trains (no optimizer here), never reads
files, and never picks which documents or positions are held out.
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from nanochat.gpt import norm
from megacontext.base_inputs import gist_inputs
from megacontext.gistnet import token_embeddings
from megacontext.tree import BLOCK_SIZE
from megacontext.working_context import TensorStore, WorkingContext, pack_batch

DEFAULT_CONTEXT = 512
DEFAULT_HORIZON = 32

# -----------------------------------------------------------------------------
# The base model reading working contexts


def _as_token_tensor(tokens, device, what="tokens"):
    t = torch.as_tensor(tokens, device=device)
    if t.ndim != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{what} must be a 1-D sequence of token ids, got {t.dtype} of shape {tuple(t.shape)}")
    return t.long()


def horizon_nll(model, contexts, horizons, stores, bos_id=None, length=None, horizon_mask=None, counts=False):
    """Mean NLL (nats/token) of each horizon given its context -> (B,) float32.

    contexts: B WorkingContexts, read from `stores` (one per WC, or one shared) and packed by
    pack_batch (bos_id, length: see there); horizons: (B, H) token ids. horizon_mask (B, H) bool:
    score only these tokens (e.g. a synthetic row's answer, not its filler); a row with none
    scores 0. counts=True also returns the (B,) number of scored tokens. Differentiable with
    respect to gists held in the stores (and the model, unless the caller freezes it)."""
    if len(contexts) == 0:
        raise ValueError("horizon_nll needs at least one context")
    base = getattr(model, "_orig_mod", model)
    device = base.get_device()
    batch = pack_batch(contexts, stores, horizons, n_embd=base.config.n_embd, bos_id=bos_id, length=length,
                       device=device)
    idx, targets, mask, vectors = batch["idx"], batch["targets"], batch["gist_mask"], batch["gist_vectors"]
    if horizon_mask is None:
        n_targets = (targets >= 0).sum(1)  # = H in every row
    else:  # the H target positions are consecutive from the last context slot: unscored ones become -1
        hz, hm = torch.as_tensor(horizons, device=device).long(), torch.as_tensor(horizon_mask, device=device).bool()
        first = (targets >= 0).float().argmax(1)
        cols = first[:, None] + torch.arange(hz.size(1), device=device)[None, :]
        targets.scatter_(1, cols, torch.where(hm, hz, torch.full_like(hz, -1)))
        n_targets = hm.sum(1)
    with gist_inputs(model, mask, vectors):
        losses = model(idx, targets, loss_reduction="none")
    nll = losses.view(idx.shape).sum(1) / n_targets.clamp(min=1)
    return (nll, n_targets) if counts else nll


# -----------------------------------------------------------------------------
# Gisted contexts


def lod2_span_starts(first_token, n_blocks):
    """Block offsets (relative to the first block) where a whole LOD2 span starts among
    `n_blocks` consecutive blocks beginning at token `first_token`; spans are aligned to
    multiples of 32 blocks (1024 tokens) from token 0."""
    first_block = first_token // BLOCK_SIZE
    span = BLOCK_SIZE  # LOD1 gists per LOD2 gist
    start = -(-first_block // span) * span
    starts = []
    while start + span <= first_block + n_blocks:
        starts.append(start - first_block)
        start += span
    return starts


def context_gists(model, gistnet, contexts, first_token=0, lod2=True, lod1=None):
    """GistNet's gists of every block except the last of each context -> (lod1, lod2):
    lod1 (B, C/32 - 1, D), one per block; lod2 (B, S, D), one per whole 1024-token span
    among those blocks (lod2_span_starts; S may be 0), or None with lod2=False.

    contexts (B, C) token ids, C a multiple of 32; first_token: position of contexts[:, 0]
    in its document (a multiple of 32), which fixes where the LOD2 spans fall. A caller that
    has the LOD1 gists already (JT1 shares them with its pooling loss) passes them as lod1,
    (B, C/32 - 1, D), and only the LOD2 gists are computed."""
    B, C = contexts.shape
    n_old = C // BLOCK_SIZE - 1
    D = gistnet.config.n_embd
    if lod1 is None:
        blocks = contexts[:, :n_old * BLOCK_SIZE].reshape(B * n_old, BLOCK_SIZE)
        lod1 = gistnet(token_embeddings(model, blocks), 1).view(B, n_old, D)
    elif tuple(lod1.shape) != (B, n_old, D):
        raise ValueError(f"lod1 must be the (B, C/32 - 1, D) = {(B, n_old, D)} gists of the contexts' blocks "
                         f"but the last, got {tuple(lod1.shape)}")
    if not lod2:
        return lod1, None
    starts = lod2_span_starts(first_token, n_old)
    if not starts:
        return lod1, lod1.new_zeros(B, 0, D)
    span_inputs = torch.stack([lod1[:, s:s + BLOCK_SIZE] for s in starts], dim=1)  # (B, S, 32, D)
    return lod1, gistnet(span_inputs.reshape(B * len(starts), BLOCK_SIZE, D), 2).view(B, len(starts), D)


def context_store(context, lod1, lod2, first_token):
    """A TensorStore of one context window (C,) starting at token first_token of its
    document, holding context_gists' LOD1 gists (k1, D) and LOD2 gists (k2, D) or None
    under their document-wide node indices."""
    return TensorStore(context, lod1, lod2, first_token=first_token, first_lod1=first_token // BLOCK_SIZE,
                       first_lod2=-(-first_token // (BLOCK_SIZE * BLOCK_SIZE)))


def delta_nll_layouts(t, context_tokens):
    """ΔNLL@H's four contexts at position t, as WorkingContexts over the first t tokens of the
    document starting at t - C: full (all LOD0), lod1 (every block but the last as its LOD1
    gist), lod2 (LOD2 gists on the whole 1024-token spans, LOD1 around them), drop (the last
    block only)."""
    C = context_tokens
    return {"full": WorkingContext.uniform(t, 0, start=t - C), "lod1": WorkingContext.uniform(t, 1, start=t - C),
            "lod2": WorkingContext.uniform(t, 2, start=t - C),
            "drop": WorkingContext.uniform(t, 0, start=t - BLOCK_SIZE)}


def _check_context(context_tokens, horizon):
    if context_tokens < 2 * BLOCK_SIZE or context_tokens % BLOCK_SIZE != 0:
        raise ValueError(f"context_tokens must be a multiple of {BLOCK_SIZE} and at least {2 * BLOCK_SIZE} "
                         f"(one block to gist plus the last block kept as tokens), got {context_tokens}")
    if horizon < 1:
        raise ValueError(f"horizon must be at least 1 token, got {horizon}")


@contextmanager
def frozen(model):
    """Turn off requires_grad on the model's parameters for the duration (restored after).
    Autograd records at forward time, so a forward inside the block gives the base model no
    gradients while gradients still flow *through* it to the gists."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in params:
            p.requires_grad_(True)

# -----------------------------------------------------------------------------
# ΔNLL@H


def _summarize(nll_full, nll_lod1, nll_lod2, nll_drop):
    delta_drop = nll_drop - nll_full
    out = dict(nll_full=nll_full, nll_lod1=nll_lod1, nll_lod2=nll_lod2, nll_drop=nll_drop,
               delta_lod1=nll_lod1 - nll_full, delta_lod2=nll_lod2 - nll_full, delta_drop=delta_drop)
    for lod in (1, 2):
        # n/a (NaN) when dropping the old blocks costs nothing or even helps (DESIGN.md section 6):
        # a ratio over a zero or negative denominator would print as a "recovered" share that means nothing
        out[f"recovered_lod{lod}"] = 1.0 - out[f"delta_lod{lod}"] / delta_drop if delta_drop > 0 else float("nan")
    return out


def _check_fits(model, positions, what):
    """A row of `positions` slots must fit the model's sequence_len (rotary tables go further, but the
    model was never trained there, so a figure from beyond it would mean nothing)."""
    seq_len = model.config.sequence_len
    if positions > seq_len:
        raise ValueError(f"{what} needs {positions} positions but the model's sequence_len is {seq_len}; "
                         f"lower context_tokens or horizon (their sum, plus a BOS if any, must be <= {seq_len})")


@torch.no_grad()
def delta_nll(model, gistnet, tokens, t, context_tokens=DEFAULT_CONTEXT, horizon=DEFAULT_HORIZON, bos=None):
    """ΔNLL@H at position t of one document (a 1-D sequence of token ids) -> dict of floats:
    nll_full, nll_lod1, nll_lod2, nll_drop, delta_lod1, delta_lod2, delta_drop,
    recovered_lod1, recovered_lod2 (nats/token)."""
    _check_context(context_tokens, horizon)
    base = getattr(model, "_orig_mod", model)
    _check_fits(base, context_tokens + horizon - 1 + (bos is not None), "ΔNLL@H")
    tokens = _as_token_tensor(tokens, base.get_device(), what="the document")
    if t % BLOCK_SIZE != 0:
        raise ValueError(f"position t={t} is not block-aligned; use a multiple of {BLOCK_SIZE}")
    if t < context_tokens or t + horizon > len(tokens):
        raise ValueError(f"position t={t} needs {context_tokens} context tokens before it and {horizon} horizon "
                         f"tokens after it, but the document has {len(tokens)} tokens; "
                         f"valid t: {context_tokens}..{len(tokens) - horizon} in steps of {BLOCK_SIZE}")
    first = t - context_tokens
    lod1, lod2 = context_gists(model, gistnet, tokens[first:t][None], first_token=first)
    store = context_store(tokens[first:t], lod1[0], lod2[0], first)
    layouts = delta_nll_layouts(t, context_tokens)
    wcs = [layouts[k] for k in ("full", "lod1", "lod2", "drop")]
    nll = horizon_nll(model, wcs, tokens[t:t + horizon].expand(len(wcs), horizon), stores=store, bos_id=bos).tolist()
    return _summarize(*nll)


def default_positions(documents, context_tokens=DEFAULT_CONTEXT, horizon=DEFAULT_HORIZON, stride=None):
    """(document index, t) pairs: t = C, C + stride, ... while the horizon fits (stride defaults to C)."""
    stride = context_tokens if stride is None else stride
    if stride <= 0 or stride % BLOCK_SIZE != 0:
        raise ValueError(f"stride must be a positive multiple of {BLOCK_SIZE}, got {stride}")
    return [(d, t) for d, doc in enumerate(documents) for t in range(context_tokens, len(doc) - horizon + 1, stride)]


def evaluate_delta_nll(model, gistnet, documents, positions=None, context_tokens=DEFAULT_CONTEXT,
                       horizon=DEFAULT_HORIZON, stride=None, max_positions=None, bos=None):
    """ΔNLL@H averaged over many positions -> the delta_nll dict plus n_positions.

    documents: token sequences; positions: (document index, t) pairs, by default every
    `stride` tokens of every document (see default_positions). The NLLs are averaged first
    and the deltas and recovered fractions computed from the averages (a ratio of means:
    a position where dropping costs nothing cannot blow it up)."""
    _check_context(context_tokens, horizon)
    if positions is None:
        positions = default_positions(documents, context_tokens, horizon, stride)
    positions = list(positions)[:max_positions]
    if not positions:
        raise ValueError(f"no position to evaluate: every document needs at least {context_tokens + horizon} "
                         f"tokens (context_tokens + horizon); pass longer documents or a smaller context")
    keys = ("nll_full", "nll_lod1", "nll_lod2", "nll_drop")
    sums = dict.fromkeys(keys, 0.0)
    for d, t in positions:
        result = delta_nll(model, gistnet, documents[d], t, context_tokens, horizon, bos=bos)
        for k in keys:
            sums[k] += result[k]
    out = _summarize(*(sums[k] / len(positions) for k in keys))
    out["n_positions"] = len(positions)
    return out

# -----------------------------------------------------------------------------
# Training losses for GistNet


def pooling_mse_loss(gists, inputs):
    """Warm-up target: MSE between each gist (N, D) and the mean of its inputs (N, 32, D).

    Both sides are normed first: the base model norms whatever sits in an embedding slot, so
    the mean's direction is all a gist can be asked to match (zero for the "mean" head)."""
    if gists.ndim != 2 or inputs.ndim != 3 or gists.shape[0] != inputs.shape[0] or gists.shape[1] != inputs.shape[2]:
        raise ValueError(f"pooling_mse_loss expects gists (N, D) and inputs (N, block, D), "
                         f"got {tuple(gists.shape)} and {tuple(inputs.shape)}")
    return F.mse_loss(norm(gists.float()), norm(inputs.float().mean(dim=1)))


def delta_nll_loss(model, gistnet, windows, context_tokens=DEFAULT_CONTEXT, level=1, first_token=0, bos=None,
                   horizon_mask=None, lod1=None):
    """Mean ΔNLL of a batch of windows with LOD-`level` gists, differentiable w.r.t. GistNet.

    windows (B, C + H): context then horizon, block-aligned (first_token = position of
    window[:, 0] in its document, for LOD2 span alignment). Per window the base model reads
    [gists of all context blocks but the last | last block | horizon]; NLL_full (all tokens)
    is subtracted under no_grad, so the value is ΔNLL while the gradient is that of NLL_L.
    `level` may be a tuple, e.g. (1, 2): the sum of each level's mean ΔNLL, with the LOD1 gists,
    NLL_full and the gisted rows computed once for all levels (one batched forward).
    The base model is kept frozen: it receives no gradients (see frozen()). With bos=<id>
    every row starts with that token (windows then hold no BOS of their own). horizon_mask
    (B, H) bool scores only those horizon tokens (a synthetic row's answer); each window
    counts once in the mean, however many tokens it scores. lod1: the windows' LOD1 gists when the
    caller computed them already (context_gists), so GistNet's LOD1 forward is not run twice."""
    levels = (level,) if isinstance(level, int) else tuple(level)
    if not levels or any(lv not in (1, 2) for lv in levels):
        raise ValueError(f"level must be 1 or 2 (or a tuple of them), got {level!r}")
    base = getattr(model, "_orig_mod", model)
    windows = torch.as_tensor(windows, device=base.get_device())
    if windows.ndim != 2:
        raise ValueError(f"windows must be (B, context_tokens + horizon) token ids, got shape {tuple(windows.shape)}")
    horizon = windows.size(1) - context_tokens
    _check_context(context_tokens, horizon)
    _check_fits(base, context_tokens + horizon - 1 + (bos is not None), "delta_nll_loss")
    if first_token % BLOCK_SIZE != 0:
        raise ValueError(f"first_token={first_token} is not block-aligned; use a multiple of {BLOCK_SIZE}")
    contexts, horizons = windows[:, :context_tokens].long(), windows[:, context_tokens:].long()
    B = len(windows)
    layouts = delta_nll_layouts(first_token + context_tokens, context_tokens)
    with frozen(model):
        lod1, lod2 = context_gists(model, gistnet, contexts, first_token, lod2=2 in levels, lod1=lod1)
        stores = [context_store(contexts[b], lod1[b], None if lod2 is None else lod2[b], first_token)
                  for b in range(B)]
        wcs = [layouts[f"lod{lv}"] for lv in levels for _ in range(B)]
        if horizon_mask is not None:
            horizon_mask = torch.as_tensor(horizon_mask, device=windows.device).bool()
        nll_gisted = horizon_nll(model, wcs, horizons.repeat(len(levels), 1), stores=stores * len(levels), bos_id=bos,
                                 horizon_mask=None if horizon_mask is None else horizon_mask.repeat(len(levels), 1))
        nll_gisted = nll_gisted.view(len(levels), B)
        with torch.no_grad():
            nll_full = horizon_nll(model, [layouts["full"]] * B, horizons, stores=stores, bos_id=bos,
                                   horizon_mask=horizon_mask)
    return (nll_gisted - nll_full[None]).mean(dim=1).sum()
