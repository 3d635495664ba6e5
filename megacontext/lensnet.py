"""
LensNet: a small transformer that scores every entry of a Working Context (WC).

    scores = lensnet.score_wc(wc, store, embed_fn, tail_gists)   # (len(wc),) float32
    score > 0: worth expanding (more detail);  score < 0: can be collapsed;  0: leave it

Inputs, one row per WC entry (all in the base model's embedding space, width n_embd):
  vector    a gist entry: its gist; a LOD0 entry: the LOD1 gist of its block when the store has
            one (every whole block of a tree or a training TensorStore), else the mean of its
            normed token embeddings (the partial last block). RMS-normed, centred on the WC's
            mean entry vector, renormed, then projected to d_model (tail gists are centred the same).
  features  level one-hot (3), log(1 + distance from the tail in tokens) / 8, cost / 32,
            last score (the previous refocus's score of this entry, 0 when unknown),
            log(1 + refocuses since the entry last changed) / 4 (0 when unknown); these two
            start inert (zero weights) and JT2 leaves them so (see init_weights).
Tail gists (a TailGistCache's LOD2 gists + most recent LOD1 gists; any (G, n_embd) set, in any
order) form a second set of tokens. Each layer: the tail gists attend to the entries (dual
cross-attention, first half), the entries attend to the tail gists (second half, so what the
tail read about the entries feeds back), then bidirectional self-attention over the entries and
an MLP. A learned "null" tail token is always present, so a WC without tail gists is scored too.
A linear head gives one signed score per entry.

There is no positional encoding: order enters only through the distance feature, so the
scores are permutation-equivariant over entries and invariant to the order of the tail gists;
batched scoring pads entries and tail gists with masks and gives the same scores as one by one.

Illegal actions are masked (mask_illegal): a positive score only where the entry can expand
(a gist), a negative one only where it can collapse (wc.collapsible_mask()); others become 0.

The checkpoint (a JT2 run's mc_XXXXXX.pt, megacontext/lens_training.py) holds the config, the
weights and the identity of the GistNet whose gists LensNet was trained on (gistnet_identity),
so a runtime can refuse a tree made by another GistNet (check_gistnet).

This module owns the network, its inputs and its checkpoint loader. It never changes a WC
(allocator.py applies scores), never runs the base model and never trains (lens_training.py).
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from megacontext.tree import BLOCK_SIZE

N_FEATURES = 7  # level one-hot (3), log distance, cost, last score, log time since change


@dataclass
class LensNetConfig:
    n_embd: int = 768        # the base model's width (entry vectors and tail gists live there)
    d_model: int = 64        # LensNet's own width
    n_layer: int = 2
    n_head: int = 4
    mlp_ratio: int = 4
    block_size: int = BLOCK_SIZE

    def __post_init__(self):
        if self.n_embd <= 0 or self.d_model <= 0 or self.n_layer < 1 or self.n_head < 1:
            raise ValueError(f"LensNetConfig needs n_embd, d_model > 0 and n_layer, n_head >= 1, got {self}")
        if self.d_model % self.n_head != 0:
            raise ValueError(f"LensNetConfig: d_model={self.d_model} must be divisible by n_head={self.n_head}")


def _rms(x):
    return F.rms_norm(x, (x.size(-1),))


class Attention(nn.Module):
    """Multi-head attention of queries x (B, Tq, d) over keys/values ctx (B, Tk, d), key mask (B, Tk)."""

    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        # one (3d, d) weight for q, k, v (rows [0, d) make q from x, the rest k and v from ctx): few distinct
        # parameter shapes, since nanochat's AdamW kernel is compiled once per shape (8 at most before
        # torch.compile's recompile limit stops it)
        self.qkv = nn.Parameter(torch.empty(3 * d, d))
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x, ctx, key_mask):
        B, Tq, d = x.shape
        h = self.n_head
        q = F.linear(x, self.qkv[:d]).view(B, Tq, h, d // h).transpose(1, 2)
        k, v = F.linear(ctx, self.qkv[d:]).view(B, ctx.size(1), 2, h, d // h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        return self.proj(y.transpose(1, 2).reshape(B, Tq, d))


class LensLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.d_model
        self.tail_reads_entries = Attention(d, config.n_head)
        self.entries_read_tail = Attention(d, config.n_head)
        self.self_attn = Attention(d, config.n_head)
        self.mlp_in = nn.Linear(d, config.mlp_ratio * d, bias=False)
        self.mlp_out = nn.Linear(config.mlp_ratio * d, d, bias=False)

    def forward(self, x, x_mask, t, t_mask):
        t = t + self.tail_reads_entries(_rms(t), _rms(x), x_mask)
        x = x + self.entries_read_tail(_rms(x), _rms(t), t_mask)
        x = x + self.self_attn(_rms(x), _rms(x), x_mask)
        x = x + self.mlp_out(F.relu(self.mlp_in(_rms(x))).square())  # relu^2 as nanochat's MLP: cheaper than GELU on CPU
        return x, t


class LensNet(nn.Module):
    def __init__(self, config, gistnet_identity=None):
        super().__init__()
        self.config = config
        self.gistnet_identity = gistnet_identity  # the GistNet whose gists it was trained on
        d = config.d_model
        self.entry_proj = nn.Linear(config.n_embd, d, bias=False)
        self.feature_proj = nn.Linear(N_FEATURES, d, bias=False)  # the level one-hot doubles as a bias
        self.tail_proj = nn.Linear(config.n_embd, d, bias=False)
        self.tail_type = nn.Parameter(torch.zeros(1, d))
        self.null_tail = nn.Parameter(torch.zeros(1, d))
        self.layers = nn.ModuleList([LensLayer(config) for _ in range(config.n_layer)])
        self.head = nn.Linear(d, 1, bias=False)

    @torch.no_grad()
    def init_weights(self, seed=0):
        """Deterministic init from a private generator (same weights on every device); the
        output projections of every residual branch, the tail type and the head start at zero,
        so an untrained LensNet scores every entry 0 (no action)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for name, p in self.named_parameters():
            residual_out = name.startswith("layers.") and (name.endswith(".proj.weight") or name.endswith("mlp_out.weight"))
            if residual_out or name in ("tail_type", "head.weight"):
                p.zero_()
            else:
                p.copy_(torch.empty(p.shape).normal_(0.0, p.shape[-1] ** -0.5, generator=gen))
        # the refocus-history features (last score, time since change) start with no effect: JT2's
        # sampled WCs have no refocus history (both are 0 there), so these columns stay zero until a
        # stage that trains through the allocator loop feeds them; a runtime may pass them meanwhile
        self.feature_proj.weight[:, 5:].zero_()
        return self

    def check_gistnet(self, identity):
        """Refuse gists made by another GistNet than the one LensNet was trained on (one clear line)."""
        if self.gistnet_identity is not None and identity != self.gistnet_identity:
            raise ValueError(f"this LensNet was trained on gists of {self.gistnet_identity}, but the tree's gists come "
                             f"from {identity}; use the LensNet trained with that GistNet (or re-ingest the tree "
                             f"with {self.gistnet_identity})")

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, vectors, features, entry_mask, tail, tail_mask):
        """vectors (B, N, n_embd), features (B, N, N_FEATURES), entry_mask (B, N) bool (True =
        real entry), tail (B, G, n_embd), tail_mask (B, G) -> raw scores (B, N) float32 (0 at
        padding). Masking of illegal actions is separate (mask_illegal)."""
        dtype = self.entry_proj.weight.dtype
        # gists of one history point much the same way (mean cosine ~0.9 on the testbed): centred on
        # the WC's mean entry and renormed, what tells entries apart is what the network sees (without
        # this, Adam's steps mostly move every score of a WC together and the ranking never improves)
        v, t = _rms(vectors.to(dtype)), _rms(tail.to(dtype))
        w = entry_mask.to(dtype).unsqueeze(-1)
        mean = (v * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1)
        x = self.entry_proj(_rms(v - mean)) + self.feature_proj(features.to(dtype))
        B = x.size(0)
        t = self.tail_proj(_rms(t - mean)) + self.tail_type
        t = torch.cat([self.null_tail.expand(B, 1, -1), t], dim=1)
        t_mask = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=x.device), tail_mask], dim=1)
        for layer in self.layers:
            x, t = layer(x, entry_mask, t, t_mask)
        scores = self.head(_rms(x)).squeeze(-1).float()
        return scores.masked_fill(~entry_mask, 0.0)

    # -------------------------------------------------------------------------
    # from WCs to inputs

    def wc_inputs(self, wc, store, embed_fn, last_scores=None, last_change=None):
        """(vectors (n, n_embd), features (n, N_FEATURES)) of one WC."""
        return entry_vectors(wc, store, embed_fn), entry_features(wc, last_scores, last_change)

    def score_batch(self, items):
        """items: list of (vectors, features, tail_gists or None) -> list of raw score tensors."""
        vectors, features, entry_mask, tail, tail_mask = collate(items, self.config.n_embd)
        scores = self(vectors, features, entry_mask, tail, tail_mask)
        return [scores[b, :len(item[0])] for b, item in enumerate(items)]

    @torch.no_grad()
    def score_wc(self, wc, store, embed_fn, tail_gists=None, last_scores=None, last_change=None):
        """(len(wc),) float32 numpy signed scores of one WC, illegal actions masked to 0."""
        if len(wc) == 0:
            return np.zeros(0, dtype=np.float32)
        vectors, features = self.wc_inputs(wc, store, embed_fn, last_scores, last_change)
        device = self.entry_proj.weight.device
        tail = None if tail_gists is None else torch.as_tensor(tail_gists).to(device)
        raw = self.score_batch([(vectors.to(device), features.to(device), tail)])[0]
        return mask_illegal(raw, wc).cpu().numpy().astype(np.float32)


