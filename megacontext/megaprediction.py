"""
MegaPrediction: heads on the base model that predict, from the hidden state at a block end,
the GistNet gist of what comes next, and the planner that places those predictions in the
Working Context ahead of the tokens they describe (gist-first decoding).

    heads = MegaPrediction(MegaPredictionConfig(n_embd=256)).init_weights(seed=0)
    with capture_hidden(model) as cap:          # the lm_head's input, nanochat untouched
        model(rows)
    lod1_pred = heads(cap.hidden[:, 32::32], 1) # the gist of the NEXT 32-token block
    lod2_pred = heads(cap.hidden[:, 32::32], 2) # the LOD2 gist of the next 1024 tokens
    planner = Planner(heads, lod_mix=[1, 2])    # plan slots before a block: LOD2 plan, LOD1 plan

Positions and targets. Input position i of a row [BOS, t_0, t_1, ...] has read BOS + t_0..t_{i-1};
the position 32k (k >= 1) ends block k-1, and its hidden state predicts
    LOD1 target  gistnet(block k)                       block k = t_{32k} .. t_{32k+31}
    LOD2 target  gistnet(LOD1 gists of blocks k .. k+31, level 2)    the next 1024 tokens
The LOD2 target slides with k (a span of 32 blocks starting at the position), so it coincides
with a tree's LOD2 node only where k is a multiple of 32; a plan describes what is coming from
here, not a node of the tree. The BOS position ends no block and is never a training position.
Targets are computed under no_grad: GistNet is never trained through them.

What the heads share with the LM head. They read exactly the normed final hidden state the LM
head reads (capture_hidden: a forward pre-hook on model.lm_head, so gpt.py is untouched and the
features are the ones the LM objective shapes). No weight is shared: lm_head maps into the
vocabulary, a gist lives in the input-embedding space (wte, untied from lm_head in nanochat),
so there is no common matrix short of tying them; and the heads read detached features, so
their loss never pulls on the LM's weights or changes its logits.

Why a 2-layer MLP (the default; "linear" is the ablation). The expected gist of the next block
is close to an expectation of token embeddings under the model's future distribution, a
softmax-like, non-linear function of the hidden state; a linear map cannot bend that way, and
one ReLU^2 layer of width hidden_mult x D (nanochat's MLP non-linearity) is the smallest thing
that can. The output is not normed: GistNet's "mean" and "mean_linear" gists are not unit-RMS,
so the MSE term learns the scale and the cosine term the direction.

Copy-last-gist baseline: the gist of the span starting at block b predicted as the gist of the
span just before it (copy_last_gist); it is what the heads must beat.

What it owns: the heads, their loss, the targets' definition, the hidden-state capture and the
planner. It never trains GistNet or the base model, never edits nanochat, never writes files
and never decides WC layouts (working_context.py does; plan slots are extra slots, never WC
entries).
"""

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.gpt import Linear
from megacontext.gistnet import token_embeddings

BLOCK = 32            # tokens per LOD1 gist, LOD1 gists per LOD2 gist (megacontext/tree.py's BLOCK_SIZE)
LEVELS = (1, 2)
HEADS = ("mlp", "linear")
LOD2_TOKENS = BLOCK * BLOCK  # the future a LOD2 target covers


@dataclass
class MegaPredictionConfig:
    n_embd: int = 768     # the base model's n_embd: hidden states and gists both have this width
    head: str = "mlp"     # "mlp" (Linear -> ReLU^2 -> Linear) | "linear" (one D x D map)
    hidden_mult: int = 2  # the MLP's width in units of n_embd

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"MegaPredictionConfig.head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.n_embd <= 0 or self.hidden_mult <= 0:
            raise ValueError(f"MegaPredictionConfig needs n_embd > 0 and hidden_mult > 0, got n_embd={self.n_embd}, "
                             f"hidden_mult={self.hidden_mult}")


class MLPHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        D = config.n_embd
        self.c_fc = Linear(D, config.hidden_mult * D, bias=False)
        self.c_proj = Linear(config.hidden_mult * D, D, bias=False)

    def forward(self, h):
        return self.c_proj(F.relu(self.c_fc(h)).square())


class LinearHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.proj = Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, h):
        return self.proj(h)


