"""Decode attention on CPU through the native library (``csrc/gv_attn.c``): one query position per head over a
KV cache, K/V read in their stored dtype (fp32, bf16 or fp16) without an fp32 copy of the prefix.

``decode_attention(q, keys, values, span, groups)`` returns ``softmax(q K^T / sqrt(d)) V`` for every head
over positions ``0 .. span-1``, or None when the native path cannot take the call (no library, not CPU,
unsupported dtype or layout, switched off); callers then use ``F.scaled_dot_product_attention``.
Against SDPA in fp32 it differs by summation order and a <= 2-ulp ``exp`` (max |diff| ~1e-7 on unit-scale
values); results do not depend on the thread count.
"""
from __future__ import annotations

import torch

from . import native, native_int8, norm_rope

_KV_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_switch = native.NativeSwitch("GRACEVLM_NATIVE_ATTENTION")  # off with GRACEVLM_NATIVE_ATTENTION=0 at import
enabled, set_enabled = _switch.enabled, _switch.set_enabled


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, span: int,
                     groups: int) -> torch.Tensor | None:
    """``q [1, H, 1, d]`` fp32 contiguous; ``keys/values [H/groups, >= span, d]`` (a KV cache layer's views,
    same strides, the ``d`` values of a position contiguous), of which positions ``0 .. span-1`` are attended.
    Returns fp32 ``[1, H, 1, d]``, or None where the native kernel cannot take the call."""
    if not _switch.on or q.dtype != torch.float32 or q.device.type != "cpu" or not q.is_contiguous():
        return None
    dt = _KV_DTYPES.get(keys.dtype)
    kvh, cap, d = keys.shape
    hs, ps, inner = keys.stride()
    h = q.shape[1]
    if (dt is None or values.dtype != keys.dtype or values.stride() != (hs, ps, inner) or inner != 1
            or keys.device.type != "cpu" or q.shape[0] != 1 or q.shape[2] != 1 or q.shape[3] != d
            or h != kvh * groups or not 0 < span <= cap):
        return None
    lib = native_int8.load_library()
    if lib is None:
        return None
    out = torch.empty(1, h, 1, d, dtype=torch.float32)
    rc = lib.gv_attn_decode(q.data_ptr(), h, kvh, d, keys.data_ptr(), values.data_ptr(), hs, ps, span, dt,
                            d ** -0.5, out.data_ptr(), native.num_threads())
    return out if rc == 0 else None


def decode_block(qkv: torch.Tensor, heads: int, kv_heads: int, q_norm: torch.Tensor | None,
                 k_norm: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, span: int) -> torch.Tensor | None:
    """One sequence's decode-step attention in one native call (``gv_attn_block_decode``): ``qkv [1, 1, (H +
    2 KVH) d]`` fp32 (a fused projection's output) -> QK-norm with ``q_norm/k_norm [d]`` (None: none), rotary
    with ``cos/sin [1, 1, d]``, the key and value heads written at position ``span - 1`` of ``keys/values
    [KVH, >= span, d]`` (fp32 or bf16 KV cache views), attention over positions ``0 .. span-1``. Returns fp32
    ``[1, 1, H d]``, bitwise what ``norm_rope.rms_norm``, ``norm_rope.rotary``, the cache writes (torch's
    rounding to bf16) and ``decode_attention`` give one after the other; or None where that path does not
    apply (then nothing was written)."""
    if not _switch.on or not norm_rope.enabled():
        return None
    dt = _KV_DTYPES.get(keys.dtype)
    d = keys.shape[-1]
    hs, ps, inner = keys.stride()
    small = [qkv, cos, sin] + [w for w in (q_norm, k_norm) if w is not None]
    if (dt not in (0, 1) or values.dtype != keys.dtype or not keys.is_cpu or not values.is_cpu
            or any(t.dtype != torch.float32 or not t.is_cpu or not t.is_contiguous() for t in small)
            or torch.is_grad_enabled() and any(t.requires_grad for t in small)):
        return None
    if (qkv.numel() != (heads + 2 * kv_heads) * d or cos.numel() != d or sin.numel() != d
            or keys.shape[0] != kv_heads or heads % kv_heads or heads // kv_heads > 64 or d > 512 or d % 2
            or values.shape != keys.shape or values.stride() != (hs, ps, inner) or inner != 1
            or not 0 < span <= keys.shape[1] or any(w.shape != (d,) for w in small[3:])):
        return None
    lib = native_int8.load_library()
    if lib is None:
        return None
    out = torch.empty(1, 1, heads * d, dtype=torch.float32)
    rc = lib.gv_attn_block_decode(qkv.data_ptr(), heads, kv_heads, d,
                                  None if q_norm is None else q_norm.data_ptr(),
                                  None if k_norm is None else k_norm.data_ptr(), float(eps), cos.data_ptr(),
                                  sin.data_ptr(), keys.data_ptr(), values.data_ptr(), hs, ps, span, dt, d ** -0.5,
                                  out.data_ptr(), native.num_threads())
    return out if rc == 0 else None