def _lod1_available(store):
    """How many LOD1 gists the store holds (from its first), or None when it cannot say."""
    if hasattr(store, "num_gists"):
        return store.num_gists(1)
    lod1 = getattr(store, "lod1", None)
    if hasattr(store, "token_ids"):  # a TensorStore
        return 0 if lod1 is None else len(lod1)
    return None


def entry_vectors(wc, store, embed_fn):
    """(n, n_embd) float32: each entry's vector (see the module docstring)."""
    n_lod1 = _lod1_available(store)
    rows, lod0_means = [None] * len(wc), []
    for k, e in enumerate(wc.entries):
        if e.level > 0:
            rows[k] = _gist(store, e.level, e.index)
        elif e.end - e.start == wc.block_size and (n_lod1 is None or e.index < n_lod1):
            try:
                rows[k] = _gist(store, 1, e.index)
            except IndexError:
                lod0_means.append(k)
        else:
            lod0_means.append(k)
    if lod0_means:
        for k in lod0_means:
            e = wc.entries[k]
            ids = torch.as_tensor(store.tokens(e.start, e.end)).long().view(1, -1)
            rows[k] = embed_fn(ids)[0].float().mean(0)
    device = rows[0].device
    return torch.stack([r.to(device=device, dtype=torch.float32) for r in rows])