class MegaPrediction(nn.Module):
    """One head per level: hidden states (..., D) -> predicted gists (..., D), float32."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        make = MLPHead if config.head == "mlp" else LinearHead
        self.levels = nn.ModuleList([make(config) for _ in LEVELS])  # levels[0] -> LOD1, levels[1] -> LOD2

    @torch.no_grad()
    def init_weights(self, seed=None):
        """Uniform draws with std 1/sqrt(fan_in) (the output layer at half that), from a private
        generator when seeded. Nothing starts at zero: a zero prediction has no direction, and the
        cosine term's gradient there is undefined."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(seed)
        for level in self.levels:
            linears = [level.c_fc, level.c_proj] if isinstance(level, MLPHead) else [level.proj]
            for j, lin in enumerate(linears):
                bound = 3**0.5 * lin.in_features**-0.5 * (0.5 if j == len(linears) - 1 and j > 0 else 1.0)
                lin.weight.copy_(torch.empty(lin.weight.shape).uniform_(-bound, bound, generator=gen))
        return self

    def forward(self, hidden, level):
        if level not in LEVELS:
            raise ValueError(f"MegaPrediction level must be 1 (the next block) or 2 (the next 1024 tokens), got {level!r}")
        if hidden.size(-1) != self.config.n_embd:
            raise ValueError(f"MegaPrediction expects hidden states of width {self.config.n_embd}, got {tuple(hidden.shape)}")
        return self.levels[level - 1](hidden.float())

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def state_dict_prefixed(self):
        """The weights under the `megaprediction.` key prefix (how mc_XXXXXX.pt files hold them)."""
        return {f"megaprediction.{k}": v for k, v in self.state_dict().items()}

    def load_prefixed(self, state):
        self.load_state_dict({k[len("megaprediction."):]: v for k, v in state.items()}, strict=True)
        return self


def load_megaprediction(spec, n_embd, device="cpu"):
    """The heads an end-to-end run saved (its model tag, or an mc_XXXXXX.pt path), in eval mode ->
    (heads, info) with info = dict(path, gistnet_identity, context_tokens). ValueError when that
    run trained no heads or for another model."""
    from megacontext.variant import last_mc_file
    path = last_mc_file(spec, f"MegaPrediction heads at {spec}",
                        "python -m nanochat.train --config configs/megaprediction_cpu.yaml")
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved = state.get("megaprediction") if isinstance(state, dict) else None
    if not saved:
        raise ValueError(f"{path} holds no MegaPrediction heads (its run had megaprediction off); train them with "
                         f"`python -m nanochat.train --config configs/megaprediction_cpu.yaml`, or drop megaprediction")
    meta = dict(state.get("megaprediction_config") or {})
    config = MegaPredictionConfig(**{k: meta[k] for k in ("n_embd", "head", "hidden_mult") if k in meta})
    if config.n_embd != n_embd:
        raise ValueError(f"the MegaPrediction heads in {path} have n_embd={config.n_embd} but the base model has "
                         f"{n_embd}; they were trained for another model")
    heads = MegaPrediction(config).load_prefixed(saved).to(device).eval()
    return heads, {"path": path, "gistnet_identity": state.get("gistnet_identity"),
                   "context_tokens": meta.get("context_tokens")}

# -----------------------------------------------------------------------------
# The hidden state the LM head reads


@contextmanager
def capture_hidden(model, positions=None):
    """Within the block, each forward of model records the input of model.lm_head (the final
    normed hidden state, (B, T, D)) in cap.hidden. With `positions` (a 1-D index of sequence
    positions) the LM head only sees those positions: the forward then returns their logits
    alone, which skips the vocabulary matmul everywhere else (the largest one of the model)."""
    base = getattr(model, "_orig_mod", model)
    cap = SimpleNamespace(hidden=None)

    def hook(module, args):
        cap.hidden = args[0]
        if positions is not None:
            return (args[0][:, positions],)
        return None

    handle = base.lm_head.register_forward_pre_hook(hook)
    try:
        yield cap
    finally:
        handle.remove()


def block_end_hidden(model, rows, n_positions):
    """rows (R, >= 1 + 32 n_positions) long, BOS first -> (R, n_positions, D) detached float32:
    the hidden states at positions 32, 64, .., 32 n_positions (position 32k has read blocks
    0..k-1). Token path, no_grad, in eval mode (so nothing random runs, e.g. a LoRA's dropout)."""
    base = getattr(model, "_orig_mod", model)
    T = 1 + BLOCK * n_positions
    if rows.size(1) < T:
        raise ValueError(f"block_end_hidden needs rows of at least {T} tokens for {n_positions} positions, "
                         f"got {rows.size(1)}")
    positions = torch.arange(BLOCK, T, BLOCK, device=rows.device)
    was_training = base.training
    base.eval()
    try:
        with torch.no_grad(), capture_hidden(base, positions) as cap:
            base(rows[:, :T])
    finally:
        base.train(was_training)
    return cap.hidden[:, positions].detach().float()

# -----------------------------------------------------------------------------
# Targets and the baseline


def span_gists(model, gistnet, tokens):
    """tokens (R, 32 n) long (no BOS) -> (lod1 (R, n, D), lod2 (R, n - 31, D)), float32, no_grad:
    lod1[:, j] = GistNet's gist of block j, lod2[:, j] = its LOD2 gist of blocks j .. j + 31 (a
    sliding span; LOD1 gists are cast to float32 before LOD2 is made of them, as the end-to-end
    variant does)."""
    R, n = tokens.size(0), tokens.size(1) // BLOCK
    if tokens.size(1) != n * BLOCK or n == 0:
        raise ValueError(f"span_gists needs whole 32-token blocks, got {tokens.size(1)} tokens per row")
    D = gistnet.config.n_embd
    with torch.no_grad():
        emb = token_embeddings(model, tokens.reshape(R * n, BLOCK))
        lod1 = gistnet(emb, 1).float().view(R, n, D)
        if n < BLOCK:
            return lod1, lod1[:, :0]
        windows = lod1.unfold(1, BLOCK, 1)                     # (R, n - 31, D, 32)
        windows = windows.permute(0, 1, 3, 2).reshape(-1, BLOCK, D)
        lod2 = gistnet(windows, 2).float().view(R, n - BLOCK + 1, D)
    return lod1, lod2


