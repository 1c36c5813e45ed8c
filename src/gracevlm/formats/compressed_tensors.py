"""compressed-tensors ``pack-quantized`` W4A16: the codec between its tensors and AWQ GEMM triples.

Pure tensor code (reference/formats.md (f)): ``weight_packed`` int32 ``[O, I/8]`` holds ``u = q + 8`` as
sequential nibbles along the input dim (element ``i`` in word ``i // 8`` at bits ``4 * (i % 8)``),
``weight_scale [O, I/g]``, ``weight_shape = [O, I]``, and for asymmetric layers ``weight_zero_point`` int32
``[O/8, I/g]`` = the signed zero point ``z - 8`` packed the same way along the *output* dim. Dequant
``W = (q - zp) * s = (u - z) * s``: exactly the AWQ triple.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import CheckpointError, FormatError
from .awq import pack_awq

CT_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int64)


def pack_sequential(u: torch.Tensor) -> torch.Tensor:
    """uint8 ``[R, C]`` values 0..15 -> int32 ``[R, ceil(C/8)]``, element ``c`` at word ``c // 8``, bits
    ``4 * (c % 8)`` (compressed-tensors ``pack_to_int32`` order; a short last word is zero-padded)."""
    rows, cols = u.shape
    pad = (-cols) % 8
    v = u.to(torch.int64)
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    words = (v.view(rows, -1, 8) << _SHIFTS).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_sequential(words: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of ``pack_sequential``: int32 ``[R, W]`` -> uint8 ``[R, cols]``."""
    nib = (words.to(torch.int64).unsqueeze(-1) >> _SHIFTS) & 0xF
    return nib.reshape(words.shape[0], -1)[:, :cols].to(torch.uint8)


@dataclass
class CtTensors:
    weight_packed: torch.Tensor
    weight_scale: torch.Tensor
    weight_shape: torch.Tensor
    weight_zero_point: torch.Tensor | None = None


def codes_to_ct(u: torch.Tensor, zeros: torch.Tensor | None, scales: torch.Tensor) -> CtTensors:
    """Codes ``u [O, I]`` (0..15), zero points ``zeros [O, I/g]`` (None = symmetric, all 8) and scales
    ``[O, I/g]`` -> compressed-tensors tensors. Exact: nibbles are ``u``, scales are copied."""
    out_f, in_f = u.shape
    zp = None
    if zeros is not None:
        zp = pack_sequential(zeros.t().contiguous()).t().contiguous()  # packed along the output dim
    return CtTensors(pack_sequential(u), scales.contiguous(), torch.tensor([out_f, in_f], dtype=torch.int64), zp)