def _gist(store, level, index):
    g = store.gists(level, index, index + 1)
    if not isinstance(g, torch.Tensor):
        g = torch.from_numpy(np.array(g, dtype=np.float32))
    return g.reshape(-1).float()


def entry_features(wc, last_scores=None, last_change=None):
    """(n, N_FEATURES) float32 features of a WC's entries (see the module docstring)."""
    n = len(wc)
    levels = torch.as_tensor(wc.levels)
    spans = torch.as_tensor(wc.spans, dtype=torch.float32)
    feats = torch.zeros(n, N_FEATURES)
    feats[torch.arange(n), levels] = 1.0
    feats[:, 3] = torch.log1p(wc.history_len - spans[:, 1]) / 8.0
    feats[:, 4] = torch.as_tensor(wc.costs, dtype=torch.float32) / wc.block_size
    for column, values, what in ((5, last_scores, "last_scores"), (6, last_change, "last_change")):
        if values is None:
            continue
        values = torch.as_tensor(np.asarray(values, dtype=np.float32)).reshape(-1)
        if len(values) != n:
            raise ValueError(f"{what} has {len(values)} values but the WC has {n} entries; pass one per entry")
        values = torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        feats[:, column] = values if column == 5 else torch.log1p(values.clamp(min=0)) / 4.0
    return feats


