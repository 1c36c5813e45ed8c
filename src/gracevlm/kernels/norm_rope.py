"""RMSNorm and rotary embedding of fp32 rows through the native library (``csrc/gv_norm.c``): one C call where
torch dispatches 6-10 ops, for the per-token work of decode steps and prompts.

``rms_norm(x, weight, eps)``: ``(x * inv) * weight`` with ``inv = 1 / sqrt(mean(x^2) + eps)`` per row, the
sum of squares in double (within ~1 ulp of exact; torch's fp32 reduction differs by summation order only),
each row's bits independent of the rows beside it, the code path and the threads.
``rotary(x, cos, sin)``: ``x * cos + rotate_half(x) * sin`` bitwise as torch computes it in fp32.
Both return None where the native path does not apply (no library, not fp32 CPU tensors, gradients wanted,
an unsupported layout, switched off with ``GRACEVLM_NATIVE_NORM=0`` or ``set_enabled(False)``); callers then
compute the same formula with torch ops.
"""
from __future__ import annotations

import torch

from . import native, native_int8

_switch = native.NativeSwitch("GRACEVLM_NATIVE_NORM")
enabled, set_enabled = _switch.enabled, _switch.set_enabled


def _usable(*tensors: torch.Tensor) -> bool:
    if not _switch.on:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t.dtype != torch.float32 or not t.is_cpu or (grad and t.requires_grad):
            return False
    return True


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """``x [..., d]`` and ``weight [d]`` fp32 -> fp32 ``[..., d]`` (contiguous), or None (see the module)."""
    d = weight.numel()
    if not _usable(x, weight) or x.shape[-1] != d or weight.dim() != 1 or not weight.is_contiguous():
        return None
    rows = x.reshape(-1, d)  # a view where the layout allows it
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    lib = native_int8.load_library()
    if lib is None:
        return None
    out = torch.empty(rows.shape, dtype=torch.float32)
    if lib.gv_rms_norm(rows.data_ptr(), rows.stride(0), weight.data_ptr(), out.data_ptr(), d, rows.shape[0], d,
                       float(eps)) != 0:
        return None
    return out.view(x.shape)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """``x [B, T, H, d]`` (each token's ``H * d`` values contiguous), ``cos/sin [B, T, d]`` fp32 -> the rotated
    ``[B, T, H, d]`` (contiguous), or None (see the module)."""
    if not _usable(x, cos, sin) or x.dim() != 4:
        return None
    b, t, h, d = x.shape
    if cos.shape != (b, t, d) or sin.shape != (b, t, d) or d % 2:
        return None
    rows = x.reshape(b * t, h * d)  # a view where the layout allows it, else a copy
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    lib = native_int8.load_library()
    if lib is None:
        return None
    out = torch.empty(b, t, h, d, dtype=torch.float32)
    if lib.gv_rope(rows.data_ptr(), rows.stride(0), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), b * t, h, d) != 0:
        return None
    return out
