"""LLaMA decoder with a KV cache (``models.kv_cache``), written for generation (prefill + batched decode).

Linear layers are plain attributes (``q_proj`` ...), so ``nn.Linear`` or ``Int4Linear`` fit alike.
One forward path serves prefill, single decode and ragged batched decode: tokens carry their
absolute positions, K/V are written into the cache at those positions, and each query attends to
cache positions ``<= its own`` of its own sequence (slot), row by row over a contiguous view of that
slot's storage (``cached_attention``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import decode_layers, norm_rope
from ..kernels.attention import decode_attention, decode_block
from ..nn import Int4Linear, Int8Linear
from .decode_stack import decode_all_layers
from .kv_cache import KVCache, RowKV, slot_list

__all__ = ["KVCache", "LlamaForCausalLM", "LlamaSpec"]


@dataclass
class LlamaSpec:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_linear_factor: float = 1.0
    max_position_embeddings: int = 4096

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def _concat_linears(parts: list[nn.Module]) -> nn.Module:
    if all(isinstance(p, Int4Linear) for p in parts):
        return Int4Linear.concat(parts)
    if all(isinstance(p, Int8Linear) for p in parts):
        return Int8Linear.concat(parts)
    if all(type(p) is nn.Linear and p.bias is None for p in parts):
        fused = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=False,
                          device=parts[0].weight.device, dtype=parts[0].weight.dtype)
        fused.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
        return fused
    raise TypeError(f"cannot fuse {[type(p).__name__ for p in parts]}")


def fuse_decoder_projections(layers) -> int:
    """In each decoder layer, replace ``self_attn.{q,k,v}_proj`` by ``qkv_proj`` (with ``qkv_sizes``) and
    ``mlp.{gate,up}_proj`` by ``gate_up_proj``; returns how many groups were fused. Exact: the fused weights
    are the concatenated originals, and each output element is computed as before."""
    fused = 0
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not hasattr(attn, "qkv_proj"):
            parts = [attn.q_proj, attn.k_proj, attn.v_proj]
            attn.qkv_sizes = [p.out_features for p in parts]
            attn.qkv_proj = _concat_linears(parts)
            del attn.q_proj, attn.k_proj, attn.v_proj
            fused += 1
        if not hasattr(mlp, "gate_up_proj"):
            mlp.gate_up_proj = _concat_linears([mlp.gate_proj, mlp.up_proj])
            del mlp.gate_proj, mlp.up_proj
            fused += 1
    return fused


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = norm_rope.rms_norm(x, self.weight, self.eps)  # fp32 inference on CPU: one native call
        if out is not None:
            return out
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # torch's one-call RMSNorm: the same bits as the formula below in fp32, ~1/3 less dispatch per call
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Rotary(nn.Module):
    """Rotary embedding tables (LLaMA ``rotate_half`` convention), computed in float32."""

    def __init__(self, spec: LlamaSpec):
        super().__init__()
        d = spec.head_dim
        inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.factor = spec.rope_linear_factor

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = (positions.to(torch.float32) / self.factor).unsqueeze(-1) * self.inv_freq  # [B, T, d/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def rotate_heads(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [B, T, H, d]`` -> ``x * cos + rotate_half(x) * sin`` as ``[B, H, T, d]``; ``cos/sin [B, T, d]``.
    fp32 on CPU runs in one native call (``kernels.norm_rope.rotary``, the same bits)."""
    out = norm_rope.rotary(x, cos, sin)
    if out is not None:
        return out.transpose(1, 2)
    x = x.transpose(1, 2)
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, spec: LlamaSpec):
        super().__init__()
        self.spec = spec
        hd = spec.head_dim
        self.q_proj = nn.Linear(spec.hidden_size, spec.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(spec.hidden_size, spec.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(spec.hidden_size, spec.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(spec.num_heads * hd, spec.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int, rows: list[RowKV] | None,
                mask) -> torch.Tensor:
        """``rows``: each batch row's slot, span and mask (``KVCache.rows``); ``mask`` is used only without a
        cache: ``[B, T, T]``, the tokens attend among themselves."""
        b, t, _ = x.shape
        s = self.spec
        if hasattr(self, "qkv_proj"):
            qkv = self.qkv_proj(x)
            out = fused_decode_attention(s, qkv, cos, sin, cache, layer, rows)
            if out is not None:
                return self.o_proj(out)
            q, k, v = qkv.split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = rotate_heads(q.view(b, t, s.num_heads, s.head_dim), cos, sin)
        k = rotate_heads(k.reshape(b, t, s.num_kv_heads, s.head_dim), cos, sin)
        v = v.reshape(b, t, s.num_kv_heads, s.head_dim).transpose(1, 2)
        groups = s.num_heads // s.num_kv_heads
        if cache is None:  # cache-free (training / scoring): attend within these tokens, `mask [B, T, T]`
            out = _attend(q, k, v, mask.unsqueeze(1), groups)
        else:
            out = cached_attention(q, k, v, cache, layer, rows, groups)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, s.num_heads * s.head_dim))


def fused_decode_attention(spec, qkv, cos, sin, cache: KVCache | None, layer: int, rows: list[RowKV] | None,
                           q_norm: "RMSNorm | None" = None, k_norm: "RMSNorm | None" = None) -> torch.Tensor | None:
    """A one-sequence decode step's attention from the fused ``qkv [1, 1, (H + 2 KVH) d]`` in one native call
    (``kernels.attention.decode_block``: optional QK-norm, rotary, cache write, attention): ``[1, 1, H d]``,
    bitwise the separate steps' result; or None where it does not apply (then the caller runs those steps)."""
    if cache is None or len(rows) != 1 or qkv.shape[0] != 1 or qkv.shape[1] != 1:
        return None
    row = rows[0]
    if not (isinstance(row.where, slice) and row.where.start == row.span - 1):
        return None
    kc, vc = cache.layer_kv(layer, row.slot)
    eps = q_norm.eps if q_norm is not None else 0.0
    if q_norm is not None and (k_norm is None or k_norm.eps != eps):
        return None
    return decode_block(qkv, spec.num_heads, spec.num_kv_heads, None if q_norm is None else q_norm.weight,
                        None if k_norm is None else k_norm.weight, eps, cos, sin, kc, vc, row.span)


def cached_attention(q, k, v, cache: KVCache, layer: int, rows: list[RowKV], groups: int) -> torch.Tensor:
    """Write ``k/v [B, kv_heads, T, d]`` into each row's slot at ``row.where``, then attend each row of
    ``q [B, H, T, d]`` over positions ``0 .. row.span-1`` of its own slot (a contiguous view: no gather) with
    ``row.mask``. One row is exactly the one-sequence computation; rows never share an SDPA
    call, so every row's bits are those it gets alone."""
    outs = []
    for r, row in enumerate(rows):
        kc, vc = cache.layer_kv(layer, row.slot)
        kc[:, row.where] = k[r].to(kc.dtype)
        vc[:, row.where] = v[r].to(vc.dtype)
        if q.shape[2] == 1 and isinstance(row.where, slice) and row.where.start == row.span - 1:
            # a decode step at the end of its prefix sees every position: the native kernel reads K/V in place
            out = decode_attention(q if len(rows) == 1 else q[r:r + 1], kc, vc, row.span, groups)
            if out is not None:
                outs.append(out.to(q.dtype))
                continue
        keys = kc[:, :row.span].unsqueeze(0).to(q.dtype)
        values = vc[:, :row.span].unsqueeze(0).to(q.dtype)
        outs.append(_attend(q[r:r + 1], keys, values, row.mask, groups))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _attend(q, keys, values, mask, groups: int) -> torch.Tensor:
    """SDPA of ``q [B, H, T, d]`` over ``keys/values [B, H/groups, S, d]`` with boolean ``mask [B, 1, T, S]``."""
    if groups == 1:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    # grouped queries: the `groups` heads sharing a K/V head become extra query rows of that head (no copy of
    # K/V); head h reads K/V head h // groups, as with repeat_interleave
    b, h, t, d = q.shape
    out = F.scaled_dot_product_attention(q.reshape(b, h // groups, groups * t, d), keys, values,
                                         attn_mask=mask.repeat(1, 1, groups, 1))
    return out.view(b, h, t, d)


class MLP(nn.Module):
    def __init__(self, spec: LlamaSpec):
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x):
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        act = decode_layers.silu_mul(gate, up)  # fp32 inference on CPU: one native call
        return self.down_proj(act if act is not None else F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, spec: LlamaSpec):
        super().__init__()
        self.self_attn = Attention(spec)
        self.mlp = MLP(spec)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, x, cos, sin, cache, layer, rows, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, rows, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    """Module names follow LLaVA-original keys: ``model.embed_tokens``, ``model.layers.N...``,
    ``model.norm``, ``lm_head``."""

    def __init__(self, spec: LlamaSpec):
        super().__init__()
        self.spec = spec
        self.model = nn.Module()
        weight = torch.empty(spec.vocab_size, spec.hidden_size)
        if not weight.is_meta:  # on meta (the loader), skip nn.Embedding's init: its first call costs ~1.5 s
            nn.init.normal_(weight)
        self.model.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size, _weight=weight)
        self.model.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_layers))
        self.model.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.rotary = Rotary(spec)

    def fuse_projections(self) -> int:
        """Replace q/k/v and gate/up by single fused linears (fewer, larger matmuls); returns how many
        groups were fused. Exact: the fused weights are the concatenated originals."""
        return fuse_decoder_projections(self.model.layers)

    def prepare_kernels(self, release_awq: bool = False) -> int:
        """Let each packed linear's decode backend build its layout now instead of on the first token;
        with ``release_awq``, also free the AWQ buffers where the backend's layout holds the same bits
        (``Int4Linear.release_awq``). Returns how many layers were prepared."""
        return prepare_int4_kernels(self, release_awq)

    def embed(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.model.embed_tokens(ids).to(dtype)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                slots: torch.Tensor | None = None, logits_for: str = "last",
                rows_alone: bool = False) -> torch.Tensor:
        """``embeds [B, T, D]`` at absolute ``positions [B, T]`` into cache ``slots [B]``.

        Returns logits float32 ``[B, V]`` for each row's last token (``logits_for="last"``),
        ``[B, T, V]`` (``"all"``) or None (``"none"``: only the cache is filled, e.g. a prefill chunk whose
        logits nobody reads; the final norm and ``lm_head`` are skipped).
        ``rows_alone`` (decode, T = 1): every row's logits are bitwise those it gets as a lone sequence
        (per-row attention span; ``lm_head`` per row unless it is row-invariant); the projections still run
        batched, which the CPU INT4 kernels compute row by row below their GEMM crossover.
        """
        b, t, _ = embeds.shape
        if rows_alone and t != 1:
            raise ValueError("rows_alone is for decode steps (one token per row)")
        span = int(positions.max()) + 1
        # query at position p may see cache positions 0..p of its own slot
        mask = torch.arange(span, device=positions.device).view(1, 1, span) <= positions.unsqueeze(-1)  # [B, T, span]
        rows = cache.rows(slot_list(slots, b), positions, mask)
        cos, sin = self.rotary(positions)
        x = decode_all_layers(self, self.model.layers, self.spec, embeds, cos, sin, cache, rows)
        if x is None:
            x = embeds
            for i, layer in enumerate(self.model.layers):
                x = layer(x, cos, sin, cache, i, rows, None)
        if logits_for == "none":
            return None
        if logits_for == "last":
            x = x[:, -1:]
        x = self.model.norm(x)
        if rows_alone and not self.head_rows_independent(b):
            logits = torch.cat([self.logits(x[r:r + 1]) for r in range(b)])
        else:
            logits = self.logits(x)
        return logits[:, -1] if logits_for == "last" else logits

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states ``[..., D]`` -> float32 logits ``[..., V]`` (``lm_head`` in its own
        compute dtype: the weight's for ``nn.Linear``, fp32 for a ``HalfLinear``)."""
        head = self.lm_head
        return head(x.to(getattr(head, "compute_dtype", head.weight.dtype))).to(torch.float32)

    def head_rows_independent(self, rows: int) -> bool:
        """Whether ``logits`` of ``rows`` rows computes each row bitwise as it would alone."""
        check = getattr(self.lm_head, "rows_independent", None)
        return rows == 1 or (check is not None and check(rows))

    def forward_train(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      output_hidden_states: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Cache-free causal forward over whole (right-padded) sequences, differentiable, for training.

        ``embeds [B, T, D]`` at positions ``0..T-1``; ``attention_mask [B, T]`` (1 = real token, 0 = padding;
        default all ones). Returns ``(hidden [B, T, D], hidden_states)``: ``hidden`` is the final-normed
        output (apply ``lm_head`` to the rows you need), ``hidden_states`` (only with
        ``output_hidden_states``) follows transformers' convention: ``L + 1`` tensors, entry ``k < L`` is
        the input of layer ``k`` (entry 0 the embeddings) and entry ``L`` the final-normed output, so
        ``hidden_states[-2]`` is the output of the second-to-last layer.
        """
        b, t, _ = embeds.shape
        positions = torch.arange(t, device=embeds.device).unsqueeze(0).expand(b, t)
        mask = torch.ones(t, t, dtype=torch.bool, device=embeds.device).tril().unsqueeze(0)  # [1, T, T]
        if attention_mask is not None:
            mask = mask & attention_mask.to(torch.bool).view(b, 1, t)
        else:
            mask = mask.expand(b, t, t)
        cos, sin = self.rotary(positions)
        states = [embeds] if output_hidden_states else None
        x = embeds
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, None, i, None, mask)
            if states is not None:
                states.append(x)
        x = self.model.norm(x)
        if states is not None:
            states[-1] = x
        return x, (tuple(states) if states is not None else None)


def prepare_int4_kernels(root: nn.Module, release_awq: bool = False) -> int:
    """``LlamaForCausalLM.prepare_kernels`` for any module tree holding ``Int4Linear`` layers (every family's
    decoder): build each layer's decode layout now, optionally free the AWQ buffers the layout duplicates."""
    from .. import kernels

    n = 0
    for module in root.modules():
        if isinstance(module, Int4Linear):
            backend = kernels.select_backend(module.device, 1, module.backend)
            prepare = getattr(backend, "prepare", None)
            if prepare is not None:
                prepare(module)
                n += 1
            release = getattr(backend, "release_awq", None)
            if release_awq and release is not None:
                release(module)
    return n
