"""llama.cpp GGUF tensor names of a LLaVA-1.5 model (LLaMA ``blk.*``, CLIP/projector ``v.*``/``mm.*``);
the Q4_0 codec is ``formats.gguf_q4``."""
from __future__ import annotations

from ...errors import FormatError
from .config import PROJECTOR_PREFIX, VISION_PREFIX


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