def copy_last_gist(gists, span_blocks=1):
    """The copy-last-gist baseline over a sequence of gists (..., n, D) of spans `span_blocks`
    blocks long starting at consecutive blocks: returns (predictions, targets), row j predicting
    the span that starts at block j + span_blocks by the span just before it (block b+1's gist =
    block b's gist for LOD1, span_blocks = 1; the previous 1024 tokens for LOD2, span_blocks = 32)."""
    if gists.size(-2) <= span_blocks:
        return gists[..., :0, :], gists[..., :0, :]
    return gists[..., :-span_blocks, :], gists[..., span_blocks:, :]


def megaprediction_loss(prediction, target, w_cos=1.0, w_mse=1.0):
    """w_cos * (1 - cos) + w_mse * MSE (mean over the D components), averaged over positions,
    target detached -> (loss, per-position cosine detached). Zero exactly when they agree."""
    target = target.detach().float()
    prediction = prediction.float()
    cos = F.cosine_similarity(prediction, target, dim=-1, eps=1e-8)
    mse = (prediction - target).pow(2).mean(-1)
    loss = (w_cos * (1.0 - cos) + w_mse * mse).mean()
    return loss, cos.detach()


def training_examples(model, gistnet, long_rows, n_positions):
    """The heads' examples from rows of BOS + 32 n_positions tokens read by the model + 1024 more
    tokens for the targets only -> dict(hidden, lod1, lod2, copy_lod1) each (R, n_positions, D)
    and copy_lod2 (R, n_positions, D) with copy_lod2_mask (n_positions,) bool (the baseline's
    previous 1024 tokens exist only from k = 32). Position k-1 of the arrays is block end k."""
    need = 1 + BLOCK * n_positions + LOD2_TOKENS
    if long_rows.size(1) != need:
        raise ValueError(f"training_examples needs rows of 1 + 32 x {n_positions} + {LOD2_TOKENS} = {need} tokens, "
                         f"got {long_rows.size(1)}")
    hidden = block_end_hidden(model, long_rows, n_positions)
    lod1, lod2 = span_gists(model, gistnet, long_rows[:, 1:])   # n_positions + 32 blocks, n_positions + 1 spans
    K = n_positions
    copy2 = torch.zeros_like(hidden)
    mask2 = torch.zeros(K, dtype=torch.bool, device=hidden.device)
    if K >= BLOCK:  # block end k >= 32 has the previous 1024 tokens: span k - 32
        copy2[:, BLOCK - 1:] = lod2[:, :K - BLOCK + 1]
        mask2[BLOCK - 1:] = True
    return dict(hidden=hidden, lod1=lod1[:, 1:K + 1], lod2=lod2[:, 1:K + 1], copy_lod1=lod1[:, :K],
                copy_lod2=copy2, copy_lod2_mask=mask2)

# -----------------------------------------------------------------------------
# Gist-first decoding


def check_lod_mix(lod_mix):
    """lod_mix (the levels whose predicted gists are placed as plan slots: [1], [1, 2] or [2]) ->
    the placement order, coarse first: (1,), (2, 1) or (2,). Before a block of 32 tokens the
    LOD2 plan (the next 1024 tokens from there) comes first, then the LOD1 plan (this block), so
    the finest plan sits next to the tokens it describes, as the WC orders coarse before fine."""
    levels = [lod_mix] if isinstance(lod_mix, int) else list(lod_mix or [])
    if not levels or any(lv not in LEVELS for lv in levels) or len(set(levels)) != len(levels):
        raise ValueError(f"lod_mix lists the levels whose predicted gists are placed as plan slots: [1] or [1, 2] "
                         f"(or [2]); got {lod_mix!r}")
    return tuple(sorted(levels, reverse=True))


class Planner:
    """MegaPrediction heads + lod_mix: the plan slots to place before a block, from the hidden
    state at the position just before it."""

    def __init__(self, heads, lod_mix=(1,)):
        self.heads = heads
        self.order = check_lod_mix(lod_mix)

    @property
    def slots(self):
        """Plan slots per block."""
        return len(self.order)

    @torch.no_grad()
    def plans(self, hidden):
        """hidden (N, D) -> (N, slots, D) float32 plan vectors, in placement order."""
        return torch.stack([self.heads(hidden, level) for level in self.order], dim=1)

    def describe(self):
        return {"lod_mix": sorted(self.order), "placement": [f"LOD{lv}" for lv in self.order],
                "heads": asdict(self.heads.config)}
