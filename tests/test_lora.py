"""Specification of megacontext/lora.py: attaching LoRA leaves the GPT's state_dict, parameters
and optimizer groups exactly as they were (upstream checkpoints load strictly), a fresh or
disabled LoRA gives bit-identical base logits, detach restores the original modules, only the
adapters move when the base is frozen, the delta is what the docstring says (Linear and
embedding, in the input's dtype), gist slots of base_inputs stay exactly the gist vectors in
either attach order, and the config round-trips through the adapters' own state dict."""
import json
from dataclasses import asdict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from megacontext import base_inputs
from megacontext.lora import TARGETS, LoRAConfig, attach_lora, detach_lora, resolve_targets
from nanochat.common import COMPUTE_DTYPE
from nanochat.engine import KVCache
from nanochat.gpt import GPT, GPTConfig, Linear


@pytest.fixture(scope="module")
def fixture_state(upstream_fixtures):
    config = GPTConfig(**json.loads((upstream_fixtures / "manifest.json").read_text())["model_config"])
    state = torch.load(upstream_fixtures / "base_checkpoints" / "d2" / "model_000040.pt", map_location="cpu")
    return config, state


def build(config, state=None):
    with torch.device("meta"):
        m = GPT(config)
    m.to_empty(device="cpu")
    m.init_weights()
    if state is not None:
        m.load_state_dict(state, strict=True)
    return m


@pytest.fixture
def model(fixture_state):
    """The trained fixture model (every component non-trivial: smear, value embeds, attention)."""
    return build(*fixture_state)


def token_batch(B=2, T=48, seed=0):
    return torch.randint(0, 500, (B, T), generator=torch.Generator().manual_seed(seed))


