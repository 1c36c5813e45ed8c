"""Qwen3 decoder of Qwen3-VL with a KV cache (``models.kv_cache``), driven like ``model.llama.LlamaForCausalLM``.

QK-norm (RMSNorm over head_dim, before RoPE), GQA, SwiGLU, interleaved M-RoPE from 3-axis positions,
deepstack features added after the first decoder layers at the visual positions, and a tied ``lm_head``
that shares the embedding matrix (one copy in memory). Linear layers are plain attributes, so
``nn.Linear`` or ``gracevlm.nn.Int4Linear`` fit alike.

``forward(embeds [B, T, D], positions [B, T], cache, ...)``: ``positions`` are *cache* indexes (where
K/V are written; a query at index p sees indexes <= p of its own slot), ``rope_positions [3, B, T]`` the
M-RoPE positions (default: ``positions`` on all three axes, i.e. text with ``delta = 0``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..decode_stack import decode_all_layers
from ..kv_cache import KVCache, KVPool, RowKV, slot_list
from ..llama import (MLP, RMSNorm, _attend, cached_attention, fuse_decoder_projections, fused_decode_attention,
                     rotate_heads)
from .config import Qwen3VLTextConfig
from .rope import MRotary


@dataclass
class Qwen3Spec:
    """Decoder sizes (names as ``LlamaSpec``, so ``KVCache`` and ``MLP`` take it)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: list[int]
    tie_word_embeddings: bool = False

    @classmethod
    def from_config(cls, t: Qwen3VLTextConfig, tie_word_embeddings: bool) -> "Qwen3Spec":
        return cls(hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                   num_layers=t.num_hidden_layers, num_heads=t.num_attention_heads,
                   num_kv_heads=t.num_key_value_heads, head_dim=t.head_dim, vocab_size=t.vocab_size,
                   rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta, mrope_section=list(t.mrope_section),
                   tie_word_embeddings=tie_word_embeddings)


@dataclass
class VisualInjection:
    """Deepstack input: ``mask [B, T]`` marks the image tokens; ``features[j] [n_visual, D]`` is added at
    those positions (in order) after decoder layer ``j``."""

    mask: torch.Tensor
    features: list[torch.Tensor]


