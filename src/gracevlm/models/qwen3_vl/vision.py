"""Qwen3-VL vision tower: patch embedding (the Conv3d as a linear map), the learned position table
resampled bilinearly to each grid, 2-D RoPE, ViT blocks with attention restricted to each image (frame),
the 2x2 merger and the deepstack mergers (spec section 7).

``forward(pixel_values [n, C*T*P*P], grid_thw [k, 3])`` -> ``(embeds [n/m^2, Dout], deepstack)``, ``deepstack``
one ``[n/m^2, Dout]`` tensor per entry of ``deepstack_visual_indexes``; rows follow the processor's
merge-block patch order, images one after another.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InputError
from .config import Qwen3VLVisionConfig


def _activation(name: str):
    return {"gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu,
            "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "silu": F.silu}[name]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def _block_order(x: torch.Tensor, h: int, w: int, m: int) -> torch.Tensor:
    """``[h*w, ...]`` in row-major patch order -> merge-block order ``(bh, bw, ih, iw)``."""
    rest = x.shape[1:]
    return x.reshape(h // m, m, w // m, m, *rest).transpose(1, 2).reshape(h * w, *rest)


def rope_inv_freq(cfg: Qwen3VLVisionConfig) -> torch.Tensor:
    """The ``head_dim/4`` frequencies of the 2-D RoPE (a computed buffer, never a checkpoint tensor)."""
    quarter = cfg.head_dim // 2
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, quarter, 2, dtype=torch.float) / quarter))


class VisionAttention(nn.Module):
    def __init__(self, cfg: Qwen3VLVisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, cos, sin, lengths: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # [n, heads, hd] each
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        qf, kf = q.float(), k.float()
        q = (qf * c + _rotate_half(qf) * s).to(q.dtype)
        k = (kf * c + _rotate_half(kf) * s).to(k.dtype)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, n, hd]
        out = torch.cat([F.scaled_dot_product_attention(qi, ki, vi) for qi, ki, vi in
                         zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))], dim=2)
        return self.proj(out[0].transpose(0, 1).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: Qwen3VLVisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = _activation(cfg.hidden_act)

    def forward(self, x):
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: Qwen3VLVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, lengths):
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """``m x m`` consecutive patches -> one ``Dout`` token. The final merger normalizes each patch before
    the merge (``postshuffle_norm=False``); the deepstack mergers normalize the merged vector."""

    def __init__(self, cfg: Qwen3VLVisionConfig, postshuffle_norm: bool):
        super().__init__()
        self.merged = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.merged if postshuffle_norm else cfg.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged, self.merged)
        self.linear_fc2 = nn.Linear(self.merged, cfg.out_hidden_size)

    def forward(self, x):
        x = self.norm(x.reshape(-1, self.merged)) if self.postshuffle_norm else self.norm(x).reshape(-1, self.merged)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionTower(nn.Module):
    def __init__(self, cfg: Qwen3VLVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
        self.patch_embed = nn.Linear(self.patch_dim, cfg.hidden_size)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, postshuffle_norm=False)
        self.deepstack_merger_list = nn.ModuleList(PatchMerger(cfg, postshuffle_norm=True)
                                                   for _ in cfg.deepstack_visual_indexes)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def check_grids(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> None:
        m = self.cfg.spatial_merge_size
        for i, (t, h, w) in enumerate(grids):
            if min(t, h, w) < 1 or h % m or w % m:
                raise InputError(f"image {i}: grid ({t}, {h}, {w}) must be positive with h and w multiples of "
                                 f"the merge size {m}")
        rows = sum(t * h * w for t, h, w in grids)
        if pixel_values.dim() != 2 or pixel_values.shape != (rows, self.patch_dim):
            raise InputError(f"pixel_values must be [{rows}, {self.patch_dim}] for grids {grids}, got "
                             f"{list(pixel_values.shape)}")

    def position_embeddings(self, t: int, h: int, w: int) -> torch.Tensor:
        """The ``n x n`` table resampled bilinearly (align_corners) to ``h x w``, merge-block order, ``t`` times."""
        n = self.cfg.grid_side
        dev = self.pos_embed.weight.device
        r = torch.linspace(0, n - 1, h, device=dev)
        c = torch.linspace(0, n - 1, w, device=dev)
        r0, c0 = r.floor().long(), c.floor().long()
        r1, c1 = (r0 + 1).clamp(max=n - 1), (c0 + 1).clamp(max=n - 1)
        dr, dc = (r - r0)[:, None], (c - c0)[None, :]
        taps = [(r0[:, None] * n + c0[None, :], (1 - dr) * (1 - dc)), (r0[:, None] * n + c1[None, :], (1 - dr) * dc),
                (r1[:, None] * n + c0[None, :], dr * (1 - dc)), (r1[:, None] * n + c1[None, :], dr * dc)]
        table = self.pos_embed.weight
        out = sum(table[idx.flatten()] * wt.flatten()[:, None].to(table.dtype) for idx, wt in taps)
        return _block_order(out, h, w, self.cfg.spatial_merge_size).repeat(t, 1)

    def rotary(self, t: int, h: int, w: int) -> torch.Tensor:
        """2-D RoPE angles ``[t*h*w, head_dim/2]`` (row then column frequencies), merge-block order."""
        rows = torch.arange(h, device=self.inv_freq.device).repeat_interleave(w)
        cols = torch.arange(w, device=self.inv_freq.device).repeat(h)
        rc = _block_order(torch.stack([rows, cols], dim=-1), h, w, self.cfg.spatial_merge_size).repeat(t, 1)
        return torch.cat([rc[:, :1] * self.inv_freq, rc[:, 1:] * self.inv_freq], dim=-1)

    def forward(self, pixel_values: torch.Tensor, grid_thw) -> tuple[torch.Tensor, list[torch.Tensor]]:
        grids = [tuple(int(v) for v in g) for g in torch.as_tensor(grid_thw).reshape(-1, 3).tolist()]
        self.check_grids(pixel_values, grids)
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        x = x + torch.cat([self.position_embeddings(*g) for g in grids]).to(x.dtype)
        angles = torch.cat([self.rotary(*g) for g in grids])
        emb = torch.cat([angles, angles], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        lengths = [h * w for t, h, w in grids for _ in range(t)]  # one attention segment per frame
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, lengths)
            if i in self.cfg.deepstack_visual_indexes:
                deepstack.append(self.deepstack_merger_list[self.cfg.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), deepstack
