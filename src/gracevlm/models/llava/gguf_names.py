"""llama.cpp GGUF: Q4_0 blocks written straight from integer codes, the q/k row permutation, tensor names.

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

from ...errors import FormatError
from ...formats.checkpoint import PROJECTOR_PREFIX, VISION_PREFIX

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


# -------------------------------------------------------------------------------------------------
# tensor names

_LLAMA_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def llama_tensor_name(key: str) -> str:
    """LLaVA-original LM key (``model.layers.3.self_attn.q_proj.weight``) -> GGUF name (``blk.3.attn_q.weight``)."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if key in fixed:
        return fixed[key]
    parts = key.split(".")
    if key.startswith("model.layers.") and len(parts) >= 5:
        module = ".".join(parts[3:-1])
        if module in _LLAMA_LAYER:
            return f"blk.{parts[2]}.{_LLAMA_LAYER[module]}.{parts[-1]}"
    raise FormatError(f"{key}: no GGUF llama tensor name")


_CLIP_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2", "mlp.fc1": "ffn_up",
    "mlp.fc2": "ffn_down",
}


def clip_tensor_name(key: str) -> str | None:
    """LLaVA-original tower/projector key -> mmproj GGUF name; None for tensors llava skips
    (``post_layernorm``: LLaVA takes hidden_states[-2], before it; ``position_ids``)."""
    if key.startswith(PROJECTOR_PREFIX):
        idx, _, rest = key[len(PROJECTOR_PREFIX):].partition(".")
        return f"mm.{idx}.{rest}"
    if not key.startswith(VISION_PREFIX):
        raise FormatError(f"{key}: not a vision tower or projector tensor")
    rest = key[len(VISION_PREFIX):]
    fixed = {"embeddings.class_embedding": "v.class_embd", "embeddings.patch_embedding.weight": "v.patch_embd.weight",
             "embeddings.position_embedding.weight": "v.position_embd.weight",
             "pre_layrnorm.weight": "v.pre_ln.weight", "pre_layrnorm.bias": "v.pre_ln.bias"}
    if rest in fixed:
        return fixed[rest]
    if rest.startswith(("post_layernorm.", "embeddings.position_ids")):
        return None
    parts = rest.split(".")
    if rest.startswith("encoder.layers.") and len(parts) >= 5:
        module = ".".join(parts[3:-1])
        if module in _CLIP_LAYER:
            return f"v.blk.{parts[2]}.{_CLIP_LAYER[module]}.{parts[-1]}"
    raise FormatError(f"{key}: no GGUF mmproj tensor name")