def randomize_B(lora, seed=5, std=0.05):
    """Give every B a non-zero value, as training would: the LoRA then changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_attach_keeps_state_dict_parameters_and_optimizer_groups(model):
    before_state = snapshot(model)
    named = [(n, id(p)) for n, p in model.named_parameters()]
    groups = [[id(p) for p in g["params"]] for g in model.setup_optimizer().param_groups]
    scaling = model.num_scaling_params()
    lora = attach_lora(model, targets=TARGETS)
    after_state = model.state_dict()
    assert list(after_state) == list(before_state)
    assert all(torch.equal(after_state[k], before_state[k]) for k in before_state)
    assert [(n, id(p)) for n, p in model.named_parameters()] == named  # same Parameter objects, same order
    assert [[id(p) for p in g["params"]] for g in model.setup_optimizer().param_groups] == groups
    assert model.num_scaling_params() == scaling
    model_ids = {id(p) for p in model.parameters()}
    assert not any(id(p) in model_ids for p in lora.parameters())
    assert base_inputs.is_attached(model)


def test_adapter_keys_follow_the_module_paths(model):
    lora = attach_lora(model)  # default targets: wte, c_q, c_v
    expected = {"_extra_state"}
    for path in ["transformer.wte"] + [f"transformer.h.{i}.attn.{n}" for i in range(2) for n in ("c_q", "c_v")]:
        expected |= {f"{path}.lora_A", f"{path}.lora_B"}
    assert set(lora.state_dict()) == expected
    D, V, r = model.config.n_embd, model.transformer.wte.num_embeddings, 8
    sd = lora.state_dict()
    assert sd["transformer.wte.lora_A"].shape == (r, V) and sd["transformer.wte.lora_B"].shape == (D, r)
    assert sd["transformer.h.1.attn.c_v.lora_A"].shape == (r, D)
    assert sd["transformer.h.1.attn.c_v.lora_B"].shape == (model.transformer.h[1].attn.c_v.out_features, r)
    assert lora.num_params() == sum(v.numel() for k, v in sd.items() if k != "_extra_state")


def test_upstream_checkpoint_loads_strictly_into_an_attached_model(model, fixture_state):
    config, state = fixture_state
    attach_lora(model, targets=TARGETS)
    model.load_state_dict(state, strict=True)
    fresh = build(config)
    fresh.load_state_dict(model.state_dict(), strict=True)  # and an attached model's save is upstream's
    idx = token_batch()
    assert torch.equal(fresh(idx), build(config, state)(idx))


def test_fresh_and_disabled_lora_give_exactly_the_base_logits(model):
    idx, targets = token_batch(), token_batch(seed=9)
    base_logits, base_loss = model(idx), model(idx, targets)
    lora = attach_lora(model, targets=TARGETS)
    assert torch.equal(model(idx), base_logits)  # B starts at zero
    randomize_B(lora)
    adapted = model(idx)
    assert (adapted - base_logits).abs().max() > 1e-3
    with lora.disabled():
        assert torch.equal(model(idx), base_logits)
        assert torch.equal(model(idx, targets), base_loss)
    assert lora.enabled and torch.equal(model(idx), adapted)
    lora.enabled = False
    assert torch.equal(model(idx), base_logits)
    lora.enabled = True
    assert torch.equal(model(idx), adapted)


def test_detach_restores_the_original_modules(model):
    idx = token_batch()
    base_logits, base_state = model(idx), snapshot(model)
    wte, c_q = model.transformer.wte, model.transformer.h[0].attn.c_q
    lora = attach_lora(model, targets=("wte", "c_q", "mlp.c_fc"))
    randomize_B(lora)
    assert model.transformer.wte is not wte and model.transformer.wte.lora_original.original is wte
    detach_lora(model)
    assert model.transformer.wte is wte and type(wte) is nn.Embedding  # base_inputs, attached by LoRA, undone
    assert model.transformer.h[0].attn.c_q is c_q and type(c_q) is Linear
    assert not base_inputs.is_attached(model)
    assert torch.equal(model(idx), base_logits)
    assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items())
    detach_lora(model)  # idempotent
    assert model.transformer.wte is wte


def test_detach_keeps_base_inputs_that_were_attached_before(model):
    base_inputs.attach(model)
    gist_wte = model.transformer.wte
    attach_lora(model)
    with pytest.raises(RuntimeError, match="detach_lora"):
        base_inputs.detach(model)
    assert base_inputs.is_attached(model)  # the refusal changed nothing
    detach_lora(model)
    assert model.transformer.wte is gist_wte
    base_inputs.detach(model)
    assert type(model.transformer.wte) is nn.Embedding


def test_linear_delta_is_scale_times_B_A_x_in_the_input_dtype(model):
    lora = attach_lora(model, rank=4, alpha=10, targets=("c_k",))
    randomize_B(lora)
    layer = model.transformer.h[1].attn.c_k
    A, B = lora.state_dict()["transformer.h.1.attn.c_k.lora_A"], lora.state_dict()["transformer.h.1.attn.c_k.lora_B"]
    assert lora.config.scale == 2.5
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 7, model.config.n_embd).to(dtype)
        out = layer(x)
        expected = F.linear(x, layer.weight.to(dtype)) + F.linear(F.linear(x, A.to(dtype)), B.to(dtype)) * 2.5
        assert out.dtype == dtype
        assert torch.equal(out, expected)
    assert lora.adapters["transformer.h.1.attn.c_k"].lora_A.dtype == torch.float32  # fp32 masters


def test_embedding_delta_is_scale_times_B_A_onehot_in_the_table_dtype(model):
    lora = attach_lora(model, rank=3, targets=("transformer.wte",))
    randomize_B(lora)
    wte, idx = model.transformer.wte, token_batch()
    A, B = lora.state_dict()["transformer.wte.lora_A"], lora.state_dict()["transformer.wte.lora_B"]
    expected = F.embedding(idx, wte.weight) + A[:, idx].permute(1, 2, 0) @ B.t()
    torch.testing.assert_close(wte(idx), expected, rtol=0, atol=1e-6)
    wte.to(torch.bfloat16)  # the GPU case: the table is kept in bf16 (init_weights' COMPUTE_DTYPE)
    out = wte(idx)
    assert out.dtype == torch.bfloat16
    delta = F.linear(F.embedding(idx, A.to(torch.bfloat16).t()), B.to(torch.bfloat16))
    assert torch.equal(out, F.embedding(idx, wte.weight) + delta)


@pytest.mark.parametrize("order", ["base_inputs_first", "lora_first"])
def test_gist_slots_read_exactly_the_gist_vectors(model, order):
    if order == "base_inputs_first":
        base_inputs.attach(model)
        lora = attach_lora(model)
    else:
        lora = attach_lora(model)
        base_inputs.attach(model)  # a no-op: LoRA's wte wrapper already is a GistTokenEmbedding
    assert base_inputs.is_attached(model)
    assert isinstance(model.transformer.wte, base_inputs.GistTokenEmbedding)
    randomize_B(lora)
    idx = token_batch()
    mask = torch.zeros_like(idx, dtype=torch.bool)
    mask[:, [0, 5, 6, 31]] = True
    vectors = torch.randn(*idx.shape, model.config.n_embd, generator=torch.Generator().manual_seed(1))
    with base_inputs.gist_inputs(model, mask, vectors):
        wte_out = model.transformer.wte(idx)
        adapted = model(idx)
        with lora.disabled():
            wte_base = model.transformer.wte(idx)
            disabled = model(idx)
    assert torch.equal(wte_out[mask], vectors[mask])  # no delta at gist slots
    plain = F.embedding(idx, model.transformer.wte.weight)
    assert torch.equal(wte_base[~mask], plain[~mask])
    assert (wte_out[~mask] - plain[~mask]).abs().amax(dim=-1).gt(0).all()  # the delta at every token slot
    detach_lora(model)
    base_inputs.attach(model)
    with base_inputs.gist_inputs(model, mask, vectors):
        assert torch.equal(disabled, model(idx))  # disabled LoRA under gists = the gisted base model
    assert not torch.equal(adapted, disabled)


def test_only_lora_weights_move_when_training_with_a_frozen_base(model):
    for p in model.parameters():
        p.requires_grad_(False)
    base_state = snapshot(model)
    lora = attach_lora(model, targets=TARGETS)
    lora_before = {k: v.clone() for k, v in lora.state_dict().items() if k != "_extra_state"}
    optimizer = torch.optim.AdamW(lora.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(3):  # B moves on step 1; A's gradient is B-weighted, so it moves from step 2
        loss = model(token_batch(seed=step), token_batch(seed=10 + step))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items())
    lora_after = lora.state_dict()
    changed = [k for k in lora_before if not torch.equal(lora_before[k], lora_after[k])]
    assert sorted(changed) == sorted(lora_before)


def test_targets_resolve_and_bad_names_fail_clearly():
    assert resolve_targets(("c_v", "wte", "attn.c_q", "c_q")) == ("wte", "attn.c_q", "attn.c_v")
    assert resolve_targets("mlp.c_fc") == ("mlp.c_fc",)
    assert resolve_targets(("c_fc", "attn.c_proj", "mlp.c_proj")) == ("attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    with pytest.raises(ValueError, match=r"unknown LoRA target 've_gate'; valid targets: wte, attn.c_q"):
        resolve_targets(("c_q", "ve_gate"))
    with pytest.raises(ValueError, match="ambiguous"):
        resolve_targets(("c_proj",))
    with pytest.raises(ValueError, match="at least one target"):
        resolve_targets(())
    for bad in (dict(rank=0), dict(rank=2.5), dict(alpha=0), dict(dropout=1.0), dict(seed="x")):
        with pytest.raises(ValueError, match="LoRA"):
            LoRAConfig(**bad)


def test_attach_twice_is_refused(model):
    attach_lora(model, targets=("c_q",))
    with pytest.raises(RuntimeError, match="detach_lora"):
        attach_lora(model, targets=("c_k",))


def test_seed_fixes_the_initial_adapters(model):
    first = attach_lora(model, seed=3).state_dict()
    detach_lora(model)
    again = attach_lora(model, seed=3).state_dict()
    detach_lora(model)
    other = attach_lora(model, seed=4).state_dict()
    keys = [k for k in first if k != "_extra_state"]
    assert all(torch.equal(first[k], again[k]) for k in keys)
    assert not torch.equal(first["transformer.wte.lora_A"], other["transformer.wte.lora_A"])
    assert not torch.equal(first["transformer.h.0.attn.c_q.lora_A"], other["transformer.h.0.attn.c_q.lora_A"])


def test_state_dict_round_trips_weights_and_config(model, fixture_state, tmp_path):
    lora = attach_lora(model, rank=4, alpha=2, targets=("wte", "c_k", "mlp.c_proj"), seed=7, dropout=0.1)
    randomize_B(lora)
    idx = token_batch()
    model.eval()
    adapted = model(idx)
    torch.save({"lora": lora.state_dict()}, tmp_path / "mc_000010.pt")

    saved = torch.load(tmp_path / "mc_000010.pt", weights_only=True)["lora"]
    config = LoRAConfig.from_state_dict(saved)
    assert config == lora.config and config.targets == ("wte", "attn.c_k", "mlp.c_proj")
    other_model = build(*fixture_state)
    other_model.eval()
    restored = attach_lora(other_model, **asdict(config))
    assert not torch.equal(other_model(idx), adapted)  # fresh: B is zero
    restored.load_state_dict(saved)
    assert torch.equal(other_model(idx), adapted)

    detach_lora(other_model)
    mismatched = attach_lora(other_model, rank=8, targets=("wte", "c_k", "mlp.c_proj"), seed=7, dropout=0.1)
    with pytest.raises(ValueError, match=r"saved with LoRAConfig\(rank=4.*this LoRA has LoRAConfig\(rank=8"):
        mismatched.load_state_dict(saved)
    with pytest.raises(ValueError, match="not a LoRA state dict"):
        mismatched.load_state_dict({k: v for k, v in saved.items() if k != "_extra_state"})


def test_dropout_acts_in_training_mode_only(model):
    lora = attach_lora(model, targets=("c_q",), dropout=0.5)
    randomize_B(lora, std=0.5)
    idx = token_batch()
    model.train()
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    evaluated = model(idx)
    for adapter in lora.adapters.values():
        adapter.dropout = 0.0
    assert torch.equal(evaluated, model(idx))  # eval = the adapter without dropout


def test_kv_cache_decoding_matches_the_full_forward(model):
    lora = attach_lora(model, targets=TARGETS)
    randomize_B(lora)
    idx = token_batch(B=1, T=40)
    full = model(idx)
    c = model.config
    cache = KVCache(1, c.n_kv_head, 64, c.n_embd // c.n_head, c.n_layer, "cpu", COMPUTE_DTYPE)
    prefill = model(idx[:, :39], kv_cache=cache)
    step = model(idx[:, 39:], kv_cache=cache)
    torch.testing.assert_close(prefill, full[:, :39], rtol=0, atol=1e-5)
    torch.testing.assert_close(step, full[:, 39:], rtol=0, atol=1e-5)


def test_check_attached_notices_a_later_module_swap(model):
    from nanochat.fp8 import convert_to_float8_training
    lora = attach_lora(model, targets=("c_q",))
    lora.check_attached(model)
    convert_to_float8_training(model)  # swaps every nn.Linear, the LoRA wrappers included
    with pytest.raises(RuntimeError, match="transformer.h.0.attn.c_q was replaced"):
        lora.check_attached(model)


def test_fp8_first_then_lora_wraps_the_float8_linear(model):
    from nanochat.fp8 import Float8Linear, convert_to_float8_training
    convert_to_float8_training(model)
    lora = attach_lora(model, targets=("c_q",))
    layer = model.transformer.h[0].attn.c_q
    assert isinstance(layer, Float8Linear) and type(layer).__name__ == "LoRAFloat8Linear"
    lora.check_attached(model)


def test_torch_compile_traces_the_adapters_and_the_switch(model):
    lora = attach_lora(model, targets=TARGETS)
    randomize_B(lora)
    idx = token_batch()
    eager = model(idx)
    with lora.disabled():
        eager_base = model(idx)
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)  # fullgraph: no graph breaks
    assert torch.equal(compiled(idx), eager)
    with lora.disabled():
        assert torch.equal(compiled(idx), eager_base)
    randomize_B(lora, seed=6)  # new adapter values are graph inputs, not baked-in constants
    assert torch.equal(compiled(idx), model(idx))
    assert not torch.equal(compiled(idx), eager)


@pytest.mark.slow
def test_inductor_compiled_lora_matches_eager_and_trains(model):
    lora = attach_lora(model, targets=TARGETS)
    randomize_B(lora)
    idx, targets = token_batch(), token_batch(seed=9)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(idx), model(idx), rtol=0, atol=1e-5)  # fused kernels round differently
    with lora.disabled():
        torch.testing.assert_close(compiled(idx), model(idx), rtol=0, atol=1e-5)
    compiled(idx, targets).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.parameters())
