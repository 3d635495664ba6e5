"""Specification of nanochat/flash_attention.py on CPU: the SDPA fallback must equal an
explicit softmax(QK^T/sqrt(d)) reference with FA3's (left, right) window convention,
for training-style calls and for KV-cache prefill/decode, and FA3 detection must fail
soft to SDPA."""
import sys

import pytest
import torch

import nanochat.flash_attention as fa
from nanochat.flash_attention import flash_attn

ATOL = 1e-5


def reference_attention(q, k, v, left):
    """q (B, Tq, H, D), k/v (B, Tk, Hkv, D); the queries are the last Tq of Tk positions.
    Query at absolute position i sees keys j with j <= i and (left < 0 or i - j <= left)."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(H // Hkv, dim=2)
    v = v.repeat_interleave(H // Hkv, dim=2)
    qd, kd, vd = q.double(), k.double(), v.double()
    scores = torch.einsum("bqhd,bkhd->bhqk", qd, kd) / D ** 0.5
    i = torch.arange(Tk - Tq, Tk).unsqueeze(1)
    j = torch.arange(Tk).unsqueeze(0)
    allowed = j <= i
    if left >= 0:
        allowed &= (i - j) <= left
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), vd)
    return out.to(q.dtype)


def qkv(B, T, H, Hkv, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, H, D, generator=g), torch.randn(B, T, Hkv, D, generator=g),
            torch.randn(B, T, Hkv, D, generator=g))


def test_cpu_uses_sdpa_path():
    if torch.cuda.is_available():
        pytest.skip("CPU-only expectation")
    assert fa.HAS_FA3 is False and fa.USE_FA3 is False
    assert fa._load_flash_attention_3() is None


def test_override_resolution(monkeypatch):
    import nanochat.common as common
    monkeypatch.setattr(fa, "_override_impl", "sdpa")
    assert fa._resolve_use_fa3() is False
    # automatic choice: FA3 only when it loaded AND compute is bf16 (its kernels do no fp32)
    monkeypatch.setattr(fa, "_override_impl", None)
    monkeypatch.setattr(fa, "HAS_FA3", False)
    assert fa._resolve_use_fa3() is False
    monkeypatch.setattr(fa, "HAS_FA3", True)
    monkeypatch.setattr(common, "COMPUTE_DTYPE", torch.float32)
    assert fa._resolve_use_fa3() is False
    monkeypatch.setattr(common, "COMPUTE_DTYPE", torch.bfloat16)
    assert fa._resolve_use_fa3() is True
    # forcing FA3 where it is missing is an error
    monkeypatch.setattr(fa, "HAS_FA3", False)
    monkeypatch.setattr(fa, "_override_impl", "fa3")
    with pytest.raises(AssertionError, match="not available"):
        fa._resolve_use_fa3()


def test_fa3_loader_falls_back_when_kernels_is_missing(monkeypatch):
    # pretend to be on a Hopper GPU without the optional `kernels` package installed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setitem(sys.modules, "kernels", None)  # makes `import kernels` raise ImportError
    assert fa._load_flash_attention_3() is None


@pytest.mark.parametrize("left", [-1, 40, 64, 1000])
def test_full_causal_matches_reference(left):
    # left < 0 or >= T: plain causal attention
    q, k, v = qkv(2, 40, 4, 4, 16)
    y = flash_attn.flash_attn_func(q, k, v, causal=True, window_size=(left, 0))
    assert y.shape == q.shape
    torch.testing.assert_close(y, reference_attention(q, k, v, -1), atol=ATOL, rtol=0)


@pytest.mark.parametrize("left", [0, 1, 7, 39])
def test_sliding_window_matches_reference(left):
    q, k, v = qkv(2, 40, 4, 4, 16, seed=1)
    y = flash_attn.flash_attn_func(q, k, v, causal=True, window_size=(left, 0))
    torch.testing.assert_close(y, reference_attention(q, k, v, left), atol=ATOL, rtol=0)
    if left < 39:
        # and it really is different from full attention
        assert not torch.allclose(y, reference_attention(q, k, v, -1), atol=1e-3)


@pytest.mark.parametrize("left", [-1, 5])
def test_gqa_matches_reference(left):
    q, k, v = qkv(1, 24, 6, 2, 8, seed=2)
    y = flash_attn.flash_attn_func(q, k, v, causal=True, window_size=(left, 0))
    assert y.shape == (1, 24, 6, 8)
    torch.testing.assert_close(y, reference_attention(q, k, v, left), atol=ATOL, rtol=0)


@pytest.mark.parametrize("left,H,Hkv", [(-1, 4, 4), (100, 4, 2), (6, 4, 2), (0, 2, 2)])
def test_kvcache_prefill_then_decode_matches_full_attention(left, H, Hkv):
    """Prefill a chunk, append a second chunk, then decode one token at a time: every
    step must equal the reference restricted to the queries of that step, and the cache
    must hold exactly the keys/values written so far."""
    B, T, D, T_max = 2, 30, 8, 40
    q, k, v = qkv(B, T, H, Hkv, D, seed=3)
    expected = reference_attention(q, k, v, left)
    k_cache = torch.zeros(B, T_max, Hkv, D)
    v_cache = torch.zeros(B, T_max, Hkv, D)
    seqlens = torch.zeros(B, dtype=torch.int32)
    outputs = []
    for start, end in [(0, 12), (12, 20)] + [(t, t + 1) for t in range(20, T)]:
        y = flash_attn.flash_attn_with_kvcache(
            q[:, start:end], k_cache, v_cache, k=k[:, start:end], v=v[:, start:end],
            cache_seqlens=seqlens, causal=True, window_size=(left, 0))
        assert y.shape == (B, end - start, H, D)
        outputs.append(y)
        seqlens += end - start  # the caller (KVCache.advance) moves the position
    torch.testing.assert_close(torch.cat(outputs, dim=1), expected, atol=ATOL, rtol=0)
    assert torch.equal(k_cache[:, :T], k) and torch.equal(v_cache[:, :T], v)
    assert not k_cache[:, T:].any() and not v_cache[:, T:].any()


def test_kvcache_decode_window_smaller_than_cache():
    # single-token decode where the window cuts off most of the cache
    B, H, D, Tk, left = 1, 2, 8, 33, 8
    q_all, k, v = qkv(B, Tk, H, H, D, seed=4)
    k_cache = torch.zeros(B, 64, H, D)
    v_cache = torch.zeros(B, 64, H, D)
    k_cache[:, :Tk - 1] = k[:, :Tk - 1]
    v_cache[:, :Tk - 1] = v[:, :Tk - 1]
    seqlens = torch.full((B,), Tk - 1, dtype=torch.int32)
    q = q_all[:, -1:]
    y = flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k=k[:, -1:], v=v[:, -1:],
                                           cache_seqlens=seqlens, causal=True, window_size=(left, 0))
    torch.testing.assert_close(y, reference_attention(q, k, v, left), atol=ATOL, rtol=0)
    full = reference_attention(q, k, v, -1)
    assert not torch.allclose(y, full, atol=1e-3)


def test_gradients_flow_through_windowed_attention():
    q, k, v = (t.requires_grad_() for t in qkv(1, 16, 2, 2, 8, seed=5))
    flash_attn.flash_attn_func(q, k, v, causal=True, window_size=(3, 0)).sum().backward()
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    reference_attention(qr, kr, vr, 3).sum().backward()
    for got, want in [(q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)]:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_flash_attn_package_is_the_fallback_on_ampere_or_newer(monkeypatch):
    """The optional `gpu` extra (flash-attn) is picked up only on CUDA sm80+, when FA3 is not loadable."""
    import sys
    import types
    import nanochat.flash_attention as fa
    fake = types.ModuleType("flash_attn")
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert fa._load_flash_attention_2() is fake
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert fa._load_flash_attention_2() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fa._load_flash_attention_2() is None
