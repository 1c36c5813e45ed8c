"""W8 (symmetric int8 codes, per-group fp32 scales) codecs: exact code recovery from a GRACE QAT W8 layer,
and compressed-tensors ``pack-quantized`` 8-bit packing.

Conventions: codes ``q`` int8 ``[O, I]`` in ``[-128, 127]``; groups of ``g`` consecutive inputs of a row;
scales ``s`` fp32 ``[O, I/g]``; the weight is ``W[o, k] = q[o, k] * s[o, k // g]`` (fp32 product).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import FormatError

QMIN, QMAX = -128, 127


@dataclass
class Int8Codes:
    """One W8 linear: ``qweight`` int8 [O, I], ``scales`` fp32 [O, I/g], the ``log_scale`` it came from
    (flat, as stored; None when built from scales), optional ``bias``, ``group_size``."""

    qweight: torch.Tensor
    scales: torch.Tensor
    log_scale: torch.Tensor | None
    bias: torch.Tensor | None
    group_size: int


def group_size_of(in_f: int, out_f: int, n_scales: int, group_size: int, name: str) -> int:
    """The group size implied by ``n_scales`` scale entries; GRACE uses one group per row when
    ``in_f % group_size != 0``. Raises FormatError when they do not match."""
    if n_scales == 0 or n_scales % out_f or in_f % (n_scales // out_f):
        raise FormatError(f"{name}: {n_scales} scale entries is not out_features * k with k dividing "
                          f"in_features ({out_f} x {in_f}); truncated or mismatched sidecar?")
    g = in_f // (n_scales // out_f)
    expected = group_size if in_f % group_size == 0 else in_f
    if g != expected:
        raise FormatError(f"{name}: scales imply group size {g}, expected {expected} "
                          f"(group_size={group_size}, in_features={in_f})")
    return g


def qat_to_int8(weight: torch.Tensor, log_scale: torch.Tensor, bias: torch.Tensor | None = None,
                group_size: int = 128, name: str = "layer") -> Int8Codes:
    """Recover a GRACE QAT W8 layer's codes exactly from its baked weight ``W_q`` [O, I] and ``log_scale``.

    ``s = exp(float32(log_scale))``, ``q = round(float32(W_q) / s)``; refused (FormatError naming the layer
    and its first bad element) unless every ``q`` lies in [-128, 127] and ``dtype(q * s) == W_q`` element by
    element (``q * s`` in fp32, rounded to W_q's dtype), i.e. unless the codes reproduce the stored weight.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise FormatError(f"{name}.weight must be a 2-D floating tensor [out, in], got "
                          f"{getattr(weight, 'dtype', type(weight).__name__)} {tuple(getattr(weight, 'shape', ()))}")
    if not isinstance(log_scale, torch.Tensor) or not log_scale.dtype.is_floating_point:
        raise FormatError(f"{name}.log_scale must be a floating tensor")
    out_f, in_f = weight.shape
    g = group_size_of(in_f, out_f, log_scale.numel(), group_size, name)
    n_groups = in_f // g
    s = torch.exp(log_scale.detach().reshape(-1).to(torch.float32)).reshape(out_f, n_groups)
    if not (torch.isfinite(s).all() and (s > 0).all()):
        raise FormatError(f"{name}: exp(log_scale) has zero or non-finite entries")
    w = weight.detach().to(torch.float32)
    ratio = w.view(out_f, n_groups, g) / s.unsqueeze(-1)
    q = torch.round(ratio).clamp(QMIN, QMAX).view(out_f, in_f)
    baked = (q.view(out_f, n_groups, g) * s.unsqueeze(-1)).view(out_f, in_f).to(weight.dtype)
    bad = (baked != weight.detach()) | ~torch.isfinite(w)
    if bad.any():
        o, i = (int(v) for v in bad.nonzero()[0])
        r = float(ratio.view(out_f, in_f)[o, i])
        why = (f"W / s = {r:.4f} is outside [{QMIN}, {QMAX}]" if abs(r) > 128.5 else
               f"q = {int(q[o, i])} gives {weight.dtype}(q * s) = {float(baked[o, i])!r}")
        raise FormatError(f"{name}: the weight is not on the int8 grid of exp(log_scale): element [{o}, {i}] = "
                          f"{float(weight[o, i])!r}, s = {float(s[o, i // g])!r}, {why} "
                          f"({int(bad.sum())} such elements); wrong sidecar or not a GRACE W8 layer?")
    return Int8Codes(q.to(torch.int8).contiguous(), s.contiguous(), log_scale.detach().reshape(-1).clone(),
                     None if bias is None else bias.detach().clone(), g)


