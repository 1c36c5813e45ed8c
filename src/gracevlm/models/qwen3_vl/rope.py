"""Qwen3-VL positions: the 3-axis (t, h, w) position ids of a prompt, the decode offset, and the
interleaved M-RoPE cos/sin tables (spec section 8).

Prompt walk with a counter ``p``: a text token gets ``(p, p, p)``; an image's run of pad tokens with
merged grid ``(t, H, W)`` gets ``(p + f, p + r, p + c)`` row-major, then ``p += max(H, W)``. Decode token
``k`` (0-based) gets ``prompt_len + k + delta`` on all axes, ``delta = max_position + 1 - prompt_len``.
"""
from __future__ import annotations

import torch
from torch import nn

from ...errors import InputError


def mrope_positions(ids, grids, image_token_id: int, merge_size: int) -> tuple[torch.Tensor, int]:
    """``ids [T]`` with each image's pad run in order, ``grids`` one ``(t, h, w)`` patch grid per image ->
    ``(positions [3, T] int64, delta)``."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    grids = [tuple(int(v) for v in g) for g in grids]
    is_pad = (ids == image_token_id).tolist()
    out = torch.empty(3, len(is_pad), dtype=torch.long)
    p, i, image = 0, 0, 0
    n = len(is_pad)
    while i < n:
        if not is_pad[i]:
            j = i
            while j < n and not is_pad[j]:
                j += 1
            out[:, i:j] = torch.arange(p, p + j - i)
            p += j - i
            i = j
            continue
        if image >= len(grids):
            raise InputError(f"the prompt has more image tokens than the {len(grids)} image(s) given cover")
        t, h, w = grids[image]
        if h % merge_size or w % merge_size:
            raise InputError(f"image {image}: grid {h}x{w} is not a multiple of the merge size {merge_size}")
        gh, gw = h // merge_size, w // merge_size
        count = t * gh * gw
        if i + count > n or not all(is_pad[i:i + count]):
            raise InputError(f"image {image} needs {count} consecutive image tokens for its {t}x{h}x{w} grid")
        f, r, c = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        out[0, i:i + count] = p + f.flatten()
        out[1, i:i + count] = p + r.flatten()
        out[2, i:i + count] = p + c.flatten()
        p += max(gh, gw)
        i += count
        image += 1
    if image != len(grids):
        raise InputError(f"{len(grids)} image(s) given but the prompt has image tokens for {image}")
    delta = int(out.max()) + 1 - n if n else 0
    return out, delta


def decode_positions(cache_positions: torch.Tensor, delta) -> torch.Tensor:
    """Rope positions ``[3, B, T]`` of decode tokens at cache indexes ``[B, T]``; ``delta`` an int or ``[B]``."""
    d = torch.as_tensor(delta, dtype=torch.long, device=cache_positions.device).reshape(-1, 1)
    return (cache_positions + d).unsqueeze(0).expand(3, -1, -1)


def mrope_axes(head_dim: int, section: list[int]) -> torch.Tensor:
    """Which axis (0 = t, 1 = h, 2 = w) drives each of the ``head_dim/2`` frequencies (interleaved)."""
    j = torch.arange(head_dim // 2)
    axis = torch.zeros_like(j)
    axis[(j % 3 == 1) & (j < 3 * section[1])] = 1
    axis[(j % 3 == 2) & (j < 3 * section[2])] = 2
    return axis


class MRotary(nn.Module):
    """Interleaved M-RoPE: ``positions [3, B, T]`` -> ``cos, sin [B, T, head_dim]`` float32."""

    def __init__(self, head_dim: int, theta: float, section: list[int]):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("axes", mrope_axes(head_dim, section), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 2:
            positions = positions.unsqueeze(0).expand(3, -1, -1)
        freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq  # [3, B, T, d/2]
        index = self.axes.view(1, 1, 1, -1).expand(1, *freqs.shape[1:])
        freqs = freqs.gather(0, index)[0]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()
