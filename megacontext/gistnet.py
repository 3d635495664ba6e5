"""
GistNet: compresses a block of 32 vectors into one gist in the base model's embedding space.

    LOD1 gist = gistnet(token_embeddings(model, block_ids), level=1)    # 32 tokens -> 1
    LOD2 gist = gistnet(stack of 32 LOD1 gists, level=2)                # 1024 tokens -> 1

Inputs and outputs live in the space of the base model's *normed* token embeddings (what
GPT.forward has right after wte -> norm, before the smear), so a gist can sit in a working
context wherever a token embedding could (megacontext/base_inputs.py feeds it in) and a
LOD1 gist is a valid LOD2 input.

Three heads, picked by GistNetConfig.head:
- "attention": a learned slot that starts from the mean of the block, a few bidirectional
  self-attention blocks over the 32 inputs, cross-attention from the slot to them, a residual
  MLP, a projection to D and a final norm. Initialised so that an untrained one returns
  norm(mean(inputs)): training starts from the mean-pool baseline and learns what to add.
- "mean": the plain mean of the 32 inputs (no parameters), the simplest baseline.
- "mean_linear": the mean followed by a learned D x D linear map, initialised to the identity.

Levels 1 and 2 either share one set of weights or get one each (GistNetConfig.shared_levels).

This module owns the network and its fingerprint (identity(), the GistNet id written into
.ctx files). It never reads or writes files, never edits the base model, and never decides
which blocks get gisted (megacontext/tree.py and working_context.py do).
"""

import hashlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import COMPUTE_DTYPE
from nanochat.gpt import MLP, Linear, norm

HEADS = ("attention", "mean", "mean_linear")
LEVELS = (1, 2)


@dataclass
class GistNetConfig:
    n_embd: int = 768         # must equal the base model's n_embd: gists live in its embedding space
    n_layer: int = 2          # bidirectional self-attention blocks before the slot reads the block
    n_head: int = 6
    block_size: int = 32      # inputs per gist (tokens for LOD1, LOD1 gists for LOD2)
    shared_levels: bool = False  # one set of weights for LOD1 and LOD2, or one per level
    head: str = "attention"   # "attention" | "mean" | "mean_linear"

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"GistNetConfig.head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.n_embd <= 0 or self.block_size <= 0:
            raise ValueError(f"GistNetConfig needs n_embd > 0 and block_size > 0, "
                             f"got n_embd={self.n_embd}, block_size={self.block_size}")
        if self.head == "attention":
            if self.n_head <= 0 or self.n_embd % self.n_head != 0:
                raise ValueError(f"GistNetConfig: n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
            if self.n_layer < 0:
                raise ValueError(f"GistNetConfig: n_layer must be >= 0, got {self.n_layer}")


def token_embeddings(model, token_ids):
    """The base model's input embeddings for `token_ids` (any shape, e.g. (N, 32)) -> (..., D).

    Bit-identical to what GPT.forward computes before the smear: wte lookup, cast to
    COMPUTE_DTYPE, parameter-free RMSNorm. The table is read directly (F.embedding on
    wte.weight) so a gist override that base_inputs may have active does not apply here."""
    base = getattr(model, "_orig_mod", model)  # a torch.compile'd model wraps the real one
    weight = base.transformer.wte.weight
    if token_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"token_embeddings expects integer token ids, got dtype {token_ids.dtype}")
    x = F.embedding(token_ids.to(weight.device), weight)
    return norm(x.to(COMPUTE_DTYPE))



