"""
LoRA on the nanochat GPT: low-rank adapters on the input embedding and chosen projections,
attached by module swap, without a single edit of nanochat/gpt.py.

    lora = attach_lora(model, rank=8, targets=("wte", "c_q", "c_v"))   # before torch.compile
    optimizer_groups.append(dict(kind="adamw", params=list(lora.parameters()), ...))
    with lora.disabled():                                             # exactly the base model
        base_logits = model(idx)
    torch.save({"lora": lora.state_dict()}, "mc_000100.pt")           # the caller's own file
    lora.load_state_dict(torch.load("mc_000100.pt")["lora"])         # refuses another config
    detach_lora(model)                                                # the original modules again

How it is attached. Each target module is replaced by a copy of itself whose class is a
subclass made on the fly: the copy shares the very same Parameter objects (so the GPT's
state_dict keys and values, named_parameters() and its optimizer groups do not change, and
upstream checkpoints still load strictly), and it reaches its adapter through an attribute set
with object.__setattr__, so the adapter's A and B are *not* parameters of the GPT. They live
in the LoRA container, an nn.Module whose state_dict keys are the target's module path plus
`lora_A` / `lora_B` (e.g. `transformer.h.0.attn.c_q.lora_A`) and one `_extra_state` entry
holding the LoRAConfig, so a state saved under one config is refused by another.

- Linear targets (attn.c_q/c_k/c_v/c_proj, mlp.c_fc/c_proj): out = base(x) + s * B(A(x)),
  s = alpha / rank. The subclass sits *above* the target's own class and calls its forward,
  so it works on nanochat's Linear and on fp8's Float8Linear alike. Like nanochat's Linear,
  the fp32 A and B are cast to x's dtype at call time (bf16 on GPU, fp32 on CPU).
- The embedding (transformer.wte): out = table[idx] + s * B(A[:, idx]), in the table's dtype.
  Here the subclass sits *below* base_inputs' GistTokenEmbedding (between it and
  nn.Embedding), because GistTokenEmbedding gets its token lookup from super().forward and
  then puts the gist vectors in: the delta joins the token lookup and a gist slot still reads
  exactly its gist vector. The wrapper is still a GistTokenEmbedding, so
  base_inputs.is_attached stays True. If the model has no gist-aware embeddings yet,
  attach_lora attaches base_inputs first (bit-identical while no gist_inputs block is active),
  because gist_inputs would otherwise attach them later on top of the LoRA wrapper and
  silently drop the delta; so either order works, and detach_lora undoes exactly what
  attach_lora did. base_inputs.detach(model) is refused while LoRA sits on wte.
- Value embeddings, ve_gate, smear_gate and lm_head get no LoRA.
- A starts random (so A(x) has about unit variance per rank component for a unit-RMS input:
  uniform with std 1/sqrt(in_features) for a Linear, normal std 1 for the one-hot embedding
  input), B starts at zero, so a freshly attached LoRA gives exactly the base logits. With
  `lora.enabled = False` (or inside `with lora.disabled():`) the wrappers return the base
  module's output untouched: bit-identical logits, tested.
- Dropout (default 0) applies to a Linear adapter's input in training mode, as in peft; the
  embedding adapter has none (its input is a token id).

Order with other swaps: fp8 conversion (nanochat/fp8.py) swaps every nn.Linear it finds, ours
included, so convert to fp8 first and attach LoRA after; torch.compile last. The adapters are
not the model's parameters, so model.to() does not move them: attach on the model's device
(A and B are made there) or move the LoRA with lora.to(). `lora.check_attached(model)` says
whether every wrapper is still in place.

This module owns the adapters, their swap and their state dict. It never changes the GPT's
parameters or state_dict, never freezes or unfreezes the base (the training variant does),
never builds optimizers and never writes files.
"""

import copy
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from megacontext import base_inputs