class Qwen3Attention(nn.Module):
    def __init__(self, spec: Qwen3Spec):
        super().__init__()
        self.spec = spec
        d = spec.head_dim
        self.q_proj = nn.Linear(spec.hidden_size, spec.num_heads * d, bias=False)
        self.k_proj = nn.Linear(spec.hidden_size, spec.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(spec.hidden_size, spec.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(spec.num_heads * d, spec.hidden_size, bias=False)
        self.q_norm = RMSNorm(d, spec.rms_norm_eps)
        self.k_norm = RMSNorm(d, spec.rms_norm_eps)

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int, rows: list[RowKV] | None,
                mask) -> torch.Tensor:
        """``rows``: each batch row's slot and span (``KVCache.rows``); see ``llama.cached_attention``."""
        b, t, _ = x.shape
        s = self.spec
        if hasattr(self, "qkv_proj"):  # fused by fuse_decoder_projections
            qkv = self.qkv_proj(x)
            out = fused_decode_attention(s, qkv, cos, sin, cache, layer, rows, self.q_norm, self.k_norm)
            if out is not None:
                return self.o_proj(out)
            q, k, v = qkv.split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = rotate_heads(self.q_norm(q.reshape(b, t, s.num_heads, s.head_dim)), cos, sin)
        k = rotate_heads(self.k_norm(k.reshape(b, t, s.num_kv_heads, s.head_dim)), cos, sin)
        v = v.reshape(b, t, s.num_kv_heads, s.head_dim).transpose(1, 2)
        groups = s.num_heads // s.num_kv_heads
        if cache is None:  # cache-free: attend within these tokens with `mask [B, T, T]`
            out = _attend(q, k, v, mask.unsqueeze(1), groups)
        else:
            out = cached_attention(q, k, v, cache, layer, rows, groups)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, s.num_heads * s.head_dim))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, spec: Qwen3Spec):
        super().__init__()
        self.self_attn = Qwen3Attention(spec)
        self.mlp = MLP(spec)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, x, cos, sin, cache, layer, rows, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, rows, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3LanguageModel(nn.Module):
    """Module names follow transformers' ``model.language_model.*`` (plus ``lm_head``)."""

    def __init__(self, spec: Qwen3Spec):
        super().__init__()
        self.spec = spec
        weight = torch.empty(spec.vocab_size, spec.hidden_size)
        if not weight.is_meta:
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.tie_lm_head()
        self.rotary = MRotary(spec.head_dim, spec.rope_theta, spec.mrope_section)

    def tie_lm_head(self) -> None:
        """Make ``lm_head`` compute with the embedding matrix itself (no second copy)."""
        self.lm_head.weight = self.embed_tokens.weight

    def fuse_projections(self) -> int:
        """q/k/v and gate/up as single fused linears (``llama.fuse_decoder_projections``; exact)."""
        return fuse_decoder_projections(self.layers)

    def new_cache(self, slots: int, max_len: int, dtype: torch.dtype | None = None, device=None,
                  pool: KVPool | None = None) -> KVCache:
        w = self.embed_tokens.weight
        return KVCache(self.spec, slots, max_len, dtype or w.dtype, device or w.device, pool)

    def embed(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.embed_tokens(ids).to(dtype)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache | None,
                slots: torch.Tensor | None = None, logits_for: str = "last",
                rope_positions: torch.Tensor | None = None,
                visual: VisualInjection | None = None, rows_alone: bool = False) -> torch.Tensor:
        """Logits float32 ``[B, V]`` of each row's last token (``"last"``) or ``[B, T, V]`` (``"all"``).
        With ``cache=None`` the tokens attend causally among themselves (``positions`` then only order them).
        ``rows_alone`` (decode, T = 1): each row's logits are bitwise those it gets as a lone sequence
        (per-row attention span; ``lm_head`` per row unless it is row-invariant)."""
        b, t, _ = embeds.shape
        if rows_alone and (t != 1 or cache is None):
            raise ValueError("rows_alone is for cached decode steps (one token per row)")
        if cache is None:
            mask = (positions.unsqueeze(-1) >= positions.unsqueeze(1))  # [B, T, T]
            rows = None
        else:
            span = int(positions.max()) + 1
            mask = torch.arange(span, device=positions.device).view(1, 1, span) <= positions.unsqueeze(-1)
            rows = cache.rows(slot_list(slots, b), positions, mask)
        cos, sin = self.rotary(rope_positions if rope_positions is not None else positions)
        n_inject = len(visual.features) if visual is not None else 0
        x = None if n_inject else decode_all_layers(self, self.layers, self.spec, embeds, cos, sin, cache, rows)
        if x is None:
            x = embeds
            for i, layer in enumerate(self.layers):
                x = layer(x, cos, sin, cache, i, rows, mask)
                if i < n_inject:
                    x = x.clone()
                    x[visual.mask] = x[visual.mask] + visual.features[i].to(x.dtype)
        if logits_for == "none":  # only the cache is filled (LlamaForCausalLM.forward)
            return None
        if logits_for == "last":
            x = x[:, -1:]
        x = self.norm(x)
        head_alone = rows_alone and b > 1 and not (getattr(self.lm_head, "rows_independent", None)
                                                         and self.lm_head.rows_independent(b))
        logits = torch.cat([self.logits(x[r:r + 1]) for r in range(b)]) if head_alone else self.logits(x)
        return logits[:, -1] if logits_for == "last" else logits

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        head = self.lm_head
        return head(x.to(getattr(head, "compute_dtype", head.weight.dtype))).to(torch.float32)
