"""
One attention entry point for the model, whatever the hardware.

`flash_attn` mimics the Flash Attention 3 interface (flash_attn_func for training,
flash_attn_with_kvcache for inference). When FA3 can be loaded (CUDA, fetched through
the optional `kernels` package, bf16 compute) the calls go straight to it; otherwise
they run on PyTorch's scaled_dot_product_attention with the same semantics, including
sliding windows and the in-place KV-cache update. Tensors are (B, T, H, D), FA3's layout.

    from nanochat.flash_attention import flash_attn
    y = flash_attn.flash_attn_func(q, k, v, causal=True, window_size=(W, 0))
    y = flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v,
                                           cache_seqlens=pos, causal=True, window_size=(W, 0))

Window convention (FA3's): window_size = (left, right); a query at position i sees keys
at positions j with i - left <= j <= i (right is 0 for causal); left < 0 means unlimited.

Ours beside upstream's: when no FA3 kernel loads, the `flash-attn` package (FA2, our
optional `gpu` extra) is tried next; FLASH_IMPL says which kernel is in use.
"""
import torch
import torch.nn.functional as F


# =============================================================================
# Which flash kernel can this machine load?
# =============================================================================
def _load_flash_attention_3():
    """Return the FA3 interface module, or None if this machine cannot use it."""
    if not torch.cuda.is_available():
        return None
    try:
        major, _ = torch.cuda.get_device_capability()
        # prebuilt kernels exist for Hopper (sm90), Ada (sm89) and Ampere (sm80/sm86);
        # Blackwell (sm100) has none yet and takes the SDPA path
        import os
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        # `kernels` (optional gpu extra) downloads them from the HF hub. Any failure here
        # (package missing, no network, no build for this GPU) just means we use SDPA,
        # which is correct everywhere, only slower.
        from kernels import get_kernel, has_kernel
        # on Hopper this build is the faster one
        if major == 9:
            hf_kernel = "varunneal/flash-attention-3"
            return get_kernel(hf_kernel).flash_attn_interface
        else:
            hf_kernel = "kernels-community/flash-attn3"
            if has_kernel(hf_kernel):
                return get_kernel(hf_kernel).flash_attn_interface
            else:
                return None

    except Exception:
        return None


def _load_flash_attention_2():
    """
    Ours: the `flash-attn` package (our optional `gpu` extra, built from source with nvcc),
    used only when no FA3 kernel could be loaded, e.g. on an offline Ampere/Hopper node. Its
    flash_attn_func / flash_attn_with_kvcache take the same (B, T, H, D) tensors and the
    same keyword arguments as FA3's, so the calls below need no change.
    """
    if not torch.cuda.is_available():
        return None
    try:
        import flash_attn
        major, _ = torch.cuda.get_device_capability()
        return flash_attn if major >= 8 else None
    except Exception:
        return None


_fa3 = _load_flash_attention_3()
FLASH_IMPL = "fa3" if _fa3 is not None else None  # ours: which flash kernel is loaded, for logs
if _fa3 is None:  # ours: FA2 stands in, behind FA3's name
    _fa3 = _load_flash_attention_2()
    FLASH_IMPL = "fa2" if _fa3 is not None else None
HAS_FA3 = _fa3 is not None  # "a flash kernel with FA3's interface is loaded"

# Tests set this to 'fa3' or 'sdpa' (then re-run _resolve_use_fa3); None = automatic
_override_impl = None


def _resolve_use_fa3():
    """Whether calls should go to FA3, given availability, the override and the compute dtype."""
    if _override_impl == 'fa3':
        assert HAS_FA3, "Cannot override to FA3: not available on this hardware"
        return True
    if _override_impl == 'sdpa':
        return False
    if HAS_FA3:
        # the FA3 kernels only do bf16 (and fp8); fp16/fp32 compute has to take the SDPA path
        from nanochat.common import COMPUTE_DTYPE
        if COMPUTE_DTYPE == torch.bfloat16:
            return True
        return False
    return False

USE_FA3 = _resolve_use_fa3()