def collate(items, n_embd):
    """Pad a list of (vectors (n_i, D), features (n_i, F), tail (G_i, D) or None) into batch tensors."""
    if not items:
        raise ValueError("LensNet needs at least one WC to score")
    device = items[0][0].device
    B, N = len(items), max(len(v) for v, _, _ in items)
    G = max((0 if t is None else len(t)) for _, _, t in items)
    vectors = torch.zeros(B, N, n_embd, device=device)
    features = torch.zeros(B, N, N_FEATURES, device=device)
    entry_mask = torch.zeros(B, N, dtype=torch.bool, device=device)
    tail = torch.zeros(B, G, n_embd, device=device)
    tail_mask = torch.zeros(B, G, dtype=torch.bool, device=device)
    for b, (v, f, t) in enumerate(items):
        if v.size(-1) != n_embd:
            raise ValueError(f"entry vectors have width {v.size(-1)} but LensNet was built for n_embd={n_embd}")
        vectors[b, :len(v)] = v.float()
        features[b, :len(f)] = f
        entry_mask[b, :len(v)] = True
        if t is not None and len(t):
            if t.ndim != 2 or t.size(-1) != n_embd:
                raise ValueError(f"tail_gists must be (G, {n_embd}), got {tuple(t.shape)}")
            tail[b, :len(t)] = t.float()
            tail_mask[b, :len(t)] = True
    return vectors, features, entry_mask, tail, tail_mask


def legal_masks(wc):
    """(can_expand, can_collapse) (n,) bool numpy arrays: gists may expand (the allocator pairs an
    expansion with a collapse when the budget is full); collapsible_mask() entries may collapse."""
    return wc.levels > 0, wc.collapsible_mask()


def mask_illegal(scores, wc):
    """Scores (tensor or array, (len(wc),)) with illegal actions set to 0: a positive score only
    where the entry can expand, a negative one only where it can collapse."""
    can_expand, can_collapse = legal_masks(wc)
    s = torch.as_tensor(scores)
    up = torch.as_tensor(can_expand, device=s.device)
    down = torch.as_tensor(can_collapse, device=s.device)
    return torch.where(s > 0, s * up, s * down)


def tail_gists_of(lod1, lod2, lod1_tail=256):
    """The training analogue of a TailGistCache: every LOD2 gist plus the last lod1_tail LOD1 gists."""
    parts = [g for g in (lod2, lod1[max(0, len(lod1) - lod1_tail):] if lod1 is not None else None)
             if g is not None and len(g)]
    if not parts:
        return None
    return torch.cat(parts)


def load_lensnet(spec, n_embd, device="cpu"):
    """A LensNet in eval mode from a JT2 run's model tag (its last mc_XXXXXX.pt under
    $NANOCHAT_BASE_DIR/base_checkpoints/<tag>) or a path to an mc file."""
    from megacontext.variant import last_mc_file
    path = last_mc_file(spec, f"LensNet checkpoint at {spec}",
                        "python -m nanochat.train --config configs/lensnet_cpu.yaml")
    data = torch.load(path, map_location="cpu", weights_only=False)
    if not (isinstance(data, dict) and isinstance(data.get("lensnet"), dict)):
        raise ValueError(f"{path} is not a LensNet checkpoint (no 'lensnet' entry); is it a JT1 GistNet file?")
    config = LensNetConfig(**data["lensnet"]["config"])
    if config.n_embd != n_embd:
        raise ValueError(f"LensNet {path} has n_embd={config.n_embd} but the base model has {n_embd}; "
                         f"it was trained for another model")
    lensnet = LensNet(config, gistnet_identity=data.get("gistnet_identity"))
    lensnet.load_state_dict(data["lensnet"]["state_dict"], strict=True)
    return lensnet.to(device).eval()


def lensnet_flops(config, n_entries, n_tail):
    """Multiply-adds x 2 of one forward over n_entries entries and n_tail tail gists (+ null)."""
    d, n, g = config.d_model, n_entries, n_tail + 1
    proj = 2 * n * (config.n_embd * d + N_FEATURES * d) + 2 * n_tail * config.n_embd * d
    attn = lambda tq, tk: 2 * (tq * d * d + 2 * tk * d * d + 2 * tq * tk * d + tq * d * d)
    per_layer = attn(g, n) + attn(n, g) + attn(n, n) + 2 * 2 * n * d * config.mlp_ratio * d
    return proj + config.n_layer * per_layer + 2 * n * d