# canonical target name -> its path under each block ("wte" is the one path outside the blocks)
TARGETS = ("wte", "attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
_ALIASES = {"transformer.wte": "wte", "c_q": "attn.c_q", "c_k": "attn.c_k", "c_v": "attn.c_v", "c_fc": "mlp.c_fc"}


def resolve_targets(targets):
    """Short or full names -> the canonical names, deduplicated, in TARGETS order."""
    if isinstance(targets, str):
        targets = (targets,)
    valid = ", ".join(TARGETS + tuple(_ALIASES))
    chosen = set()
    for name in targets:
        if name == "c_proj":
            raise ValueError("LoRA target 'c_proj' is ambiguous: name 'attn.c_proj' or 'mlp.c_proj'")
        canonical = _ALIASES.get(name, name)
        if canonical not in TARGETS:
            raise ValueError(f"unknown LoRA target {name!r}; valid targets: {valid}")
        chosen.add(canonical)
    if not chosen:
        raise ValueError(f"LoRA needs at least one target; valid targets: {valid}")
    return tuple(t for t in TARGETS if t in chosen)


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 8.0  # scale = alpha / rank; attach_lora's alpha=None means alpha = rank (scale 1)
    targets: tuple = ("wte", "attn.c_q", "attn.c_v")
    seed: int = 0
    dropout: float = 0.0

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive int, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be a positive number (or None for alpha = rank), got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"LoRA seed must be an int, got {self.seed!r}")
        # frozen dataclass: normalise through object.__setattr__ so equal configs compare equal
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "targets", resolve_targets(self.targets))

    @property
    def scale(self):
        return self.alpha / self.rank

    def to_dict(self):
        return {**asdict(self), "targets": list(self.targets)}  # plain types: loads with weights_only=True

    @classmethod
    def from_state_dict(cls, state_dict):
        """The config a LoRA state dict was saved with, e.g. to attach_lora(model, **asdict(config))."""
        if "_extra_state" not in state_dict:
            raise ValueError("not a LoRA state dict (no '_extra_state' entry with its LoRAConfig); "
                             "pass what LoRA.state_dict() returned")
        return cls(**state_dict["_extra_state"])


# -----------------------------------------------------------------------------
# Adapters: the trainable part, held by the LoRA container

class LinearAdapter(nn.Module):
    """delta(x) = scale * B(A(dropout(x))), A: (rank, in_features), B: (out_features, rank)."""

    def __init__(self, in_features, out_features, config, generator, device):
        super().__init__()
        bound = 3**0.5 * in_features**-0.5  # uniform with std 1/sqrt(in): nanochat's c_q rule
        A = torch.empty(config.rank, in_features).uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(A.to(device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.rank, device=device))
        self.scale, self.dropout, self.enabled = config.scale, config.dropout, True

    def forward(self, x, training):
        if self.dropout > 0:
            x = F.dropout(x, self.dropout, training=training)
        # the fp32 masters are cast to the activation dtype, as nanochat's Linear does
        delta = F.linear(F.linear(x, self.lora_A.to(dtype=x.dtype)), self.lora_B.to(dtype=x.dtype))
        return delta * self.scale


class EmbeddingAdapter(nn.Module):
    """delta(idx) = scale * B(A[:, idx]), A: (rank, num_embeddings), B: (embedding_dim, rank):
    the Linear rule for a one-hot input, computed in the table's output dtype."""

    def __init__(self, num_embeddings, embedding_dim, config, generator, device):
        super().__init__()
        A = torch.empty(config.rank, num_embeddings).normal_(0.0, 1.0, generator=generator)
        self.lora_A = nn.Parameter(A.to(device))
        self.lora_B = nn.Parameter(torch.zeros(embedding_dim, config.rank, device=device))
        self.scale, self.enabled = config.scale, True

    def forward(self, idx, dtype):
        code = F.embedding(idx, self.lora_A.to(dtype=dtype).t())  # (..., rank)
        return F.linear(code, self.lora_B.to(dtype=dtype)) * self.scale


# -----------------------------------------------------------------------------
# Wrappers: what stands in the GPT at each target (same Parameters, one unregistered adapter)

class LoRALinear(nn.Linear):
    """Placed above the target's class in the MRO: base output first, then the delta."""

    def forward(self, x):
        out = super().forward(x)
        adapter = self.lora_adapter
        if not adapter.enabled:
            return out
        return out + adapter(x, self.training)


