"""Every LLaVA key and config map: LLaVA-original (GRACE) <-> llava-hf (transformers) names, the llava-hf
``config.json`` we write, the training export's names (``grace_key``), and ``open_llava``, which presents
any supported LLaVA checkpoint (llava-hf dense/AWQ/compressed-tensors, AutoAWQ) as LLaVA-original key names
plus AWQ triples, so the loader and the exporters keep a single view of a model. GGUF names: ``gguf_names``.

Key names (reference/formats.md (c)):

=================================================  ==============================================
LLaVA-original (GRACE)                              llava-hf on disk (what we write)
=================================================  ==============================================
``model.embed_tokens.* / model.layers.* /           ``language_model.model.<rest>``
model.norm.*``
``lm_head.weight``                                  ``language_model.lm_head.weight``
``model.mm_projector.0.* / .2.*``                   ``multi_modal_projector.linear_1.* / linear_2.*``
``model.vision_tower.vision_tower.vision_model.x``  ``vision_tower.vision_model.x``
=================================================  ==============================================

We write the classic llava-hf names (those of ``llava-hf/llava-1.5-7b-hf``): SGLang's
``LlavaForConditionalGeneration.load_weights`` strips a leading ``language_model.``/``vision_tower.``
and looks everything else up verbatim, so transformers-5 in-memory names (``model.language_model.*``)
would not load there; transformers 5 and vLLM accept both spellings. On reading, all three spellings
are accepted (classic, transformers-5 in-memory ``model.language_model.*``/``model.vision_tower.*``/
``model.multi_modal_projector.*``/``lm_head.*``, and the flattened tower ``vision_tower.<x>``).

The compressed-tensors and AWQ codecs themselves are in ``formats/`` (``compressed_tensors``, ``mapped``).
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ...errors import FormatError, InputError
from ...formats.checkpoint import TensorStore, read_json_object
from ...formats.mapped import mapped_view
from ..checkpoint import OpenedCheckpoint, QuantizedLinears, grace_quantized
from ..llama import LlamaForCausalLM
from .model import LlavaModel
from .config import (PREPROCESSOR_NAME, PROJECTOR_PREFIX, VISION_KEYS, VISION_PREFIX, LlavaConfig,
                     is_llava_hf_config, llava_config_from_hf)


# -------------------------------------------------------------------------------------------------
# key names


def original_to_hf(key: str) -> str:
    """LLaVA-original key -> classic llava-hf on-disk key (raises FormatError for keys with no place)."""
    if key.startswith(VISION_PREFIX):
        return "vision_tower.vision_model." + key[len(VISION_PREFIX):]
    if key.startswith(PROJECTOR_PREFIX):
        idx, _, rest = key[len(PROJECTOR_PREFIX):].partition(".")
        linear = {"0": "linear_1", "2": "linear_2"}.get(idx)
        if linear is None:
            raise FormatError(f"{key}: only the mlp2x_gelu projector (indices 0 and 2) maps to llava-hf")
        return f"multi_modal_projector.{linear}.{rest}"
    if key.startswith("lm_head."):
        return "language_model." + key
    if key.startswith("model."):
        return "language_model." + key
    raise FormatError(f"{key}: no llava-hf name for this LLaVA-original key")


def hf_to_original(key: str) -> str | None:
    """Any llava-hf spelling -> LLaVA-original key; None for keys the LLaVA-1.5 model does not use."""
    for prefix, new in (("language_model.model.", "model."), ("model.language_model.", "model."),
                        ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head.")):
        if key.startswith(prefix):
            return new + key[len(prefix):]
    for prefix in ("multi_modal_projector.", "model.multi_modal_projector."):
        if key.startswith(prefix):
            linear, _, rest = key[len(prefix):].partition(".")
            idx = {"linear_1": "0", "linear_2": "2"}.get(linear)
            return None if idx is None else f"{PROJECTOR_PREFIX}{idx}.{rest}"
    for prefix in ("vision_tower.", "model.vision_tower."):
        if key.startswith(prefix):
            rest = key[len(prefix):]
            if rest.startswith("vision_model."):
                rest = rest[len("vision_model."):]
            return VISION_PREFIX + rest
    return None


# -------------------------------------------------------------------------------------------------
# configs


def llava_hf_config(cfg: LlavaConfig, vision: dict, vocab_rows: int, image_token_index: int,
                    dtype: str = "float16", quantization_config: dict | None = None) -> dict:
    """config.json of a ``LlavaForConditionalGeneration`` with the given LLaMA/CLIP shapes.

    Written by hand (not by ``LlavaConfig.to_dict``) so it also parses with transformers 4.x, which vLLM
    and SGLang pin: legacy ``rope_theta``/``rope_scaling`` and ``torch_dtype`` next to their v5 forms.
    The LLaVA-original fields that llava-hf has no place for (``image_aspect_ratio``, ``mm_patch_merge_type``,
    ``tokenizer_model_max_length``, ``conv_mode``) ride along at the top level: transformers keeps unknown
    keys, SGLang reads ``image_aspect_ratio``/``mm_patch_merge_type`` (it assumes ``anyres`` when absent),
    and ``llava_config_from_hf`` reads them back.
    """
    if cfg.mm_projector_type != "mlp2x_gelu":
        raise FormatError(f"mm_projector_type {cfg.mm_projector_type!r} has no llava-hf equivalent "
                          "(LlavaMultiModalProjector is Linear-GELU-Linear = mlp2x_gelu)")
    side = vision["image_size"] // vision["patch_size"]
    text = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": vocab_rows, "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling or None,
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "torch_dtype": dtype, "dtype": dtype,
    }
    vis = {"model_type": "clip_vision_model", "projection_dim": 768, "attention_dropout": 0.0, "dropout": 0.0,
           "torch_dtype": dtype, "dtype": dtype}
    vis.update({k: vision[k] for k in VISION_KEYS if k in vision})
    out = {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "text_config": text, "vision_config": vis,
        "image_token_index": image_token_index, "image_seq_length": side * side,
        "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
        "vision_feature_layer": cfg.mm_vision_select_layer,
        "vision_feature_select_strategy": "default" if cfg.mm_vision_select_feature == "patch" else "full",
        "tie_word_embeddings": False, "vocab_size": vocab_rows, "pad_token_id": cfg.pad_token_id,
        "torch_dtype": dtype, "dtype": dtype,
        # LLaVA-original semantics carried along (see docstring)
        "image_aspect_ratio": cfg.image_aspect_ratio, "mm_patch_merge_type": "flat",
        "tokenizer_model_max_length": cfg.tokenizer_model_max_length,
    }
    if cfg.conv_mode:
        out["conv_mode"] = cfg.conv_mode
    if quantization_config is not None:
        out["quantization_config"] = quantization_config
    return out


# compressed-tensors ``ignore`` for a LLaVA export: ``match_name`` compares a plain entry for *equality* with the
# module name and a ``re:`` entry with ``re.match``. Module names differ per runtime (``model.vision_tower...`` and
# ``lm_head`` in transformers 5; ``vision_tower...`` and ``language_model.lm_head`` in vLLM/SGLang), so the tower,
# projector and head are excluded by regexes (llm-compressor's LLaVA example uses the same ones) plus the plain
# ``lm_head``; the LM linears match ``targets: ["Linear"]`` by class.
CT_IGNORE = ("lm_head", "re:.*lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*")


# -------------------------------------------------------------------------------------------------
# training export: in-memory parameter names -> LLaVA-original keys, and the config describing a model

_HF_MAP = (("model.language_model.", "model."), ("model.multi_modal_projector.linear_1.", PROJECTOR_PREFIX + "0."),
           ("model.multi_modal_projector.linear_2.", PROJECTOR_PREFIX + "2."), ("model.vision_tower.", VISION_PREFIX),
           ("lm_head.", "lm_head."))
_OURS_MAP = (("language_model.", ""), ("projector.", PROJECTOR_PREFIX), ("vision_tower.", VISION_PREFIX))


def model_layout(model: nn.Module) -> str:
    """'ours' (gracevlm's LlavaModel), 'llama' (a bare LlamaForCausalLM) or 'hf' (transformers' Llava)."""
    if isinstance(model, LlavaModel):
        return "ours"
    if isinstance(model, LlamaForCausalLM):
        return "llama"
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "language_model") and hasattr(model, "lm_head"):
        return "hf"
    raise InputError(f"cannot export a {type(model).__name__}: expected gracevlm's LlavaModel or "
                     "LlamaForCausalLM, or transformers' LlavaForConditionalGeneration")


def grace_key(name: str, layout: str) -> str | None:
    """Our in-memory parameter name -> LLaVA-original checkpoint key (None: not saved)."""
    if name.endswith("position_ids") or name.endswith("rotary.inv_freq"):
        return None
    if layout == "llama":
        return name
    for src, dst in (_OURS_MAP if layout == "ours" else _HF_MAP):
        if name.startswith(src):
            return dst + name[len(src):]
    raise InputError(f"parameter {name!r} has no LLaVA-original checkpoint name")


def _vision_config_dict(tower: nn.Module | None) -> dict | None:
    if tower is None or not hasattr(tower, "config"):
        return None
    c = tower.config
    return {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
            "image_size": c.image_size, "patch_size": c.patch_size, "hidden_act": c.hidden_act,
            "layer_norm_eps": c.layer_norm_eps}


def config_for_model(model: nn.Module, conv_mode: str | None = None, max_length: int = 2048) -> dict:
    """A LLaVA-original config.json dict describing ``model`` (with the ``mm_vision_config`` extension
    describing a bundled CLIP-style tower)."""
    layout = model_layout(model)
    if layout == "hf":
        tc = model.config.text_config
        hidden, inter, layers = tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers
        heads, kv, vocab = tc.num_attention_heads, tc.num_key_value_heads, tc.vocab_size
        eps, theta = tc.rms_norm_eps, getattr(tc, "rope_theta", None) or 10000.0
        max_pos = tc.max_position_embeddings
        vision = _vision_config_dict(model.model.vision_tower)
        layer = model.config.vision_feature_layer
        feature = "patch" if model.config.vision_feature_select_strategy == "default" else "cls_patch"
        has_vision = True
    else:
        lm = model.language_model if layout == "ours" else model
        sp = lm.spec
        hidden, inter, layers, heads, kv, vocab = (sp.hidden_size, sp.intermediate_size, sp.num_layers,
                                                   sp.num_heads, sp.num_kv_heads, sp.vocab_size)
        eps, theta, max_pos = sp.rms_norm_eps, sp.rope_theta, sp.max_position_embeddings
        vision = _vision_config_dict(model.vision_tower) if layout == "ours" else None
        layer = model.select_layer if layout == "ours" else -2
        feature = model.select_feature if layout == "ours" else "patch"
        has_vision = layout == "ours" and model.projector is not None
    cfg = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "hidden_act": "silu",
        "rms_norm_eps": eps, "max_position_embeddings": max_pos, "vocab_size": vocab,
        "rope_theta": float(theta), "rope_scaling": None, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True,
        "tokenizer_model_max_length": max_length, "tokenizer_padding_side": "right",
    }
    if has_vision:
        cfg.update({
            "mm_vision_tower": "openai/clip-vit-large-patch14-336",
            "mm_hidden_size": vision["hidden_size"] if vision else 1024,
            "mm_vision_select_layer": layer, "mm_vision_select_feature": feature,
            "mm_projector_type": "mlp2x_gelu", "mm_patch_merge_type": "flat", "image_aspect_ratio": "pad",
            "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "use_mm_proj": True,
        })
        if vision:
            cfg["mm_vision_config"] = vision
    if conv_mode:
        cfg["conv_mode"] = conv_mode
    return cfg


# -------------------------------------------------------------------------------------------------
# opening a checkpoint in LLaVA-original terms


def open_llava(family, folder: Path, fmt: str, raw: dict) -> OpenedCheckpoint:
    """A LLaVA checkpoint under LLaVA-original key names with AWQ triples: GRACE AWQ/QAT and plain
    checkpoints as stored; llava-hf (dense, AutoAWQ, compressed-tensors) and AutoAWQ LLaVA-original
    checkpoints renamed and repacked. Raises CheckpointError naming what is unsupported."""
    source = str(folder / "config.json")
    hf_layout = is_llava_hf_config(raw)
    if hf_layout:
        pre = folder / PREPROCESSOR_NAME
        cfg = llava_config_from_hf(raw, read_json_object(pre) if pre.is_file() else None, source)
    else:
        cfg = LlavaConfig.from_dict(raw, source)
    layout = "llava-hf" if hf_layout else "llava-original"
    base = TensorStore(folder)
    if not hf_layout and fmt not in ("awq", "compressed-tensors"):
        return OpenedCheckpoint(folder, fmt, family, cfg, raw, base, grace_quantized(folder, fmt, raw), layout)
    qc = raw.get("quantization_config") if isinstance(raw.get("quantization_config"), dict) else None
    store, modules, group, symmetric = mapped_view(base, hf_to_original if hf_layout else (lambda k: k), fmt, qc,
                                                   source)
    quantized = QuantizedLinears(fmt if modules else None, 4, group, modules, symmetric)
    name = "llava-hf" if fmt == "fp16" else fmt
    return OpenedCheckpoint(folder, name, family, cfg, raw, store, quantized, layout, qc)
