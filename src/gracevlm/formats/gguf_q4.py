"""llama.cpp GGUF codec: Q4_0 blocks written straight from integer codes, and the q/k row permutation.

Pure tensor code (numpy/torch; the ``gguf`` package is only needed by the writer in ``gracevlm.export``).

Q4_0 (ggml ``block_q4_0``, 18 bytes per 32 weights of one row, reference/formats.md (e)): ``d`` fp16
little-endian, then ``qs[16]`` with byte ``j = u[j] | u[j + 16] << 4``; dequant ``x = d * (u - 8)``. A
GRACE group of ``g`` weights (``g % 32 == 0``) spans ``g / 32`` blocks that all take the group's fp16
scale as ``d``, and ``u = q + 8`` - so the file holds exactly the codes and scales of the checkpoint.

Row permutation. llama.cpp applies RoPE to adjacent pairs ``(2j, 2j+1)`` of a head while LLaMA/HF use
halves ``(j, j + d/2)``; its converter therefore reorders the rows of ``q_proj`` and ``k_proj`` inside
each head: new row ``2j + t`` of a head = old row ``t * d/2 + j`` (``t`` in {0, 1}). Scales are per row,
so permuting code rows and scale rows together stays exact.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import FormatError

Q4_0_BLOCK = 32
Q4_0_BYTES = 18


def qk_row_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Index ``perm`` with ``W_gguf = W_hf[perm]`` for a q or k projection with ``n_head`` heads."""
    if rows % n_head or (rows // n_head) % 2:
        raise FormatError(f"cannot split {rows} rows into {n_head} heads of even size")
    half = rows // n_head // 2
    return torch.arange(rows).view(n_head, 2, half).transpose(1, 2).reshape(-1)


def q4_0_from_codes(u: torch.Tensor, scales: torch.Tensor, group_size: int) -> np.ndarray:
    """Codes ``u [O, I]`` (0..15, zero point 8) and scales ``[O, I/g]`` -> Q4_0 bytes ``uint8 [O, I/32*18]``.

    Requires ``I % 32 == 0`` and ``g % 32 == 0``; the scales must be exactly representable in fp16
    (checked; GRACE scales are fp16 already)."""
    out_f, in_f = u.shape
    if in_f % Q4_0_BLOCK or group_size % Q4_0_BLOCK:
        raise FormatError(f"Q4_0 needs in_features and group size divisible by 32 (got {in_f}, {group_size})")
    s16 = scales.to(torch.float16)
    if not torch.equal(s16.to(scales.dtype), scales):
        raise FormatError("scales are not exactly representable in fp16; Q4_0 stores fp16 block scales")
    nb = in_f // Q4_0_BLOCK
    d = s16.repeat_interleave(group_size // Q4_0_BLOCK, dim=1)  # [O, nb]
    v = u.to(torch.uint8).reshape(out_f, nb, 2, 16)
    qs = v[:, :, 0, :] | (v[:, :, 1, :] << 4)  # [O, nb, 16]
    out = np.empty((out_f, nb, Q4_0_BYTES), dtype=np.uint8)
    out[:, :, :2] = d.contiguous().numpy().view(np.uint8).reshape(out_f, nb, 2)
    out[:, :, 2:] = qs.numpy()
    return out.reshape(out_f, nb * Q4_0_BYTES)


def q4_0_to_codes(raw: np.ndarray, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``q4_0_from_codes``: bytes ``[O, I/32*18]`` -> (``u [O, I]`` uint8, ``d [O, I/32]`` fp16)."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    out_f = raw.shape[0]
    nb = in_features // Q4_0_BLOCK
    blocks = raw.reshape(out_f, nb, Q4_0_BYTES)
    d = torch.from_numpy(blocks[:, :, :2].copy().view(np.float16).reshape(out_f, nb))
    qs = torch.from_numpy(blocks[:, :, 2:].copy())
    u = torch.stack([qs & 0xF, qs >> 4], dim=2).reshape(out_f, in_features)
    return u, d