class LoRAEmbedding(nn.Embedding):
    """Placed right above nn.Embedding in the MRO: the delta joins the token lookup itself,
    under whatever the target's class does with it (GistTokenEmbedding's gist slots)."""

    def forward(self, idx):
        out = super().forward(idx)
        adapter = self.lora_adapter
        if not adapter.enabled:
            return out
        return out + adapter(idx, out.dtype)


def _refuse_unwrap(self):
    raise RuntimeError("transformer.wte carries LoRA; call megacontext.lora.detach_lora(model) "
                       "before megacontext.base_inputs.detach(model)")


_wrapper_classes = {}  # (target class, LoRA class) -> the subclass; one per pair keeps torch.compile's guards stable


def _wrapper_class(cls, lora_cls):
    key = (cls, lora_cls)
    if key not in _wrapper_classes:
        name = f"LoRA{cls.__name__}"
        if lora_cls is LoRALinear:
            _wrapper_classes[key] = type(name, (LoRALinear, cls), {})
        elif cls is nn.Embedding:
            _wrapper_classes[key] = LoRAEmbedding
        else:
            # (cls, LoRAEmbedding) puts LoRAEmbedding between cls's own classes and nn.Embedding;
            # cls must get its lookup through super().forward, as GistTokenEmbedding does
            namespace = {"unwrap": _refuse_unwrap} if hasattr(cls, "unwrap") else {}
            _wrapper_classes[key] = type(name, (cls, LoRAEmbedding), namespace)
    return _wrapper_classes[key]


def _swapped_copy(module, cls):
    """A shallow copy of `module` as an instance of cls: same Parameters, buffers, children and
    attributes (e.g. GistTokenEmbedding's gist_override), with registries of its own so later
    assignments on one do not leak into the other."""
    new = cls.__new__(cls)
    new.__dict__.update({k: copy.copy(v) if isinstance(v, dict) else v for k, v in module.__dict__.items()})
    return new


def _unwrap_compiled(model):
    return getattr(model, "_orig_mod", model)


def _target_paths(model, targets):
    paths = ["transformer.wte"] if "wte" in targets else []
    for i in range(len(model.transformer.h)):
        paths += [f"transformer.h.{i}.{t}" for t in targets if t != "wte"]
    return paths


def _is_wrapper(module):
    return isinstance(module, (LoRALinear, LoRAEmbedding))


# -----------------------------------------------------------------------------
# The container

class LoRA(nn.Module):
    """All adapter parameters of one model, under keys `<module path>.lora_A|lora_B`, plus
    the config as `_extra_state`. Made by attach_lora; save it with state_dict()."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.adapters = {}  # module path -> adapter (also registered below, nested by path)
        self.wrappers = {}  # module path -> the wrapper standing in the GPT
        self._enabled = True

    def add_adapter(self, path, adapter):
        *parents, leaf = path.split(".")
        node = self
        for name in parents:  # nested ModuleDicts give state_dict keys equal to the GPT's paths
            if name not in node._modules:
                node.add_module(name, nn.ModuleDict())
            node = node._modules[name]
        node.add_module(leaf, adapter)
        self.adapters[path] = adapter

    @property
    def enabled(self):
        return self._enabled

    @enabled.setter
    def enabled(self, value):
        self._enabled = bool(value)
        for adapter in self.adapters.values():
            adapter.enabled = self._enabled

    @contextmanager
    def disabled(self):
        """Within the block the model is exactly the base model (bit-identical logits)."""
        before = self.enabled
        self.enabled = False
        try:
            yield self
        finally:
            self.enabled = before

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def check_attached(self, model):
        """Raise unless every wrapper is still where attach_lora put it (fp8 conversion after
        attach_lora, for one, replaces them and would silently drop the adapters)."""
        base = _unwrap_compiled(model)
        for path, wrapper in self.wrappers.items():
            if base.get_submodule(path) is not wrapper:
                raise RuntimeError(f"the LoRA wrapper at {path} was replaced (e.g. by an fp8 conversion after "
                                   f"attach_lora); attach LoRA after every other module swap")

    def get_extra_state(self):
        return self.config.to_dict()

    def set_extra_state(self, state):
        saved = LoRAConfig(**state)
        if saved != self.config:
            raise ValueError(f"LoRA state was saved with {saved} but this LoRA has {self.config}; "
                             f"attach it with the saved config (LoRAConfig.from_state_dict) or start fresh")

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Strict by default; a state saved under another LoRAConfig is refused, naming both."""
        self.set_extra_state(LoRAConfig.from_state_dict(state_dict).to_dict())  # before any tensor is copied
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def extra_repr(self):
        return f"{self.config}, enabled={self.enabled}, params={self.num_params():,}"


