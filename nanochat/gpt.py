"""
The nanochat GPT: a compact decoder-only Transformer.

What sets it apart from a textbook GPT-2:
- rotary position embeddings, no learned positional table
- QK-norm, and RMSNorm without learnable parameters everywhere
- separate (untied) token embedding and lm_head; a norm right after the embedding
- ReLU^2 MLP, no biases anywhere
- grouped-query attention (n_kv_head <= n_head) for a smaller KV cache
- per-layer sliding windows (the "SSSL" pattern), served by FA3 or an SDPA fallback
- modded-nanogpt-style extras: per-layer residual/x0 scalars, value embeddings
  (ResFormer) on alternating layers, a "smear" of the previous token's embedding,
  a "backout" of the mid-network residual, and a tanh softcap on the logits

Parameters are created on the meta device and only materialised by init_weights(),
so __init__ must never touch tensor data.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import print0, COMPUTE_DTYPE
from nanochat.optim import MuonAdamW

# FA3 on Hopper when available, PyTorch SDPA everywhere else; same call signature either way
from nanochat.flash_attention import flash_attn


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (fewer than n_head = GQA)
    n_embd: int = 768
    # Per-layer attention span, tiled over the layers; the last layer is always L.
    # L = the full sequence_len, S = about a quarter of it (rounded up to 128).
    window_pattern: str = "SSSL"


def norm(x):
    # parameter-free RMSNorm over the channel dim; runs in whatever dtype x has
    return F.rms_norm(x, (x.size(-1),))


class Linear(nn.Linear):
    """nn.Linear whose fp32 master weight is cast to the input's dtype at call time.
    This is our replacement for autocast: the optimizer sees fp32 weights while the
    matmul runs in the activation dtype (bf16 on modern GPUs, fp32 on CPU)."""
    def forward(self, x):
        return F.linear(x, self.weight.to(dtype=x.dtype))


def has_ve(layer_idx, n_layer):
    """Whether layer `layer_idx` gets a value embedding: every other layer, always including the last."""
    return layer_idx % 2 == (n_layer - 1) % 2


def apply_rotary_emb(x, cos, sin):
    # x is (B, T, H, D); the two halves of D form the rotated pairs. The sign convention
    # (rotating by -theta) only has to agree between q and k, and existing checkpoints use it.
    assert x.ndim == 4, "apply_rotary_emb expects a (B, T, H, D) tensor"
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], 3)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.n_embd = config.n_embd
        self.head_dim = self.n_embd // self.n_head
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not (self.n_kv_head <= self.n_head and self.n_head % self.n_kv_head == 0):
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head} (and be <= it)")
        self.c_q = Linear(self.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = Linear(self.n_embd, self.n_embd, bias=False)
        # the value-embedding gate only looks at the first few channels: cheap and enough
        self.ve_gate_channels = 12
        self.ve_gate = None
        if has_ve(layer_idx, config.n_layer):
            self.ve_gate = Linear(self.ve_gate_channels, self.n_kv_head, bias=False)

    def forward(self, x, ve, cos_sin, window_size, kv_cache):
        B, T, C = x.size()

        # (B, T, heads, head_dim) is the layout FA3 wants, so no transposes here
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)

        # Value residual: add the token's value embedding, scaled per kv-head by a gate in (0, 3)
        if ve is not None:
            ve = ve.view(B, T, self.n_kv_head, self.head_dim)
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))  # (B, T, n_kv_head)
            v = v + gate.unsqueeze(-1) * ve

        # positions enter through the rotation of q and k only
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)
        # QK-norm fixes the logit scale; this bumps it a little (1.2^2 overall) for sharper attention
        q = q * 1.2
        k = k * 1.2

        # window_size = (left, right): (N, 0) lets each query see itself and N tokens back
        if kv_cache is None:
            y = flash_attn.flash_attn_func(q, k, v, causal=True, window_size=window_size)
        else:
            # the kernel writes this step's k/v into the cache in place and attends over it
            k_cache, v_cache = kv_cache.get_layer_cache(self.layer_idx)
            y = flash_attn.flash_attn_with_kvcache(
                q, k_cache, v_cache,
                k=k, v=v,
                cache_seqlens=kv_cache.cache_seqlens,
                causal=True,
                window_size=window_size,
            )
            # every layer writes at the same offset, so move it on only after the last one
            if self.layer_idx == kv_cache.n_layers - 1:
                kv_cache.advance(T)

        y = y.contiguous().view(B, T, -1)
        y = self.c_proj(y)
        return y


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        x = self.c_fc(x)
        x = F.relu(x).square()
        x = self.c_proj(x)
        return x


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, window_size, kv_cache):
        x = x + self.attn(norm(x), ve, cos_sin, window_size, kv_cache)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config, pad_vocab_size_to=64):
        """
        Builds the module tree only. This usually runs under `with torch.device('meta')`,
        so whatever is computed here is shapes and dtypes, not values: the real
        initialisation of every parameter and buffer lives in init_weights().
        """
        super().__init__()
        self.config = config
        self.window_sizes = self._compute_window_sizes(config)
        # Round the vocab up (to 64 by default) so the big embedding/unembedding matmuls
        # get friendly shapes; forward() crops the extra logits away again.
        padded_vocab_size = -(-config.vocab_size // pad_vocab_size_to) * pad_vocab_size_to
        if padded_vocab_size != config.vocab_size:
            print0(f"Padding vocab_size from {config.vocab_size} to {padded_vocab_size} for efficiency")
        # NOTE: registration order below fixes named_parameters() order, which checkpoints,
        # optimizer state and tests rely on: direct Parameters first, then submodules.
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(padded_vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, layer_idx) for layer_idx in range(config.n_layer)]),
        })
        self.lm_head = Linear(config.n_embd, padded_vocab_size, bias=False)
        # Learnable per-layer scalars, kept as separate Parameters so the optimizer can
        # treat them differently. Each layer's input is resid_lambdas[i] * x + x0_lambdas[i] * x0,
        # where x0 is the normalised embedding. Values set here are placeholders.
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        # Smear: a gated mix of the previous token's embedding into each position, a
        # cheap source of bigram information. The gate reads the first 24 channels.
        self.smear_gate = Linear(24, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        # Backout: subtract a scaled copy of the mid-network residual before the final
        # norm, removing low-level features the unembedding does not want.
        self.backout_lambda = nn.Parameter(0.2 * torch.ones(1))
        # Value embeddings: a second token table per selected layer, added to v in attention
        head_dim = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * head_dim
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(padded_vocab_size, kv_dim)
            for i in range(config.n_layer) if has_ve(i, config.n_layer)
        })
        # Rotary tables for 10x the training length: they are small, and it leaves room
        # for generation past sequence_len. forward() refuses to go beyond them.
        # Non-persistent: recomputed by init_weights(), never stored in checkpoints.
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len, head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self):
        """
        Give every parameter and buffer its real initial value. The order of the random
        draws below is part of the contract (seeded runs must reproduce bit for bit).

        wte                       normal, std 0.8
        lm_head                   normal, std 0.001
        attn.c_q / c_k / c_v      uniform, std 1/sqrt(n_embd)
        attn.c_proj, mlp.c_proj   zeros
        mlp.c_fc                  uniform, 0.4x the c_q std
        value_embeds              uniform like c_v;  ve_gate, smear_gate: uniform [0, 0.02)
        """
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8)
        torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)

        # Uniform(-s, s) has std s/sqrt(3), so s = sqrt(3)/sqrt(n_embd) matches a normal with
        # std 1/sqrt(n_embd) but without its outliers.
        n_embd = self.config.n_embd
        s = 3**0.5 * n_embd**-0.5
        for block in self.transformer.h:
            torch.nn.init.uniform_(block.attn.c_q.weight, -s, s)
            torch.nn.init.uniform_(block.attn.c_k.weight, -s, s)
            torch.nn.init.uniform_(block.attn.c_v.weight, -s, s)
            # output projections start at zero: each block begins as the identity
            torch.nn.init.zeros_(block.attn.c_proj.weight)
            torch.nn.init.uniform_(block.mlp.c_fc.weight, -s * 0.4, s * 0.4)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)

        # Early layers keep more of the residual (1.15 -> 1.05) and blend in more of the
        # embedding (0.20 -> 0.05) than late ones.
        n_layer = self.config.n_layer
        denom = max(n_layer - 1, 1)
        for i in range(n_layer):
            self.resid_lambdas.data[i] = 1.15 - (0.10 * i / denom)
        for i in range(n_layer):
            self.x0_lambdas.data[i] = 0.20 - (0.15 * i / denom)

        torch.nn.init.zeros_(self.smear_lambda)  # smear starts switched off
        torch.nn.init.constant_(self.backout_lambda, 0.2)
        torch.nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)

        for ve in self.value_embeds.values():
            torch.nn.init.uniform_(ve.weight, -s, s)

        # small positive gate weights: the value-embedding gates start just above 1.5
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:
                torch.nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)

        head_dim = self.config.n_embd // self.config.n_head
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len, head_dim)
        self.cos, self.sin = cos, sin

        # The embedding tables are stored in the compute dtype to save memory (the optimizer
        # copes fine). Not for fp16 though: GradScaler cannot unscale fp16 gradients.
        if COMPUTE_DTYPE != torch.float16:
            self.transformer.wte.to(dtype=COMPUTE_DTYPE)
            for ve in self.value_embeds.values():
                ve.to(dtype=COMPUTE_DTYPE)

    def _precompute_rotary_embeddings(self, seq_len, head_dim, base=100000, device=None):
        """cos/sin tables of shape (1, seq_len, 1, head_dim/2) in COMPUTE_DTYPE."""
        if device is None:
            device = self.transformer.wte.weight.device  # meta in __init__, real in init_weights
        channel_range = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (base ** (channel_range / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)  # (seq_len, head_dim/2)
        cos, sin = freqs.cos(), freqs.sin()
        cos, sin = cos.to(COMPUTE_DTYPE), sin.to(COMPUTE_DTYPE)
        # leading batch dim and a head dim in the middle, to broadcast against (B, T, H, D/2)
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
        return cos, sin

    def _compute_window_sizes(self, config):
        """
        One (left, right) window per layer, in FA3's convention: a query sees itself and
        `left` earlier tokens; right is 0 (causal). The pattern string is tiled over the
        layers and the final layer is forced to L.
          L -> sequence_len
          S -> sequence_len/4 rounded up to a multiple of 128 (FA3's tile size), so never
               below 128: 2048 -> 512, 160 -> 128
        """
        pattern = config.window_pattern.upper()
        if not pattern or any(c not in "SL" for c in pattern):
            raise ValueError(f"Invalid window_pattern: {config.window_pattern!r}. Use only S and L.")
        long_window = config.sequence_len
        short_window = -(-long_window // 4 // 128) * 128
        char_to_window = {
            "L": (long_window, 0),
            "S": (short_window, 0),
        }
        window_sizes = []
        for layer_idx in range(config.n_layer):
            char = pattern[layer_idx % len(pattern)]
            window_sizes.append(char_to_window[char])
        window_sizes[-1] = (long_window, 0)
        return window_sizes

    def get_device(self):
        return self.transformer.wte.weight.device

    def estimate_flops(self):
        """
        Training FLOPs per token (forward + backward).
        Every matmul weight costs 2 FLOPs per token forward and 4 backward, hence 6 per
        parameter; embeddings are lookups and cost nothing. Attention's QK^T and AV add
        12 * n_head * head_dim * (tokens attended) per layer, where the attended span is
        capped by the layer's window (PaLM-style accounting, arXiv:2204.02311).
        """
        h, q, t = self.config.n_head, self.config.n_embd // self.config.n_head, self.config.sequence_len
        attn_flops = 0
        for window_size in self.window_sizes:
            window = window_size[0]  # left
            effective_seq = t if window < 0 else min(window, t)
            attn_flops += 12 * h * q * effective_seq
        num_flops_per_token = 6 * self.num_matmul_params() + attn_flops
        return num_flops_per_token

    def num_matmul_params(self):
        """
        Parameters that multiply the token stream (2 forward FLOPs each per token).
        Every such weight in this model lives in a linear layer, while embeddings and the
        per-layer scalars do not, so counting linear-layer weights is exact. We count any
        nn.Linear (not only our Linear) so the figure is unchanged after the fp8 module swap.
        """
        matmul_params = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return matmul_params

    def estimate_decode_flops(self, context_len):
        """Forward FLOPs for decoding one token with `context_len` tokens of context:
        2 per matmul parameter plus attention over min(context_len, window) keys per layer."""
        h = self.config.n_head
        q = self.config.n_embd // self.config.n_head
        attn_flops = sum(4 * h * q * min(context_len, window) for window, _ in self.window_sizes)
        decode_flops = 2 * self.num_matmul_params() + attn_flops
        return decode_flops

    def estimate_prefill_flops(self, num_tokens):
        """Forward FLOPs for prefilling `num_tokens` tokens. Causal: token t attends to
        min(t, window) keys, so the attended count ramps up to w and then stays flat."""
        h = self.config.n_head
        q = self.config.n_embd // self.config.n_head
        attn_flops = 0
        for window, _ in self.window_sizes:
            w = min(window, num_tokens)
            attended_tokens = w * (w + 1) // 2 + (num_tokens - w) * w
            attn_flops += 4 * h * q * attended_tokens
        prefill_flops = 2 * self.num_matmul_params() * num_tokens + attn_flops
        return prefill_flops

    def kv_bytes_per_token(self):
        """KV-cache bytes stored per token per batch row, over all layers (cache is in COMPUTE_DTYPE)."""
        head_dim = self.config.n_embd // self.config.n_head
        kv_dtype_bytes = COMPUTE_DTYPE.itemsize
        return self.config.n_layer * 2 * self.config.n_kv_head * head_dim * kv_dtype_bytes

    def kv_read_bytes(self, context_len):
        """KV-cache bytes one decode step reads per batch row at `context_len`; windowed
        layers read only their last `window` tokens."""
        head_dim = self.config.n_embd // self.config.n_head
        kv_dtype_bytes = COMPUTE_DTYPE.itemsize
        total = 0
        for window, _ in self.window_sizes:
            total += 2 * self.config.n_kv_head * head_dim * kv_dtype_bytes * min(context_len, window)
        return total

    def num_scaling_params(self):
        """
        Parameter counts broken down by kind, for scaling-law fits. Papers disagree on
        what to count (Kaplan et al. drop embeddings, Chinchilla keeps everything), so we
        report the pieces and let the analysis choose. Groups mirror setup_optimizer().
        """
        wte = sum(p.numel() for p in self.transformer.wte.parameters())
        value_embeds = sum(p.numel() for p in self.value_embeds.parameters())
        lm_head = sum(p.numel() for p in self.lm_head.parameters())
        transformer_matrices = sum(p.numel() for p in self.transformer.h.parameters())
        scalars = sum(p.numel() for p in (self.resid_lambdas, self.x0_lambdas, self.smear_gate.weight,
                                          self.smear_lambda, self.backout_lambda))
        total = wte + value_embeds + lm_head + transformer_matrices + scalars
        assert total == sum(p.numel() for p in self.parameters()), "a parameter is missing from num_scaling_params"
        return {
            'wte': wte,
            'value_embeds': value_embeds,
            'lm_head': lm_head,
            'transformer_matrices': transformer_matrices,
            'scalars': scalars,
            'total': total,
        }

    def setup_optimizer(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0, scalar_lr=0.5):
        """MuonAdamW with Muon for the transformer matrices and AdamW for everything else."""
        model_dim = self.config.n_embd

        matrix_params = list(self.transformer.h.parameters())
        value_embeds_params = list(self.value_embeds.parameters())
        embedding_params = list(self.transformer.wte.parameters())
        lm_head_params = list(self.lm_head.parameters())
        resid_params = [self.resid_lambdas]
        x0_params = [self.x0_lambdas]
        smear_params = [self.smear_gate.weight, self.smear_lambda, self.backout_lambda]
        n_grouped = (len(matrix_params) + len(embedding_params) + len(lm_head_params) + len(value_embeds_params)
                     + len(resid_params) + len(x0_params) + len(smear_params))
        assert len(list(self.parameters())) == n_grouped, "every parameter must be in exactly one optimizer group"

        # The AdamW learning rates were tuned at d_model=768; scale them as 1/sqrt(d_model)
        dmodel_lr_scale = (model_dim / 768) ** -0.5
        print0(f"Scaling the LR for the AdamW parameters ∝1/√({model_dim}/768) = {dmodel_lr_scale:.6f}")

        param_groups = [
            dict(kind='adamw', params=lm_head_params, lr=unembedding_lr * dmodel_lr_scale, betas=(0.8, 0.96), eps=1e-10, weight_decay=0.01),
            dict(kind='adamw', params=embedding_params, lr=embedding_lr * dmodel_lr_scale, betas=(0.8, 0.995), eps=1e-10, weight_decay=0.001),
            dict(kind='adamw', params=value_embeds_params, lr=embedding_lr * dmodel_lr_scale * 0.5, betas=(0.8, 0.995), eps=1e-10, weight_decay=0.01),
            dict(kind='adamw', params=resid_params, lr=scalar_lr * 0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.05),
            # x0 blending gets a slower-moving first moment
            dict(kind='adamw', params=x0_params, lr=scalar_lr, betas=(0.96, 0.95), eps=1e-10, weight_decay=0.0),
            dict(kind='adamw', params=smear_params, lr=0.2, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0),
        ]
        # Muon works on stacks of same-shaped matrices, so one group per distinct shape
        for shape in sorted({p.shape for p in matrix_params}):
            group_params = [p for p in matrix_params if p.shape == shape]
            param_groups.append(dict(
                kind='muon', params=group_params, lr=matrix_lr,
                momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=weight_decay,
            ))

        optimizer = MuonAdamW(param_groups)
        # schedulers multiply initial_lr, so remember where every group started
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        return optimizer

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction='mean'):
        """
        idx (B, T) token ids -> logits (B, T, vocab_size) float32, or the cross-entropy
        loss when targets are given (targets == -1 are ignored). With a kv_cache the
        tokens are taken to continue the cached sequence at kv_cache.get_pos().
        """
        B, T = idx.size()

        T0 = 0 if kv_cache is None else kv_cache.get_pos()
        if T0 + T > self.cos.size(1):
            raise ValueError(f"Sequence length grew beyond the rotary embeddings cache: "
                             f"{T0 + T} > {self.cos.size(1)} (10x sequence_len={self.config.sequence_len})")
        if idx.device != self.cos.device:
            raise ValueError(f"Rotary embeddings and idx are on different devices: {idx.device} != {self.cos.device}; "
                             f"move idx to model.get_device()")
        assert self.cos.dtype == COMPUTE_DTYPE, f"Rotary embeddings must be in {COMPUTE_DTYPE}, got {self.cos.dtype}"
        cos_sin = self.cos[:, T0:T0 + T], self.sin[:, T0:T0 + T]

        x = self.transformer.wte(idx)
        x = x.to(COMPUTE_DTYPE)  # a no-op unless the table was kept in fp32 (the fp16 case)
        x = norm(x)

        # Smear: x[t] += smear_lambda * sigmoid(gate(x[t][:24])) * x[t-1]
        if kv_cache is None:
            if T < 2:
                raise ValueError("forward without a kv_cache needs at least 2 tokens (T > 1)")
            gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[:, 1:, :24]))
            x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        else:
            # the cache carries the last embedding across calls so decode can smear too
            x_pre_smear = kv_cache.prev_embedding
            kv_cache.prev_embedding = x[:, -1:, :]
            if T > 1:
                # prefill: same as training within the chunk
                gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[:, 1:, :24]))
                x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
                if x_pre_smear is not None:  # hook: a chunk continuing a non-empty cache (MegaContext's runtime) smears its first slot
                    x = torch.cat([x[:, :1] + self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[:, :1, :24])) * x_pre_smear, x[:, 1:]], dim=1)  # hook: as decode does
            elif x_pre_smear is not None:
                # single-token decode: the previous token comes from the cache
                gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[:, :, :24]))
                x = x + gate * x_pre_smear

        x0 = x
        n_layer = self.config.n_layer
        backout_layer = n_layer // 2
        x_backout = None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.window_sizes[i], kv_cache)
            if i == backout_layer:
                x_backout = x
        if x_backout is not None:
            x = x - self.backout_lambda.to(x.dtype) * x_backout
        x = norm(x)

        softcap = 15  # logits are squashed smoothly into (-15, 15)
        logits = self.lm_head(x)  # (B, T, padded_vocab): the biggest activation in the model
        logits = logits[..., :self.config.vocab_size]
        logits = logits.float()  # softcap and loss in fp32
        logits = softcap * torch.tanh(logits / softcap)

        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1, reduction=loss_reduction)
            return loss
        else:
            return logits

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """
        The simplest possible sampler: one sequence (a list of ints), no KV cache, the whole
        context re-run every step. Yields each new token as a Python int. For real serving
        use nanochat.engine.Engine.
        """
        if not isinstance(tokens, list):
            raise TypeError(f"generate expects the prompt as a list of ints, got {type(tokens).__name__}")
        device = self.get_device()
        rng = None
        if temperature > 0:
            rng = torch.Generator(device=device)
            rng.manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids)  # (1, T, vocab_size)
            logits = logits[:, -1, :]  # (1, vocab_size)
            if top_k is not None and top_k > 0:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float('Inf')
            if temperature > 0:
                logits = logits / temperature
                probs = F.softmax(logits, dim=-1)
                next_ids = torch.multinomial(probs, num_samples=1, generator=rng)
            else:
                next_ids = torch.argmax(logits, dim=-1, keepdim=True)
            ids = torch.cat((ids, next_ids), dim=1)
            token = next_ids.item()
            yield token
