"""Specification of nanochat/gpt.py (and the fp8 module swap): every model item of the
upstream fixture manifest (structure, seeded init, logits, losses, naive generation,
optimizer groups), plus a held-out GQA / sliding-window config checked through
invariants: KV-cache decoding equals the full forward, FLOP/byte estimates agree with
their definitions, and generation is deterministic."""
import json
import math

import pytest
import torch
import torch.nn as nn

import nanochat.gpt as gpt
from nanochat.common import COMPUTE_DTYPE
from nanochat.gpt import GPT, GPTConfig


def build_model(config, seed=None):
    """The standard construction path: meta device -> to_empty -> init_weights."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=torch.device("cpu"))
    model.init_weights()
    return model


@pytest.fixture(scope="module")
def manifest(upstream_fixtures):
    return json.loads((upstream_fixtures / "manifest.json").read_text())


@pytest.fixture(scope="module")
def fixture_config(manifest):
    return GPTConfig(**manifest["model_config"])


@pytest.fixture(scope="module")
def trained_model(upstream_fixtures, manifest, fixture_config):
    """The d2 checkpoint loaded the way checkpoint_manager.build_model does it."""
    ckpt = manifest["checkpoint"]
    state = torch.load(upstream_fixtures / ckpt["dir"] / ckpt["files"][0], map_location="cpu")
    model = build_model(fixture_config)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    return model


@pytest.fixture(scope="module")
def forward_expected(upstream_fixtures):
    return torch.load(upstream_fixtures / "expected" / "model_forward.pt")

# -----------------------------------------------------------------------------
# fixture items


def test_model_structure(upstream_fixtures, fixture_config):
    expected = json.loads((upstream_fixtures / "expected" / "model_structure.json").read_text())
    model = build_model(fixture_config)
    state = model.state_dict()
    assert list(state) == list(expected["state_dict"])
    for name, (shape, dtype) in expected["state_dict"].items():
        assert list(state[name].shape) == shape, name
        assert state[name].dtype == getattr(torch, dtype), name
    assert [n for n, _ in model.named_parameters()] == expected["named_parameters"]
    assert [list(w) for w in model.window_sizes] == expected["window_sizes"]
    assert model.num_scaling_params() == expected["num_scaling_params"]
    assert model.estimate_flops() == expected["estimate_flops"]
    assert model.num_matmul_params() == expected["num_matmul_params"]
    assert str(COMPUTE_DTYPE) == f"torch.{expected['compute_dtype']}"
    # rotary tables are buffers, but never part of a checkpoint
    assert "cos" not in state and "sin" not in state


def test_model_init_is_bitwise_upstream(upstream_fixtures, fixture_config):
    expected = torch.load(upstream_fixtures / "expected" / "model_init.pt")
    state = build_model(fixture_config, seed=expected["seed"]).state_dict()
    assert set(state) == set(expected["params"])
    for name, rec in expected["params"].items():
        flat = state[name].detach().float().flatten()
        assert torch.equal(flat[rec["idx"]], rec["values"]), name
        stats = [flat.double().sum().item(), flat.double().abs().sum().item(), flat.double().square().sum().item()]
        assert stats == pytest.approx(rec["stats"], rel=1e-6, abs=1e-9), name


def test_model_logits(trained_model, forward_expected, manifest):
    atol = manifest["tolerances"]["values"]["logits_atol"]
    idx = forward_expected["idx"]
    with torch.no_grad():
        logits = trained_model(idx)
        short = trained_model(idx[:, :forward_expected["logits_short"].size(1)])
    assert logits.dtype == torch.float32 and logits.shape == forward_expected["logits"].shape
    torch.testing.assert_close(logits, forward_expected["logits"], atol=atol, rtol=0)
    torch.testing.assert_close(short, forward_expected["logits_short"], atol=atol, rtol=0)
    # the softcap bounds every logit
    assert logits.abs().max() < 15


def test_model_loss(trained_model, forward_expected, manifest):
    atol = manifest["tolerances"]["values"]["loss_atol"]
    idx, targets = forward_expected["idx"], forward_expected["targets"]
    with torch.no_grad():
        loss_mean = trained_model(idx, targets)
        loss_none = trained_model(idx, targets, loss_reduction="none")
        loss_sum = trained_model(idx, targets, loss_reduction="sum")
    assert loss_mean.shape == () and loss_none.shape == (idx.numel(),)
    torch.testing.assert_close(loss_mean, forward_expected["loss_mean"], atol=atol, rtol=0)
    torch.testing.assert_close(loss_none, forward_expected["loss_none"], atol=atol, rtol=0)
    expected_sum = forward_expected["loss_sum"]
    assert abs(loss_sum.item() - expected_sum.item()) <= atol * abs(expected_sum.item())
    # ignored targets contribute exactly zero and are left out of the mean
    ignored = targets.view(-1) == -1
    assert ignored.any() and (loss_none[ignored] == 0).all()
    assert loss_mean.item() == pytest.approx(loss_none.sum().item() / (~ignored).sum().item(), rel=1e-5)


def test_naive_generate(trained_model, upstream_fixtures):
    expected = json.loads((upstream_fixtures / "expected" / "engine.json").read_text())
    call = expected["naive"]["call"]
    tokens = list(trained_model.generate(expected["prompt"], **call))
    assert all(type(t) is int for t in tokens)
    assert tokens == expected["naive"]["tokens"]


def test_setup_optimizer_groups(upstream_fixtures, fixture_config):
    expected = json.loads((upstream_fixtures / "expected" / "optimizer_groups.json").read_text())
    model = build_model(fixture_config)
    names = {p: n for n, p in model.named_parameters()}
    groups = model.setup_optimizer().param_groups
    assert len(groups) == len(expected)
    for got, want in zip(groups, expected):
        assert [names[p] for p in got["params"]] == want["params"]
        for key, value in want.items():
            if key == "params":
                continue
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-9), key
            elif isinstance(value, list):
                assert list(got[key]) == pytest.approx(value, rel=1e-9), key
            else:
                assert got[key] == value, key

# -----------------------------------------------------------------------------
# a held-out config: GQA, 3 layers, "SSL" windows shorter than the sequence


HELD_OUT = dict(sequence_len=300, vocab_size=300, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SSL")


class ProtocolCache:
    """The smallest object satisfying the kv_cache protocol GPT.forward relies on
    (the same one nanochat.engine.KVCache implements)."""
    def __init__(self, batch_size, config, max_len):
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, max_len, config.n_kv_head, head_dim)
        self.k_cache = torch.zeros(shape, dtype=COMPUTE_DTYPE)
        self.v_cache = torch.zeros(shape, dtype=COMPUTE_DTYPE)
        self.n_layers = config.n_layer
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32)
        self.prev_embedding = None

    def get_pos(self):
        return self.cache_seqlens[0].item()

    def get_layer_cache(self, layer_idx):
        return self.k_cache[layer_idx], self.v_cache[layer_idx]

    def advance(self, num_tokens):
        self.cache_seqlens += num_tokens


@pytest.fixture(scope="module")
def held_out_model():
    model = build_model(GPTConfig(**HELD_OUT), seed=0)
    # init leaves smear, c_proj etc. at zero: perturb so every component affects the output
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    model.eval()
    return model


def test_held_out_structure(held_out_model):
    model = held_out_model
    assert model.window_sizes == [(128, 0), (128, 0), (300, 0)]
    # value embeddings on alternating layers ending with the last one; kv_dim wide
    assert sorted(model.value_embeds.keys()) == ["0", "2"]
    assert model.value_embeds["0"].weight.shape == (320, 2 * 16)
    assert [b.attn.ve_gate is not None for b in model.transformer.h] == [True, False, True]
    assert model.transformer.h[0].attn.c_k.weight.shape == (2 * 16, 64)
    assert model.cos.shape == (1, 3000, 1, 8)


def test_held_out_forward_and_loss(held_out_model):
    idx = torch.randint(0, 300, (2, 300), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = held_out_model(idx)
        targets = idx.roll(-1, dims=1)
        targets[:, -5:] = -1
        loss = held_out_model(idx, targets)
    assert logits.shape == (2, 300, 300) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all() and math.isfinite(loss.item())
    # causality: changing a late token leaves earlier logits untouched
    idx2 = idx.clone()
    idx2[:, 200] = (idx2[:, 200] + 1) % 300
    with torch.no_grad():
        logits2 = held_out_model(idx2)
    torch.testing.assert_close(logits2[:, :200], logits[:, :200], atol=1e-5, rtol=0)
    assert not torch.allclose(logits2[:, 200:], logits[:, 200:])


def test_held_out_kv_cache_matches_full_forward(held_out_model):
    """Prefill past the short window, then decode token by token through the cache:
    the logits must equal those of one uncached forward over the whole sequence."""
    T, prefill = 150, 135
    idx = torch.randint(0, 300, (2, T), generator=torch.Generator().manual_seed(3))
    cache = ProtocolCache(2, held_out_model.config, max_len=T)
    with torch.no_grad():
        full = held_out_model(idx)
        steps = [held_out_model(idx[:, :prefill], kv_cache=cache)]
        for t in range(prefill, T):
            steps.append(held_out_model(idx[:, t:t + 1], kv_cache=cache))
    assert cache.get_pos() == T
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


def test_held_out_generate_is_deterministic_and_greedy(held_out_model):
    prompt = [5, 17, 42, 99, 3]
    greedy = list(held_out_model.generate(prompt, max_tokens=6, temperature=0.0))
    assert greedy == list(held_out_model.generate(prompt, max_tokens=6, temperature=0.0))
    # each greedy token is the argmax after the prompt plus the tokens before it
    with torch.no_grad():
        logits = held_out_model(torch.tensor([prompt + greedy]))
    assert logits[0, len(prompt) - 1:-1].argmax(-1).tolist() == greedy
    sampled = list(held_out_model.generate(prompt, max_tokens=6, temperature=1.0, top_k=20, seed=11))
    assert sampled == list(held_out_model.generate(prompt, max_tokens=6, temperature=1.0, top_k=20, seed=11))
    assert all(type(t) is int and 0 <= t < 300 for t in sampled)


def test_flop_and_kv_byte_estimates_follow_their_definitions(held_out_model):
    model, c = held_out_model, held_out_model.config
    head_dim = c.n_embd // c.n_head
    padded_vocab = 320
    # every matmul weight, counted by hand from the config
    per_layer = (c.n_embd * c.n_embd + 2 * c.n_embd * c.n_kv_head * head_dim + c.n_embd * c.n_embd
                 + 2 * 4 * c.n_embd * c.n_embd)
    ve_gates = 2 * 12 * c.n_kv_head
    matmul = c.n_layer * per_layer + ve_gates + padded_vocab * c.n_embd + 24
    assert model.num_matmul_params() == matmul
    windows = [128, 128, 300]
    assert model.estimate_flops() == 6 * matmul + sum(12 * c.n_head * head_dim * min(w, 300) for w in windows)
    # prefilling n tokens costs the same as decoding them one at a time
    for n in (1, 50, 129, 300):
        assert model.estimate_prefill_flops(n) == sum(model.estimate_decode_flops(t) for t in range(1, n + 1))
    per_token = 2 * c.n_kv_head * head_dim * COMPUTE_DTYPE.itemsize
    assert model.kv_bytes_per_token() == c.n_layer * per_token
    assert model.kv_read_bytes(100) == 100 * model.kv_bytes_per_token()
    assert model.kv_read_bytes(1000) == per_token * (128 + 128 + 300)


def test_bad_configs_and_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="window_pattern"):
        GPT(GPTConfig(n_layer=2, window_pattern="SXL"))
    with pytest.raises(ValueError, match="n_kv_head"):
        with torch.device("meta"):
            GPT(GPTConfig(n_layer=1, n_head=4, n_kv_head=3, n_embd=64))
    model = build_model(GPTConfig(sequence_len=8, vocab_size=32, n_layer=1, n_head=2, n_kv_head=1, n_embd=32))
    with pytest.raises(ValueError, match="rotary"):
        model(torch.zeros(1, 81, dtype=torch.long))
    with pytest.raises(ValueError, match="T > 1"):
        model(torch.zeros(1, 1, dtype=torch.long))


def test_model_follows_compute_dtype(monkeypatch):
    # on CUDA the compute dtype is bf16: embeddings and rotary tables follow it, master
    # matmul weights stay fp32, logits come back fp32
    monkeypatch.setattr(gpt, "COMPUTE_DTYPE", torch.bfloat16)
    model = build_model(GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32), seed=0)
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    assert model.value_embeds["1"].weight.dtype == torch.bfloat16
    assert model.cos.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.float32
    assert model.kv_bytes_per_token() == 2 * 2 * 2 * 16 * 2
    with torch.no_grad():
        logits = model(torch.randint(0, 64, (1, 8)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()

# -----------------------------------------------------------------------------
# fp8 module swap (conversion is device-independent; the fp8 matmul itself needs CUDA)


def test_fp8_conversion_keeps_parameters_and_flop_estimate():
    from nanochat.fp8 import Float8Linear, Float8LinearConfig, convert_to_float8_training
    model = build_model(GPTConfig(**HELD_OUT), seed=0)
    flops, matmul = model.estimate_flops(), model.num_matmul_params()
    params_before = dict(model.named_parameters())
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())

    def big_enough(mod, fqn):
        return min(mod.in_features, mod.out_features) >= 64

    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("tensorwise"),
                               module_filter_fn=big_enough)
    converted = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert "transformer.h.0.attn.c_q" in converted and "lm_head" in converted
    # small layers were filtered out and stay as they were
    assert "smear_gate" not in converted and "transformer.h.0.attn.ve_gate" not in converted
    assert "transformer.h.0.attn.c_k" not in converted  # 64 -> 32
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == n_linear
    # the very same Parameter objects, under the same names: checkpoints and optimizer unaffected
    params_after = dict(model.named_parameters())
    assert list(params_after) == list(params_before)
    assert all(params_after[n] is params_before[n] for n in params_before)
    assert model.estimate_flops() == flops and model.num_matmul_params() == matmul
    with pytest.raises(ValueError, match="tensorwise"):
        Float8LinearConfig.from_recipe_name("rowwise")