def ct_to_awq(weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_shape: torch.Tensor | None,
              weight_zero_point: torch.Tensor | None, group_size: int, name: str = "layer"):
    """compressed-tensors pack-quantized tensors -> AWQ GEMM ``(qweight, qzeros, scales)`` (exact)."""
    if weight_packed.dtype != torch.int32 or weight_packed.dim() != 2:
        raise FormatError(f"{name}.weight_packed must be a 2-D int32 tensor, got {weight_packed.dtype} "
                          f"{tuple(weight_packed.shape)}")
    out_f = weight_packed.shape[0]
    in_f = int(weight_shape[1]) if weight_shape is not None else weight_packed.shape[1] * 8
    if weight_shape is not None and int(weight_shape[0]) != out_f:
        raise FormatError(f"{name}.weight_shape {weight_shape.tolist()} does not match weight_packed rows {out_f}")
    if in_f % group_size or tuple(weight_scale.shape) != (out_f, in_f // group_size):
        raise FormatError(f"{name}.weight_scale has shape {tuple(weight_scale.shape)}, expected "
                          f"{(out_f, in_f // group_size)} for [{out_f}, {in_f}] and group_size {group_size}")
    if out_f % 8:
        raise FormatError(f"{name}: out_features {out_f} is not a multiple of 8; AWQ GEMM cannot hold it")
    u = unpack_sequential(weight_packed, in_f)  # [O, I]
    n_groups = in_f // group_size
    if weight_zero_point is None:
        z = torch.full((n_groups, out_f), 8, dtype=torch.uint8)
    else:
        # stored nibble = signed zero point + 8 = the AWQ zero point z itself
        z = unpack_sequential(weight_zero_point.t().contiguous(), out_f)  # [I/g, O]
        if tuple(z.shape) != (n_groups, out_f):
            raise FormatError(f"{name}.weight_zero_point has shape {tuple(weight_zero_point.shape)}, expected "
                              f"{((out_f + 7) // 8, n_groups)}")
    qweight, qzeros = pack_awq(u.t().contiguous(), z)
    return qweight, qzeros, weight_scale.t().contiguous()



def ct_quantization_config(group_size: int, ignore: list[str], symmetric: bool = True, bits: int = 4) -> dict:
    """``quantization_config`` for W4A16 (``bits=4``) or W8A16 (``bits=8``) ``pack-quantized`` linears
    (formats.md (f)); every ``Linear`` is a target (vLLM: ``LinearBase``) except those ``ignore`` names:
    compressed-tensors' ``match_name`` compares a plain entry for *equality* with the module name and a ``re:``
    entry with ``re.match`` (the model family supplies the list)."""
    return {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"], "format": "pack-quantized",
            "weights": {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group",
                        "group_size": group_size, "dynamic": False, "actorder": None, "observer": "minmax",
                        "block_structure": None, "observer_kwargs": {}},
            "input_activations": None, "output_activations": None}},
        "ignore": list(ignore),
        "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {},
        "global_compression_ratio": None,
    }




def ct_scheme(qc: dict, source: str, bits_allowed: tuple[int, ...] = (4,)) -> tuple[int, int, bool]:
    """(bits, group_size, symmetric) of a weight-only ``pack-quantized`` group ``quantization_config`` whose bit
    width is one of ``bits_allowed``; CheckpointError naming anything else (other formats, activation
    quantization, several settings)."""
    fmt = qc.get("format")
    groups = qc.get("config_groups") or {}
    allowed = "/".join(f"W{b}A16" for b in bits_allowed)
    if not groups:
        raise CheckpointError(f"{source}: compressed-tensors quantization_config has no config_groups")
    settings = set()
    for name, grp in groups.items():
        w = grp.get("weights") or {}
        gfmt = grp.get("format") or fmt
        if gfmt != "pack-quantized":
            raise CheckpointError(f"{source}: compressed-tensors format {gfmt!r} is not supported; only {allowed} "
                                  "'pack-quantized' is")
        if grp.get("input_activations"):
            raise CheckpointError(f"{source}: config group {name!r} quantizes activations; only weight-only "
                                  f"{allowed} is supported")
        if int(w.get("num_bits", 0)) not in bits_allowed or w.get("type", "int") != "int" or \
                w.get("strategy") != "group":
            raise CheckpointError(f"{source}: config group {name!r} is not {'- or '.join(map(str, bits_allowed))}-bit "
                                  f"int group quantization ({w}); only {allowed} group quantization is supported")
        if w.get("actorder") not in (None, False, "static"):
            raise CheckpointError(f"{source}: activation reordering ({w.get('actorder')!r}) is not supported")
        settings.add((int(w["num_bits"]), int(w["group_size"]), bool(w.get("symmetric", True))))
    if len(settings) != 1:
        raise CheckpointError(f"{source}: config groups use different settings {sorted(settings)}; one bit width "
                              "and group size for all quantized linears is supported")
    return settings.pop()


def ct_settings(qc: dict, source: str) -> tuple[int, bool]:
    """(group_size, symmetric) of a W4A16 ``pack-quantized`` ``quantization_config`` (``ct_scheme`` at 4 bits)."""
    _, group, symmetric = ct_scheme(qc, source, (4,))
    return group, symmetric
