"""AutoAWQ "GEMM" packing of 4-bit weights (the layout GRACE checkpoints store).

For a linear with weight ``W[O, I]`` (out_features O, in_features I) and group size g along I:

=========  ===========  =======  ==================================================
tensor     shape        dtype    content
=========  ===========  =======  ==================================================
qweight    [I, O/8]     int32    nibbles of ``u = W^T`` codes, 8 output columns/word
qzeros     [I/g, O/8]   int32    zero points, same packing as ``qweight``
scales     [I/g, O]     float    per (group, output) scale (fp16 on disk)
=========  ===========  =======  ==================================================

Nibble ``k`` (bits 4k..4k+3) of word ``c`` holds logical column ``8c + AWQ_ORDER[k]``.
Dequantized: ``W^T[i, o] = (u[i, o] - z[i // g, o]) * s[i // g, o]``.
"""
from __future__ import annotations

import torch

from ..errors import FormatError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)   # storage nibble k -> logical column offset
AWQ_INVERSE = (0, 4, 1, 5, 2, 6, 3, 7)  # logical column offset j -> storage nibble
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)
GRACE_ZERO_WORD = -2004318072  # 0x88888888 as int32: every qzeros word of a symmetric GRACE layer


def _check_int32_2d(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise FormatError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise FormatError(f"{name} must be int32 (AWQ GEMM packing), got {t.dtype}; "
                          "AWQ checkpoints store packed nibbles as int32 words")
    if t.dim() != 2:
        raise FormatError(f"{name} must be 2-D, got shape {tuple(t.shape)}")


def unpack_nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] -> uint8 [R, 8C] nibbles in logical column order."""
    rows, cols = words.shape
    nib = (words.unsqueeze(-1) >> _SHIFTS.to(words.device)) & 0xF  # [R, C, 8] storage order
    nib = nib[..., list(AWQ_INVERSE)]  # logical order
    return nib.to(torch.uint8).reshape(rows, cols * 8)


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """uint8 [R, 8C] values 0..15 in logical order -> int32 [R, C] words (two's complement wrap)."""
    rows, n = values.shape
    v = values.to(torch.int64).reshape(rows, n // 8, 8)[..., list(AWQ_ORDER)]  # storage order
    words = (v << _SHIFTS.to(torch.int64).to(values.device)).sum(-1)  # disjoint bits: sum == OR
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack AWQ GEMM words.

    Returns ``codes`` uint8 ``[I, O]`` (values 0..15, logical order) and ``zeros`` uint8 ``[I/g, O]``.
    """
    _check_int32_2d(qweight, "qweight")
    _check_int32_2d(qzeros, "qzeros")
    if qzeros.shape[1] != qweight.shape[1]:
        raise FormatError(f"qzeros has {qzeros.shape[1]} words per row but qweight has "
                          f"{qweight.shape[1]}; both must pack the same out_features")
    if qzeros.shape[0] == 0 or qweight.shape[0] % qzeros.shape[0] != 0:
        raise FormatError(f"qzeros has {qzeros.shape[0]} group rows, which does not divide "
                          f"in_features={qweight.shape[0]} of qweight (truncated tensor?)")
    return unpack_nibbles(qweight), unpack_nibbles(qzeros)


def _check_codes(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise FormatError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise FormatError(f"{name} must be an integer tensor of 4-bit values, got {t.dtype}")
    if t.dim() != 2:
        raise FormatError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi > 15:
            raise FormatError(f"{name} holds values in [{lo}, {hi}]; 4-bit codes must lie in [0, 15]")


def pack_awq(codes: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack ``codes`` ``[I, O]`` and ``zeros`` ``[I/g, O]`` (integers 0..15) into AWQ GEMM words.

    Returns ``(qweight [I, O/8], qzeros [I/g, O/8])`` int32, byte-identical to AutoAWQ's packer.
    Works for any ``O % 8 == 0``.
    """
    _check_codes(codes, "codes")
    _check_codes(zeros, "zeros")
    in_f, out_f = codes.shape
    if out_f % 8 != 0 or out_f == 0:
        raise FormatError(f"out_features={out_f} must be a positive multiple of 8 to pack 8 nibbles per int32 word")
    if zeros.shape[1] != out_f:
        raise FormatError(f"zeros has {zeros.shape[1]} columns, codes has out_features={out_f}")
    if zeros.shape[0] == 0 or in_f % zeros.shape[0] != 0:
        raise FormatError(f"zeros has {zeros.shape[0]} group rows, which does not divide in_features={in_f}")
    return pack_nibbles(codes), pack_nibbles(zeros)


def check_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
              group_size: int, bias: torch.Tensor | None = None, name: str = "layer") -> tuple[int, int]:
    """Validate an AWQ triple; return ``(in_features, out_features)`` or raise FormatError."""
    _check_int32_2d(qweight, f"{name}.qweight")
    _check_int32_2d(qzeros, f"{name}.qzeros")
    if not isinstance(scales, torch.Tensor) or not scales.dtype.is_floating_point:
        raise FormatError(f"{name}.scales must be a floating tensor (fp16 on disk), "
                          f"got {getattr(scales, 'dtype', type(scales).__name__)}")
    if scales.dim() != 2:
        raise FormatError(f"{name}.scales must be 2-D [in/g, out], got shape {tuple(scales.shape)}")
    if not isinstance(group_size, int) or group_size <= 0:
        raise FormatError(f"{name}: group_size must be a positive int, got {group_size!r}")
    in_f, out_f = qweight.shape[0], qweight.shape[1] * 8
    if in_f % group_size != 0:
        raise FormatError(f"{name}: group_size={group_size} does not divide in_features={in_f}")
    n_groups = in_f // group_size
    if tuple(scales.shape) != (n_groups, out_f):
        raise FormatError(f"{name}.scales has shape {tuple(scales.shape)}, expected {(n_groups, out_f)} "
                          f"for qweight {tuple(qweight.shape)} and group_size={group_size} "
                          "(wrong group size or truncated tensor)")
    if tuple(qzeros.shape) != (n_groups, out_f // 8):
        raise FormatError(f"{name}.qzeros has shape {tuple(qzeros.shape)}, expected {(n_groups, out_f // 8)} "
                          f"for qweight {tuple(qweight.shape)} and group_size={group_size}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.dtype.is_floating_point:
            raise FormatError(f"{name}.bias must be a floating tensor")
        if tuple(bias.shape) != (out_f,):
            raise FormatError(f"{name}.bias has shape {tuple(bias.shape)}, expected ({out_f},)")
    return in_f, out_f


def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W^T [I, O]`` = ``(u - z) * s`` computed in float32 from the stored scales, cast to ``dtype``."""
    in_f, out_f = check_awq(qweight, qzeros, scales, group_size)
    codes, zeros = unpack_awq(qweight, qzeros)
    n_groups = in_f // group_size
    diff = codes.view(n_groups, group_size, out_f).to(torch.float32) - zeros.to(torch.float32).unsqueeze(1)
    w = diff * scales.to(torch.float32).unsqueeze(1)
    return w.reshape(in_f, out_f).to(dtype)


def is_symmetric_grace(qzeros: torch.Tensor) -> bool:
    """True when every zero-point word is 0x88888888 (GRACE's symmetric codes, zero point 8)."""
    return bool((qzeros == GRACE_ZERO_WORD).all())
