"""Decode attention on CPU through the native library (``csrc/gv_attn.c``): one query position per head over a
KV cache, K/V read in their stored dtype (fp32, bf16 or fp16) without an fp32 copy of the prefix.

``decode_attention(q, keys, values, span, groups)`` returns ``softmax(q K^T / sqrt(d)) V`` for every head
over positions ``0 .. span-1``, or None when the native path cannot take the call (no library, not CPU,
unsupported dtype or layout, switched off); callers then use ``F.scaled_dot_product_attention``.
Against SDPA in fp32 it differs by summation order and a <= 2-ulp ``exp`` (max |diff| ~1e-7 on unit-scale
values); results do not depend on the thread count.
"""
from __future__ import annotations

import os

import torch

from . import native, native_int8

_KV_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_enabled = os.environ.get("GRACEVLM_NATIVE_ATTENTION", "1") != "0"


def enabled() -> bool:
    """Whether ``decode_attention`` uses the native kernel (off with ``GRACEVLM_NATIVE_ATTENTION=0`` at import)."""
    return _enabled


def set_enabled(on: bool) -> bool:
    """Switch the native kernel on or off (A/B comparisons, tests); returns the previous setting."""
    global _enabled
    old, _enabled = _enabled, bool(on)
    return old


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, span: int,
                     groups: int) -> torch.Tensor | None:
    """``q [1, H, 1, d]`` fp32 contiguous; ``keys/values [H/groups, >= span, d]`` (a KV cache layer's views,
    same strides, the ``d`` values of a position contiguous), of which positions ``0 .. span-1`` are attended.
    Returns fp32 ``[1, H, 1, d]``, or None where the native kernel cannot take the call."""
    if not _enabled or q.dtype != torch.float32 or q.device.type != "cpu" or not q.is_contiguous():
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
