"""Specification of megacontext/base_inputs.py: the module swap leaves the GPT's parameters,
their order and state_dict keys untouched (strict checkpoint loads still work), an all-LOD0
working context gives bit-identical logits, gists change nothing before the first gist slot,
a gist slot reads exactly the documented rules (gist through the wte slot and its norm, zero
value embeddings, smear as usual, one position per entry: checked against a hand-written
forward), gradients reach the gist vectors, the KV-cache path agrees, detach restores."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from megacontext.base_inputs import (GistTokenEmbedding, GistValueEmbedding, attach, detach, gist_inputs,
                                     is_attached)
from nanochat.common import COMPUTE_DTYPE
from nanochat.engine import KVCache
from nanochat.gpt import GPT, GPTConfig, norm


@pytest.fixture(scope="module")
def fixture_state(upstream_fixtures):
    config = GPTConfig(**json.loads((upstream_fixtures / "manifest.json").read_text())["model_config"])
    state = torch.load(upstream_fixtures / "base_checkpoints" / "d2" / "model_000040.pt", map_location="cpu")
    return config, state


@pytest.fixture
def model(fixture_state):
    """The trained fixture model (every component non-trivial: smear, value embeds, attention)."""
    config, state = fixture_state
    with torch.device("meta"):
        m = GPT(config)
    m.to_empty(device="cpu")
    m.init_weights()
    m.load_state_dict(state, strict=True)
    return m


def token_batch(B=2, T=48, seed=0):
    return torch.randint(0, 500, (B, T), generator=torch.Generator().manual_seed(seed))


def gist_batch(B, T, D, slots, seed=1):
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, slots] = True
    vectors = torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed))
    return mask, vectors


def reference_logits(model, embeddings, idx, gist_mask):
    """GPT.forward (no KV cache) written out from an explicit input-embedding sequence, with the
    value embeddings zeroed at gist slots: the rules base_inputs documents, stated independently."""
    x = norm(embeddings.to(COMPUTE_DTYPE))
    T = x.size(1)
    cos_sin = model.cos[:, :T], model.sin[:, :T]
    gate = model.smear_lambda * torch.sigmoid(model.smear_gate(x[:, 1:, :24]))
    x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
    x0, x_backout = x, None
    for i, block in enumerate(model.transformer.h):
        x = model.resid_lambdas[i] * x + model.x0_lambdas[i] * x0
        ve = None
        if str(i) in model.value_embeds:
            ve = F.embedding(idx, model.value_embeds[str(i)].weight).masked_fill(gist_mask.unsqueeze(-1), 0.0)
        x = block(x, ve, cos_sin, model.window_sizes[i], None)
        if i == model.config.n_layer // 2:
            x_backout = x
    x = norm(x - model.backout_lambda * x_backout)
    logits = model.lm_head(x)[..., :model.config.vocab_size].float()
    return 15 * torch.tanh(logits / 15)


def test_attach_keeps_parameters_order_and_state_dict_keys(model):
    keys = list(model.state_dict().keys())
    named = [(n, id(p)) for n, p in model.named_parameters()]
    attach(model)
    assert is_attached(model)
    assert isinstance(model.transformer.wte, GistTokenEmbedding)
    assert all(isinstance(ve, GistValueEmbedding) for ve in model.value_embeds.values())
    assert list(model.state_dict().keys()) == keys
    assert [(n, id(p)) for n, p in model.named_parameters()] == named  # same Parameter objects, same order


def test_attach_is_idempotent_and_detach_restores_the_original_modules(model):
    wte, ves = model.transformer.wte, dict(model.value_embeds.items())
    attach(model)
    wrapper = model.transformer.wte
    assert wrapper.original is wte and wrapper.weight is wte.weight
    attach(model)
    assert model.transformer.wte is wrapper
    detach(model)
    assert not is_attached(model)
    assert model.transformer.wte is wte and type(wte) is nn.Embedding
    assert all(model.value_embeds[k] is ves[k] for k in ves)
    detach(model)  # idempotent too
    assert model.transformer.wte is wte


def test_all_lod0_context_gives_bit_identical_logits_and_loss(model):
    idx, targets = token_batch(), token_batch(seed=9)
    plain_logits, plain_loss = model(idx), model(idx, targets)
    attach(model)
    assert torch.equal(model(idx), plain_logits)
    mask, vectors = gist_batch(*idx.shape, model.config.n_embd, slots=[])
    with gist_inputs(model, mask, vectors):
        assert torch.equal(model(idx), plain_logits)
        assert torch.equal(model(idx, targets), plain_loss)
    detach(model)
    assert torch.equal(model(idx), plain_logits)


def test_gists_only_change_logits_from_the_first_gist_slot_on(model):
    idx = token_batch()
    plain = model(idx)
    mask, vectors = gist_batch(*idx.shape, model.config.n_embd, slots=[20, 21, 30])
    with gist_inputs(model, mask, vectors):
        gisted = model(idx)
    assert torch.equal(gisted[:, :20], plain[:, :20])  # causality: nothing earlier moves
    changed = (gisted - plain).abs().amax(dim=-1) > 1e-4
    assert changed[:, 20].all() and changed[:, 22].all() and changed[:, -1].all()


def test_token_ids_under_gist_slots_do_not_matter(model):
    idx = token_batch()
    mask, vectors = gist_batch(*idx.shape, model.config.n_embd, slots=[3, 17, 40])
    other = idx.clone()
    other[mask] = 0  # e.g. BOS, or anything else: wte and value embeddings both ignore it
    with gist_inputs(model, mask, vectors):
        assert torch.equal(model(idx), model(other))


def test_gist_slots_follow_the_documented_rules(model):
    idx = token_batch()
    mask, vectors = gist_batch(*idx.shape, model.config.n_embd, slots=[0, 5, 6, 31])
    with gist_inputs(model, mask, vectors):
        wte_out = model.transformer.wte(idx)
        ve_out = model.value_embeds["1"](idx)
        logits = model(idx)
    table = model.transformer.wte.weight
    assert torch.equal(wte_out[mask], vectors[mask])
    assert torch.equal(wte_out[~mask], F.embedding(idx, table)[~mask])
    assert (ve_out[mask] == 0).all()
    assert torch.equal(ve_out[~mask], F.embedding(idx, model.value_embeds["1"].weight)[~mask])
    # the whole forward: the gist enters through wte (then norm + smear like a token), one position each
    embeddings = torch.where(mask.unsqueeze(-1), vectors, F.embedding(idx, table))
    torch.testing.assert_close(logits, reference_logits(model, embeddings, idx, mask), rtol=0, atol=1e-5)


def test_gradients_reach_gist_vectors_at_gist_slots_only(model):
    for p in model.parameters():
        p.requires_grad_(False)
    idx = token_batch()
    mask, vectors = gist_batch(*idx.shape, model.config.n_embd, slots=[10, 11])
    vectors.requires_grad_(True)
    with gist_inputs(model, mask, vectors):
        loss = model(idx, token_batch(seed=4))
    loss.backward()
    per_slot = vectors.grad.abs().sum(dim=-1)
    assert (per_slot[:, [10, 11]] > 0).all()
    assert per_slot[~mask].eq(0).all()


def test_override_is_cleared_on_exit_even_after_an_error(model):
    idx = token_batch()
    plain = model(idx)
    mask, vectors = gist_batch(*idx.shape, model.config.n_embd, slots=[4])
    with pytest.raises(ZeroDivisionError):
        with gist_inputs(model, mask, vectors):
            1 / 0
    assert model.transformer.wte.gist_override.mask is None
    assert torch.equal(model(idx), plain)


def test_strict_checkpoint_loading_still_works_on_an_attached_model(model, fixture_state):
    config, state = fixture_state
    attach(model)
    model.load_state_dict(state, strict=True)  # the original checkpoint, unchanged keys
    with torch.device("meta"):
        fresh = GPT(config)
    fresh.to_empty(device="cpu")
    fresh.init_weights()
    fresh.load_state_dict(model.state_dict(), strict=True)  # and an attached model's save loads plainly
    idx = token_batch()
    assert torch.equal(fresh(idx), model(idx))


def test_optimizer_setup_and_steps_see_the_shared_weights(model):
    attach(model)
    model.setup_optimizer()  # asserts every parameter is in exactly one group
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # MuonAdamW's first step compiles: slow here
    before = model.transformer.wte.weight.detach().clone()
    mask, vectors = gist_batch(2, 48, model.config.n_embd, slots=[7])
    with gist_inputs(model, mask, vectors):
        model(token_batch(), token_batch(seed=3)).backward()
    optimizer.step()
    detach(model)
    assert not torch.equal(model.transformer.wte.weight, before)  # the original module holds the update


def test_kv_cache_prefill_with_gists_then_decode_matches_full_forward(model):
    idx = token_batch(B=1, T=40)
    mask, vectors = gist_batch(1, 40, model.config.n_embd, slots=[2, 3, 9])
    with gist_inputs(model, mask, vectors):
        full = model(idx)
    c = model.config
    cache = KVCache(1, c.n_kv_head, 64, c.n_embd // c.n_head, c.n_layer, "cpu", COMPUTE_DTYPE)
    with gist_inputs(model, mask[:, :39], vectors[:, :39]):
        prefill = model(idx[:, :39], kv_cache=cache)
    step = model(idx[:, 39:], kv_cache=cache)  # a plain token decoded after the gisted prefix
    torch.testing.assert_close(prefill, full[:, :39], rtol=0, atol=1e-5)
    torch.testing.assert_close(step, full[:, 39:], rtol=0, atol=1e-5)


def test_bad_inputs_raise_clear_errors(model):
    idx = token_batch()
    D = model.config.n_embd
    mask, vectors = gist_batch(*idx.shape, D, slots=[1])
    with pytest.raises(ValueError, match="bool tensor"):
        with gist_inputs(model, mask.long(), vectors):
            pass
    with pytest.raises(ValueError, match="n_embd"):
        with gist_inputs(model, mask, vectors[..., :-1]):
            pass
    with pytest.raises(ValueError, match="mask matching idx"):
        with gist_inputs(model, mask, vectors):
            model(idx[:, :10])
    with gist_inputs(model, mask, vectors):
        with pytest.raises(RuntimeError, match="nesting"):
            with gist_inputs(model, mask, vectors):
                pass
        with pytest.raises(RuntimeError, match="leave the with-block"):
            detach(model)


def test_compiled_model_must_be_attached_before_compiling(model):
    compiled = torch.compile(model, backend="eager")  # lazy: nothing is traced until it is called
    idx = token_batch()
    mask, vectors = gist_batch(*idx.shape, model.config.n_embd, slots=[1])
    with pytest.raises(RuntimeError, match="before torch.compile"):
        with gist_inputs(compiled, mask, vectors):
            pass


@pytest.mark.slow
def test_torch_compile_traces_the_override(model):
    attach(model)
    compiled = torch.compile(model, backend="eager", dynamic=False)
    idx = token_batch()
    mask, vectors = gist_batch(*idx.shape, model.config.n_embd, slots=[5, 6])
    with gist_inputs(model, mask, vectors):
        eager = model(idx)
    with gist_inputs(compiled, mask, vectors):
        assert torch.equal(compiled(idx), eager)
    assert torch.equal(compiled(idx), model(idx))  # override off again
    # new gist values flow into the compiled graph as inputs, not as baked-in constants
    with gist_inputs(model, mask, vectors * 2):
        eager2 = model(idx)
    with gist_inputs(compiled, mask, vectors * 2):
        assert torch.equal(compiled(idx), eager2)
    assert not torch.equal(eager, eager2)
