"""GRACE QAT sidecar (``qat_quantized_weights.bin``) and its exact conversion to AWQ GEMM tensors.

The sidecar is a ``torch.save``d dict of tensors. For each quantized linear ``<m>``:
``<m>.weight`` ``[O, I]`` fake-quantized (``q * s`` in the training dtype), ``<m>.log_scale``
flat fp32 of length ``O * I / g`` (entry ``o * (I/g) + i // g``), optional ``<m>.bias`` ``[O]``.
Symmetric codes ``q`` lie in ``[-8, 7]``; the AWQ form stores ``u = q + 8`` with zero point 8.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import FormatError
from .awq import pack_awq

SIDECAR_NAME = "qat_quantized_weights.bin"


@dataclass
class AwqTensors:
    """One packed linear: ``qweight [I, O/8]`` int32, ``qzeros [I/g, O/8]`` int32, ``scales [I/g, O]``
    fp16, optional ``bias [O]`` fp16. ``max_code_error`` is the largest integer difference between the
    packed codes and the codes the weight implies (0 = exact); ``max_grid_residual`` is the largest
    distance of ``W / s`` from its nearest integer (only dtype rounding when the weight is on the grid)."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None
    group_size: int
    max_code_error: int = 0
    max_grid_residual: float = 0.0


@dataclass
class QatLayer:
    """The sidecar entries of one quantized linear."""

    weight: torch.Tensor
    log_scale: torch.Tensor
    bias: torch.Tensor | None = None


def read_qat_sidecar(path: str | os.PathLike) -> dict[str, QatLayer]:
    """Load a sidecar safely (``weights_only=True``) and group it by module name.

    The set of ``*.log_scale`` keys is the authoritative list of quantized layers.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FormatError(f"QAT sidecar not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        raise FormatError(f"cannot read QAT sidecar {path}: {exc.__class__.__name__}: {exc}. "
                          "It must be a torch.save'd dict of tensors (no pickled objects)") from exc
    if not isinstance(obj, dict):
        raise FormatError(f"QAT sidecar {path} holds a {type(obj).__name__}, expected a dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise FormatError(f"QAT sidecar {path}: entries {bad[:3]} are not str -> Tensor")
    layers: dict[str, QatLayer] = {}
    for key in sorted(obj):
        if not key.endswith(".log_scale"):
            continue
        name = key[: -len(".log_scale")]
        if f"{name}.weight" not in obj:
            raise FormatError(f"QAT sidecar {path}: {key} has no matching {name}.weight")
        layers[name] = QatLayer(obj[f"{name}.weight"], obj[key], obj.get(f"{name}.bias"))
    if not layers:
        raise FormatError(f"QAT sidecar {path} has no '*.log_scale' entries; is this a GRACE QAT sidecar?")
    return layers


def _grid_tolerance(dtype: torch.dtype, qmax: int) -> float:
    """How far ``W / s`` may sit from an integer when W is ``q * s`` rounded to ``dtype``."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return max(2.0 * qmax * eps, 1e-3)


def symmetric_to_awq(q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                     bits: int = 4) -> AwqTensors:
    """Pack signed codes ``q [O, I]`` in ``[-8, 7]`` with scales ``[O, I/g]`` into AWQ tensors
    (zero point 8, scales cast to fp16, bias to fp16)."""
    if bits != 4:
        raise FormatError(f"bits={bits}: the AWQ GEMM layout packs 4-bit codes only")
    out_f, in_f = q.shape
    n_groups = scales.shape[1]
    if scales.shape[0] != out_f or n_groups == 0 or in_f % n_groups:
        raise FormatError(f"scales shape {tuple(scales.shape)} does not match codes {tuple(q.shape)}")
    u = (q.to(torch.int16) + 8).to(torch.uint8).t().contiguous()  # [I, O]
    zeros = torch.full((n_groups, out_f), 8, dtype=torch.uint8)
    qweight, qzeros = pack_awq(u, zeros)
    return AwqTensors(qweight, qzeros, scales.t().contiguous().to(torch.float16),
                      None if bias is None else bias.detach().to(torch.float16),
                      group_size=in_f // n_groups)


def qat_to_awq(weight: torch.Tensor, log_scale: torch.Tensor, bias: torch.Tensor | None = None,
               bits: int = 4, group_size: int = 128, check: bool = True, name: str = "layer") -> AwqTensors:
    """Recover GRACE's integer codes from a fake-quantized weight and pack them as AWQ GEMM tensors.

    ``q = clamp(round(W / exp(log_scale)), -8, 7)``. With ``check=True`` (default) raise FormatError when
    the codes do not reproduce the weight (clamped codes, or W off the quantization grid).
    Like GRACE's QAT module, a layer whose in_features is not divisible by ``group_size`` uses one
    group per row; the group size actually used is derived from ``log_scale``'s length.
    """
    if bits != 4:
        raise FormatError(f"{name}: bits={bits} is not supported; GRACE AWQ packing is 4-bit")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise FormatError(f"{name}.weight must be a 2-D floating tensor [out, in], got "
                          f"{getattr(weight, 'dtype', type(weight).__name__)} {tuple(getattr(weight, 'shape', ()))}")
    if not isinstance(log_scale, torch.Tensor) or not log_scale.dtype.is_floating_point:
        raise FormatError(f"{name}.log_scale must be a floating tensor")
    out_f, in_f = weight.shape
    if out_f % 8:
        raise FormatError(f"{name}: out_features={out_f} is not a multiple of 8; it cannot be AWQ-packed")
    numel = log_scale.numel()
    if numel == 0 or numel % out_f or in_f % (numel // out_f):
        raise FormatError(f"{name}.log_scale has {numel} entries, which is not out_features * k with k "
                          f"dividing in_features ({out_f} x {in_f}); truncated or mismatched sidecar?")
    n_groups = numel // out_f
    g = in_f // n_groups
    expected_g = group_size if in_f % group_size == 0 else in_f
    if g != expected_g:
        raise FormatError(f"{name}: log_scale implies group size {g}, expected {expected_g} "
                          f"(group_size={group_size}, in_features={in_f})")
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s = torch.exp(log_scale.detach().to(torch.float32)).reshape(out_f, n_groups)
    ratio = weight.detach().to(torch.float32).view(out_f, n_groups, g) / s.unsqueeze(-1)
    if not torch.isfinite(ratio).all():
        raise FormatError(f"{name}: weight / scale is not finite (zero or non-finite scales in log_scale)")
    nearest = torch.round(ratio)
    q = nearest.clamp(qmin, qmax)
    residual = float((ratio - nearest).abs().max()) if ratio.numel() else 0.0
    code_err = int((nearest - q).abs().max()) if q.numel() else 0
    packed = symmetric_to_awq(q.to(torch.int8).view(out_f, in_f), s, bias, bits)
    packed.max_code_error, packed.max_grid_residual = code_err, residual
    if check:
        tol = _grid_tolerance(weight.dtype, -qmin)
        if code_err != 0:
            raise FormatError(f"{name}: recovered codes exceed [{qmin}, {qmax}] by up to {code_err}; the weight "
                              "is not a GRACE fake-quantized weight for these scales (pass check=False to clamp)")
        if residual > tol:
            raise FormatError(f"{name}: weight / scale lies up to {residual:.4f} away from the integer grid "
                              f"(tolerance {tol:.4f} for {weight.dtype}); the weight does not match log_scale "
                              "(pass check=False to round anyway)")
    return packed
