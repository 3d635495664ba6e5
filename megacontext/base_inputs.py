"""
How the nanochat GPT reads a Working Context, without a single edit of nanochat/gpt.py.

A Working Context (WC) is a sequence of entries: tokens (LOD0) and gists (LOD1/LOD2 vectors).
GPT.forward only takes token ids, so we swap two kinds of its modules, the way nanochat's fp8
conversion swaps its Linears: `transformer.wte` and every `value_embeds[k]` become small
nn.Embedding subclasses that share the original weight Parameter (same object, so the
state_dict keys, the optimizer groups and strict checkpoint loading are all unchanged) and
consult a "gist override" that is set only inside the `gist_inputs` context manager:

    attach(model)                                   # once, before torch.compile
    with gist_inputs(model, gist_mask, gist_vectors):
        loss = model(idx, targets)                  # gists at masked slots, tokens elsewhere

Rules at a gist slot (gist_mask True; idx there may hold any valid id, e.g. BOS):
- wte output := the gist vector. GPT.forward then casts it to COMPUTE_DTYPE and applies its
  parameter-free norm, exactly as for a token: a gist is a *pre-norm* embedding and only its
  direction reaches the network. GistNet's inputs are the normed token embeddings and its
  attention head ends in the same norm, so for its gists this norm is a no-op up to rounding;
  for the mean-pool baselines it is what puts them on the tokens' scale.
- value embeddings := zeros. They are a lookup by token id and a gist has no id; zero is the
  neutral value (the layer's value residual is simply not added).
- the smear mixes each slot with the previous one as usual: gists take part in it like
  tokens. The smear is part of how the model reads any sequence and the gate is computed
  from the slot's own embedding, so no rule is needed; GistNet learns with it in place.
- positions: each WC entry occupies one sequence position (rotary index = slot index). A WC
  then looks like an ordinary sequence of at most W positions, inside the range the model
  was trained on however long the history is, with no holes it has never seen; and
  GPT.forward has no position-id argument, so any other scheme would need an edit of gpt.py.

With the override inactive (or an all-False mask) the wrappers return exactly the original
lookups, so the logits are bit-identical to the plain token path (tested).

This module owns the swap and the override. It never computes gists (gistnet.py) and never
decides which slots are gists (working_context.py).
"""

from contextlib import contextmanager

import torch
import torch.nn as nn


class GistOverride:
    """The override shared by all wrappers of one model: None/None when inactive, else
    mask (B, T) bool and vectors (B, T, D)."""

    def __init__(self):
        self.mask = None
        self.vectors = None

    def check(self, idx):
        if self.mask.shape != idx.shape:
            raise ValueError(f"gist_inputs was given a mask of shape {tuple(self.mask.shape)} but the model "
                             f"was called with idx of shape {tuple(idx.shape)}; pass a mask matching idx")


class _GistAwareEmbedding(nn.Embedding):
    """An nn.Embedding that shares an existing table and knows its gist override.

    The module it replaced is kept at `.original` but not registered as a submodule,
    so the model's state_dict and parameters are exactly what they were."""

    @classmethod
    def wrap(cls, original, override):
        with torch.device("meta"):  # a throwaway table; replaced by the shared one below
            new = cls(original.num_embeddings, original.embedding_dim, padding_idx=original.padding_idx,
                      max_norm=original.max_norm, norm_type=original.norm_type,
                      scale_grad_by_freq=original.scale_grad_by_freq, sparse=original.sparse)
        new.weight = original.weight  # the very same Parameter object
        new.train(original.training)
        new.gist_override = override
        object.__setattr__(new, "original", original)  # reachable, but not a registered child
        return new

    def unwrap(self):
        original = self.original
        original.weight = self.weight  # in case the Parameter was replaced while attached
        original.train(self.training)
        return original


class GistTokenEmbedding(_GistAwareEmbedding):
    """Stands in for transformer.wte: the gist vector replaces the token embedding at gist slots."""

    def forward(self, idx):
        out = super().forward(idx)
        override = self.gist_override
        if override.mask is None:
            return out
        override.check(idx)
        return torch.where(override.mask.unsqueeze(-1), override.vectors.to(out.dtype), out)