def attach_lora(model, rank=8, alpha=None, targets=("wte", "c_q", "c_v"), seed=0, dropout=0.0):
    """Swap LoRA wrappers in at every target of every block (and wte) and return the LoRA.

    Do it after any fp8 conversion and before torch.compile. alpha=None means alpha = rank
    (scale 1). The adapters are made on the device of the weights they adapt, in fp32, from a
    CPU generator seeded with `seed` (same seed, same initial A on every device)."""
    config = LoRAConfig(rank=rank, alpha=float(rank) if alpha is None else alpha, targets=targets,
                        seed=seed, dropout=dropout)
    base = _unwrap_compiled(model)
    if any(_is_wrapper(m) for m in base.modules()):
        raise RuntimeError("this model already carries LoRA adapters; call detach_lora(model) first")
    attached_base_inputs = False
    if "wte" in config.targets and not base_inputs.is_attached(base):
        base_inputs.attach(base)  # see the module docstring: gist_inputs would otherwise bury the LoRA wrapper
        attached_base_inputs = True

    lora = LoRA(config)
    generator = torch.Generator().manual_seed(seed)
    for path in _target_paths(base, config.targets):
        parent_path, name = path.rsplit(".", 1)
        parent, target = base.get_submodule(parent_path), base.get_submodule(path)
        device = target.weight.device
        if isinstance(target, nn.Embedding):
            adapter = EmbeddingAdapter(target.num_embeddings, target.embedding_dim, config, generator, device)
            wrapper = _swapped_copy(target, _wrapper_class(type(target), LoRAEmbedding))
            object.__setattr__(wrapper, "lora_owns_base_inputs", attached_base_inputs)
        elif isinstance(target, nn.Linear):
            adapter = LinearAdapter(target.in_features, target.out_features, config, generator, device)
            wrapper = _swapped_copy(target, _wrapper_class(type(target), LoRALinear))
        else:
            raise TypeError(f"cannot put LoRA on {path}: it is a {type(target).__name__}, not a Linear or Embedding")
        # reachable but not registered: neither the target nor the adapter enters the GPT's parameters
        object.__setattr__(wrapper, "lora_original", target)
        object.__setattr__(wrapper, "lora_adapter", adapter)
        setattr(parent, name, wrapper)  # an existing key keeps its place, so parameter order holds
        lora.add_adapter(path, adapter)
        lora.wrappers[path] = wrapper
    return lora


def detach_lora(model):
    """Put the original modules back (idempotent) and undo base_inputs.attach if attach_lora
    did it. The LoRA container keeps its weights (save them first if you need them). Returns
    the model."""
    base = _unwrap_compiled(model)
    wrapped = [(path, m) for path, m in base.named_modules() if _is_wrapper(m)]
    owns_base_inputs = any(getattr(m, "lora_owns_base_inputs", False) for _, m in wrapped)
    if owns_base_inputs and base.transformer.wte.gist_override.mask is not None:
        raise RuntimeError("cannot detach LoRA while gist_inputs is active on the model; leave the with-block first")
    for path, wrapper in wrapped:
        original = wrapper.lora_original
        # the wrapper's registries are its own copies: hand back any Parameter replaced meanwhile
        original._parameters.update(wrapper._parameters)
        original._buffers.update(wrapper._buffers)
        original.train(wrapper.training)
        parent_path, name = path.rsplit(".", 1)
        setattr(base.get_submodule(parent_path), name, original)
    if owns_base_inputs:
        base_inputs.detach(base)
    return model