def int8_to_qat(codes: Int8Codes, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_q, log_scale)``: the baked weight ``dtype(q * s)`` and the stored log_scale, the inverse of
    ``qat_to_int8`` (bit-exact for a layer that came from it). Needs the log_scale (FormatError otherwise)."""
    if codes.log_scale is None:
        raise FormatError("this W8 layer was built from scales, not a GRACE log_scale; it has no QAT form")
    out_f, in_f = codes.qweight.shape
    g = codes.group_size
    w = (codes.qweight.to(torch.float32).view(out_f, in_f // g, g) * codes.scales.unsqueeze(-1)).view(out_f, in_f)
    return w.to(dtype), codes.log_scale.clone()


# ---- compressed-tensors pack-quantized, 8 bits ------------------------------------------------------------

def pack_quantized_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 codes [O, I] -> compressed-tensors ``weight_packed`` int32 [O, ceil(I/4)]: ``u = q + 128`` as
    bytes, element i of a row in word i // 4 at bits 8 * (i % 4) (sequential, little end first; the row
    zero-padded to a multiple of 4)."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise FormatError(f"pack_quantized_int8 needs int8 codes [out, in], got {q.dtype} {tuple(q.shape)}")
    out_f, in_f = q.shape
    u = (q.to(torch.int32) + 128).to(torch.int64)
    pad = (-in_f) % 4
    if pad:
        u = torch.cat([u, torch.zeros(out_f, pad, dtype=torch.int64)], 1)
    u = u.view(out_f, -1, 4)
    words = u[..., 0] | u[..., 1] << 8 | u[..., 2] << 16 | u[..., 3] << 24
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_quantized_int8(packed: torch.Tensor, shape: tuple[int, int] | torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_quantized_int8``: ``weight_packed`` int32 [O, ceil(I/4)] and ``weight_shape`` [O, I]
    -> int8 codes [O, I]. Raises FormatError on a shape mismatch."""
    out_f, in_f = (int(v) for v in (shape.tolist() if isinstance(shape, torch.Tensor) else shape))
    if packed.dtype != torch.int32 or tuple(packed.shape) != (out_f, (in_f + 3) // 4):
        raise FormatError(f"weight_packed is {packed.dtype} {tuple(packed.shape)}, expected int32 "
                          f"[{out_f}, {(in_f + 3) // 4}] for weight_shape [{out_f}, {in_f}]")
    w = packed.to(torch.int64) & 0xFFFFFFFF
    u = torch.stack([(w >> (8 * j)) & 0xFF for j in range(4)], -1).view(out_f, -1)[:, :in_f]
    return (u - 128).to(torch.int8).contiguous()


def to_compressed_tensors_w8(codes: Int8Codes, scale_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The compressed-tensors W8A16 ``pack-quantized`` tensors of one linear (names without the module prefix):
    ``weight_packed``, ``weight_scale`` [O, I/g] in ``scale_dtype`` (fp32 keeps the scales exact), ``weight_shape``."""
    out_f, in_f = codes.qweight.shape
    return {"weight_packed": pack_quantized_int8(codes.qweight),
            "weight_scale": codes.scales.to(scale_dtype).contiguous(),
            "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64)}


def from_compressed_tensors_w8(tensors: dict[str, torch.Tensor], group_size: int = 128,
                               bias: torch.Tensor | None = None, name: str = "layer") -> Int8Codes:
    """``Int8Codes`` from a linear's pack-quantized tensors (``weight_packed``, ``weight_scale``, ``weight_shape``)."""
    missing = [k for k in ("weight_packed", "weight_scale", "weight_shape") if k not in tensors]
    if missing:
        raise FormatError(f"{name}: compressed-tensors W8 linear lacks {missing}")
    q = unpack_quantized_int8(tensors["weight_packed"], tensors["weight_shape"])
    out_f, in_f = q.shape
    scale = tensors["weight_scale"]
    if scale.dim() != 2 or scale.shape[0] != out_f:
        raise FormatError(f"{name}.weight_scale is {tuple(scale.shape)}, expected [{out_f}, in/g]")
    g = group_size_of(in_f, out_f, scale.numel(), group_size, name)
    return Int8Codes(q, scale.to(torch.float32).contiguous(), None, bias, g)