class GistValueEmbedding(_GistAwareEmbedding):
    """Stands in for value_embeds[k]: zero at gist slots (a gist has no token id to look up)."""

    def forward(self, idx):
        out = super().forward(idx)
        override = self.gist_override
        if override.mask is None:
            return out
        override.check(idx)
        return out.masked_fill(override.mask.unsqueeze(-1), 0.0)


def _unwrap_compiled(model):
    return getattr(model, "_orig_mod", model)


def is_attached(model):
    return isinstance(_unwrap_compiled(model).transformer.wte, GistTokenEmbedding)


def attach(model):
    """Swap in the gist-aware embeddings (idempotent). Returns the model.

    Do it before torch.compile, like nanochat's fp8 conversion. Parameters, their order and
    the state_dict keys do not change; forward hooks registered on the old embedding modules
    do not carry over."""
    base = _unwrap_compiled(model)
    if is_attached(base):
        return model
    override = GistOverride()
    # ModuleDict assignment to an existing key keeps its place, so named_parameters() order holds
    base.transformer["wte"] = GistTokenEmbedding.wrap(base.transformer.wte, override)
    for key in list(base.value_embeds.keys()):
        base.value_embeds[key] = GistValueEmbedding.wrap(base.value_embeds[key], override)
    return model


def detach(model):
    """Put the original embedding modules back (idempotent). Returns the model."""
    base = _unwrap_compiled(model)
    if not is_attached(base):
        return model
    if base.transformer.wte.gist_override.mask is not None:
        raise RuntimeError("cannot detach a model while gist_inputs is active on it; leave the with-block first")
    base.transformer["wte"] = base.transformer.wte.unwrap()
    for key in list(base.value_embeds.keys()):
        base.value_embeds[key] = base.value_embeds[key].unwrap()
    return model


@contextmanager
def gist_inputs(model, gist_mask, gist_vectors):
    """Within the block, model(idx, ...) reads gist_vectors[b, t] instead of token idx[b, t]
    wherever gist_mask[b, t] is True. gist_mask (B, T) bool, gist_vectors (B, T, n_embd)
    (rows where the mask is False are ignored). Gradients flow into gist_vectors.

    Attaches the model first if needed (a plain model only: a torch.compile'd one must be
    attached before compiling). Not re-entrant."""
    base = _unwrap_compiled(model)
    if not is_attached(base):
        if base is not model:
            raise RuntimeError("this torch.compile'd model has no gist-aware embeddings; call "
                               "megacontext.base_inputs.attach(model) before torch.compile")
        attach(base)
    if not isinstance(gist_mask, torch.Tensor) or gist_mask.dtype != torch.bool or gist_mask.ndim != 2:
        raise ValueError(f"gist_mask must be a (B, T) bool tensor, got "
                         f"{getattr(gist_mask, 'dtype', type(gist_mask).__name__)} of shape "
                         f"{tuple(getattr(gist_mask, 'shape', ()))}")
    n_embd = base.config.n_embd
    if (not isinstance(gist_vectors, torch.Tensor) or not gist_vectors.is_floating_point()
            or tuple(gist_vectors.shape) != (*gist_mask.shape, n_embd)):
        raise ValueError(f"gist_vectors must be a float tensor of shape {(*gist_mask.shape, n_embd)} "
                         f"(the mask's shape plus the model's n_embd), got "
                         f"{getattr(gist_vectors, 'dtype', type(gist_vectors).__name__)} of shape "
                         f"{tuple(getattr(gist_vectors, 'shape', ()))}")
    device = base.get_device()
    if gist_mask.device != device or gist_vectors.device != device:
        raise ValueError(f"gist_mask ({gist_mask.device}) and gist_vectors ({gist_vectors.device}) must be on "
                         f"the model's device {device}")
    override = base.transformer.wte.gist_override
    if override.mask is not None:
        raise RuntimeError("gist_inputs is already active on this model; nesting is not supported")
    override.mask, override.vectors = gist_mask, gist_vectors
    try:
        yield model
    finally:
        override.mask, override.vectors = None, None