# =============================================================================
# SDPA fallback
# =============================================================================
def _sdpa_attention(q, k, v, window_size, enable_gqa):
    """
    Causal attention with an optional left window, q/k/v in SDPA's (B, H, T, D) layout.
    k/v may be longer than q (KV cache): then the queries are the *last* Tq positions.
    """
    Tq = q.size(2)
    Tk = k.size(2)
    window = window_size[0]

    # plain causal attention over equal lengths: the fast fused path with no mask
    if (window < 0 or window >= Tq) and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)

    # one query (decode step): it is the newest position, so causality is automatic and
    # the window just trims the oldest keys
    if Tq == 1:
        if window >= 0 and window < Tk:
            # it sees itself plus `window` tokens back: window + 1 keys
            start = max(0, Tk - (window + 1))
            k = k[:, :, start:, :]
            v = v[:, :, start:, :]
        return F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=enable_gqa)

    # General case (a window shorter than the sequence, or a chunk appended to a cache):
    # SDPA's is_causal aligns to the top-left corner, not to the end of the cache, so spell
    # out the boolean mask in absolute positions.
    device = q.device
    row_idx = (Tk - Tq) + torch.arange(Tq, device=device).unsqueeze(1)  # (Tq, 1) query positions
    col_idx = torch.arange(Tk, device=device).unsqueeze(0)  # (1, Tk) key positions
    mask = col_idx <= row_idx

    # the left window
    if window >= 0 and window < Tk:
        mask = mask & ((row_idx - col_idx) <= window)

    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)

# =============================================================================
# Public API: FA3's signatures
# =============================================================================
def flash_attn_func(q, k, v, causal=False, window_size=(-1, -1)):
    """
    Attention without a cache (training, naive generation).
    q (B, T, H, D), k/v (B, T, H_kv, D) with H_kv dividing H; returns (B, T, H, D).
    window_size = (left, right), -1 = unlimited. The SDPA path is always causal, which
    is the only way the model calls this.
    """
    if USE_FA3:
        return _fa3.flash_attn_func(q, k, v, causal=causal, window_size=window_size)

    # SDPA wants (B, H, T, D)
    q = q.transpose(1, 2)
    k = k.transpose(1, 2)
    v = v.transpose(1, 2)
    enable_gqa = q.size(1) != k.size(1)
    y = _sdpa_attention(q, k, v, window_size, enable_gqa)
    return y.transpose(1, 2)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None,
                            causal=False, window_size=(-1, -1)):
    """
    Attention for inference against a preallocated cache, FA3-style.

    q: (B, T_new, H, D) queries for the new tokens
    k_cache, v_cache: (B, T_max, H_kv, D), updated IN PLACE with k/v at the current position
    k, v: (B, T_new, H_kv, D) keys/values of the new tokens (or None to only read)
    cache_seqlens: (B,) int32 tokens already in the cache (the SDPA path assumes every
        row is at the same position, as the Engine guarantees)
    Returns (B, T_new, H, D). The caller advances cache_seqlens afterwards.
    """
    if USE_FA3:
        return _fa3.flash_attn_with_kvcache(
            q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
            causal=causal, window_size=window_size
        )

    # SDPA path: we keep the cache ourselves
    B, T_new, H, D = q.shape
    pos = cache_seqlens[0].item()

    # write the new keys/values in place, as FA3 does
    if k is not None and v is not None:
        k_cache[:, pos:pos+T_new, :, :] = k
        v_cache[:, pos:pos+T_new, :, :] = v

    # everything cached so far, the new tokens included
    end_pos = pos + T_new
    k_full = k_cache[:, :end_pos, :, :]
    v_full = v_cache[:, :end_pos, :, :]

    q_sdpa = q.transpose(1, 2)
    k_sdpa = k_full.transpose(1, 2)
    v_sdpa = v_full.transpose(1, 2)

    enable_gqa = q_sdpa.size(1) != k_sdpa.size(1)
    y_sdpa = _sdpa_attention(q_sdpa, k_sdpa, v_sdpa, window_size, enable_gqa)

    return y_sdpa.transpose(1, 2)


# =============================================================================
# The model calls flash_attn.<fn>, exactly as it would call the FA3 module
# =============================================================================
from types import SimpleNamespace
flash_attn = SimpleNamespace(
    flash_attn_func=flash_attn_func,
    flash_attn_with_kvcache=flash_attn_with_kvcache,
)