def history_gists(model, gistnet, histories, dtype=None):
    """GistNet's gists of whole histories: per history (1-D token ids) a tuple
    (lod1 (n_blocks, D), lod2 (n_groups, D), inputs (n_blocks, 32, D)): the LOD1 gist of each
    whole 32-token block (one batched call over every history), the LOD2 gist of each whole
    group of 32 blocks, and the blocks' token embeddings. Autograd reaches GistNet unless the
    caller runs under no_grad (the embeddings never carry a gradient). dtype: cast the LOD1
    gists to it before the LOD2 gists are made from them, and those too; None keeps GistNet's
    output dtype."""
    from megacontext.tree import BLOCK_SIZE as B
    base = getattr(model, "_orig_mod", model)
    device, D = base.get_device(), base.config.n_embd
    n_blocks = [len(h) // B for h in histories]
    blocks = [torch.as_tensor(h[:n * B], dtype=torch.long, device=device).view(n, B)
              for h, n in zip(histories, n_blocks) if n]
    with torch.no_grad():
        inputs_all = token_embeddings(model, torch.cat(blocks)) if blocks else None
    lod1_all = gistnet(inputs_all, 1) if blocks else None
    if lod1_all is not None and dtype is not None:
        lod1_all = lod1_all.to(dtype)
    out, cursor = [], 0
    for n in n_blocks:
        if n:
            lod1, inputs = lod1_all[cursor:cursor + n], inputs_all[cursor:cursor + n]
        else:
            lod1, inputs = torch.zeros(0, D, device=device), torch.zeros(0, B, D, device=device)
        cursor += n
        groups = n // B
        lod2 = gistnet(lod1[:groups * B].reshape(groups, B, -1), 2) if groups else None
        if lod2 is None:
            lod2 = torch.zeros(0, lod1.size(-1), device=device) if dtype is None else lod1[:0]
        elif dtype is not None:
            lod2 = lod2.to(dtype)
        out.append((lod1, lod2, inputs))
    return out

class BidirectionalAttention(nn.Module):
    """Multi-head attention without a causal mask, with QK-norm like the base model.

    nanochat's CausalSelfAttention is not reused: it is hard-wired to causal masking, rotary
    positions, value embeddings and a KV cache, none of which fit here. Every one of the 32
    inputs should see all the others, and the slot's cross-attention has queries and keys
    from different sequences, so a small SDPA module is simpler than bending Block to it.
    Positions come from a learned table added to the inputs (see AttentionGist)."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.head_dim = n_embd // n_head
        self.c_q = Linear(n_embd, n_embd, bias=False)
        self.c_k = Linear(n_embd, n_embd, bias=False)
        self.c_v = Linear(n_embd, n_embd, bias=False)
        self.c_proj = Linear(n_embd, n_embd, bias=False)

    def forward(self, x, context):
        # queries from x (N, Tq, D), keys and values from context (N, Tk, D)
        N, Tq, D = x.shape
        Tk = context.size(1)
        q = self.c_q(x).view(N, Tq, self.n_head, self.head_dim).transpose(1, 2)
        k = self.c_k(context).view(N, Tk, self.n_head, self.head_dim).transpose(1, 2)
        v = self.c_v(context).view(N, Tk, self.n_head, self.head_dim).transpose(1, 2)
        q, k = norm(q), norm(k)
        y = F.scaled_dot_product_attention(q, k, v)  # no mask: all inputs are visible to all
        y = y.transpose(1, 2).reshape(N, Tq, D)
        return self.c_proj(y)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block over the 32 inputs: bidirectional attention + ReLU^2 MLP."""

    def __init__(self, config):
        super().__init__()
        self.attn = BidirectionalAttention(config.n_embd, config.n_head)
        self.mlp = MLP(config)  # nanochat's MLP only needs config.n_embd

    def forward(self, x):
        h = norm(x)
        x = x + self.attn(h, h)
        x = x + self.mlp(norm(x))
        return x


class AttentionGist(nn.Module):
    """One level's weights for the "attention" head: (N, 32, D) -> (N, D)."""

    def __init__(self, config):
        super().__init__()
        D = config.n_embd
        # Token embeddings carry no position and attention is order-blind, so without this
        # table "dog bites man" and "man bites dog" would get the same gist.
        self.pos = nn.Parameter(torch.empty(config.block_size, D))
        self.blocks = nn.ModuleList([EncoderBlock(config) for _ in range(config.n_layer)])
        self.slot_query = nn.Parameter(torch.empty(D))
        self.cross_attn = BidirectionalAttention(D, config.n_head)
        self.mlp = MLP(config)
        self.out_proj = Linear(D, D, bias=False)

    def forward(self, x):
        h = x + self.pos.to(x.dtype)
        for block in self.blocks:
            h = block(h)
        # The slot's residual stream starts at the plain mean of the block: with the zero-init
        # output projections below, an untrained GistNet is exactly the mean-pool baseline.
        slot = (x.mean(dim=1) + self.slot_query.to(x.dtype)).unsqueeze(1)  # (N, 1, D)
        slot = slot + self.cross_attn(norm(slot), norm(h))
        slot = slot + self.mlp(norm(slot))
        # GPT.forward norms whatever sits in an embedding slot, so only the direction of a gist
        # reaches the base model; the final norm also puts LOD1 gists on the same scale as the
        # token embeddings, which is what LOD2 reads.
        return norm(self.out_proj(slot.squeeze(1)))


class MeanLinearGist(nn.Module):
    """One level's weights for the "mean_linear" head: mean pool, then a learned linear map."""

    def __init__(self, config):
        super().__init__()
        self.proj = Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.proj(x.mean(dim=1))


class GistNet(nn.Module):
    def __init__(self, config):
        """Builds the modules only (works under `with torch.device('meta')`); call init_weights()."""
        super().__init__()
        self.config = config
        make = {"attention": AttentionGist, "mean_linear": MeanLinearGist, "mean": None}[config.head]
        n_sets = 0 if make is None else (1 if config.shared_levels else len(LEVELS))
        # levels[0] serves LOD1 (and LOD2 when shared), levels[1] serves LOD2
        self.levels = nn.ModuleList([make(config) for _ in range(n_sets)])

    @torch.no_grad()
    def init_weights(self, seed=None):
        """Give every parameter its initial value. With `seed` the draws come from a private
        generator (same weights on any device, global RNG untouched); without, from torch's
        global CPU RNG. Either way the values are drawn on the CPU and copied in.

        attention: pos normal(0, 0.1); slot_query zeros; q/k/v and mlp.c_fc uniform like nanochat
                   (std 1/sqrt(D), c_fc 0.4x); every c_proj zeros; out_proj identity
        mean_linear: proj identity"""
        gen = None
        if seed is not None:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(seed)
        D = self.config.n_embd
        s = 3**0.5 * D**-0.5  # uniform(-s, s) has std 1/sqrt(D)

        def fill(param, sample):
            param.copy_(sample)

        def uniform(param, bound):
            fill(param, torch.empty(param.shape).uniform_(-bound, bound, generator=gen))

        def attention_init(attn):
            for lin in (attn.c_q, attn.c_k, attn.c_v):
                uniform(lin.weight, s)
            attn.c_proj.weight.zero_()

        def mlp_init(mlp):
            uniform(mlp.c_fc.weight, 0.4 * s)
            mlp.c_proj.weight.zero_()

        for level in self.levels:
            if isinstance(level, AttentionGist):
                fill(level.pos, torch.empty(level.pos.shape).normal_(0.0, 0.1, generator=gen))
                for block in level.blocks:
                    attention_init(block.attn)
                    mlp_init(block.mlp)
                level.slot_query.zero_()
                attention_init(level.cross_attn)
                mlp_init(level.mlp)
                fill(level.out_proj.weight, torch.eye(D))
            else:
                fill(level.proj.weight, torch.eye(D))
        return self

    def forward(self, x, level):
        """x (N, block_size, n_embd) -> gists (N, n_embd), in x's dtype."""
        if level not in LEVELS:
            raise ValueError(f"GistNet level must be 1 (gists of tokens) or 2 (gists of LOD1 gists), got {level!r}")
        B, D = self.config.block_size, self.config.n_embd
        if x.ndim != 3 or x.size(1) != B or x.size(2) != D:
            raise ValueError(f"GistNet expects inputs of shape (N, {B}, {D}), got {tuple(x.shape)}; "
                             f"group the sequence into whole blocks of {B} first")
        if not x.is_floating_point():
            raise ValueError(f"GistNet expects embedding vectors, got dtype {x.dtype}; "
                             f"turn token ids into vectors with token_embeddings(model, ids)")
        if not self.levels:  # the "mean" head has no weights
            return x.mean(dim=1)
        weights = self.levels[0] if self.config.shared_levels else self.levels[level - 1]
        return weights(x)

    def architecture(self):
        """A readable name for the architecture (no weights), e.g. 'attention-L2-H6-D768-B32-split'."""
        c = self.config
        levels = "shared" if c.shared_levels else "split"
        if c.head == "attention":
            return f"attention-L{c.n_layer}-H{c.n_head}-D{c.n_embd}-B{c.block_size}-{levels}"
        if c.head == "mean_linear":
            return f"mean_linear-D{c.n_embd}-B{c.block_size}-{levels}"
        return f"mean-D{c.n_embd}-B{c.block_size}"

    @torch.no_grad()
    def identity(self):
        """'gistnet-<architecture>-<12 hex digits>': the hex is a SHA-256 over the architecture
        and every weight (names, shapes, values as fp32), so two GistNets share an identity only
        if they compute the same function. Used as the GistNet id in .ctx files."""
        arch = self.architecture()
        digest = hashlib.sha256(arch.encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(repr(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        # a JT1 run whose windows held no whole 1024-token span leaves separate LOD2 weights at their
        # init: gists made with them are marked, so they never pass as a trained GistNet's
        untrained = "" if self.config.shared_levels or 2 not in self.untrained_levels else "-lod2untrained"
        return f"gistnet-{arch}-{digest.hexdigest()[:12]}{untrained}"

    untrained_levels = ()  # levels whose weights were never trained (set by whoever loads a JT1 checkpoint)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())
