"""LLaVA config checks that turn a broken checkpoint into one ``CheckpointError`` (what, where, how to fix) at load time,
instead of a traceback - or a server that loads and then answers every image request with a 500.

* ``validate_llava_config(d, source)``: the raw ``config.json`` object, BEFORE any field is converted:
  JSON types (an integer is an integer, not a string or ``1e7``), ranges (no zero heads, no ten million
  layers), divisibility, ``eos_token_id``, ``rope_scaling``, the vision fields.
* ``check_vision_select_layer(select_layer, tower, source)``: ``mm_vision_select_layer`` indexes the
  tower's hidden states (``num_hidden_layers + 1`` of them).

Family-independent checks (module lists, finite scales, readable folders) are in ``models.checks``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from ...errors import CheckpointError

# generous upper bounds: 10x the largest LLaMA-family models, small enough that a typo fails fast
LIMITS = {"hidden_size": 2**17, "intermediate_size": 2**19, "num_hidden_layers": 1024,
          "num_attention_heads": 2048, "num_key_value_heads": 2048, "vocab_size": 2**23,
          "max_position_embeddings": 2**22, "mm_hidden_size": 2**17,
          "tokenizer_model_max_length": 2**62}  # min()-ed with max_position_embeddings: any size works
REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def _fail(source: str, key: str, expected: str, value: Any) -> CheckpointError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return CheckpointError(f"{source}: {key} must be {expected}, got {shown}; fix that field of the config "
                           "(or re-export the checkpoint)")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(d: Mapping, key: str, source: str, positive: bool = True) -> None:
    v = d.get(key)
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
        raise _fail(source, key, "a finite positive number" if positive else "a finite number", v)


def validate_llava_config(d: Mapping[str, Any], source: str = "config.json") -> None:
    """Raise ``CheckpointError`` for a LLaVA-original config whose fields cannot describe a model."""
    for key in REQUIRED:
        if key not in d:
            raise CheckpointError(f"{source}: required field {key!r} is missing; is this a LLaVA "
                                  "(LlavaLlamaForCausalLM) config?")
    for key, cap in LIMITS.items():
        v = d.get(key)
        if v is None and key not in REQUIRED:
            continue
        if not _is_int(v) or not 1 <= v <= cap:
            raise _fail(source, key, f"an integer in [1, {cap}]", v)
    heads = d["num_attention_heads"]
    kv = d.get("num_key_value_heads") or heads
    if d["hidden_size"] % heads:
        raise CheckpointError(f"{source}: hidden_size {d['hidden_size']} is not divisible by num_attention_heads "
                              f"{heads}; fix one of them")
    if (d["hidden_size"] // heads) % 2:
        raise _fail(source, "hidden_size / num_attention_heads", "even (rotary embeddings pair dimensions)",
                    d["hidden_size"] // heads)
    if heads % kv:
        raise CheckpointError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                              f"{kv}; fix one of them")
    vocab = d["vocab_size"]
    for key in ("bos_token_id", "pad_token_id"):
        v = d.get(key)
        if v is not None and (not _is_int(v) or not 0 <= v < vocab):
            raise _fail(source, key, f"null or a token id in [0, {vocab})", v)
    eos = d.get("eos_token_id", 2)
    ids = eos if isinstance(eos, list) else [eos]
    if not ids or not all(_is_int(i) and 0 <= i < vocab for i in ids):
        raise _fail(source, "eos_token_id", f"a token id in [0, {vocab}) or a non-empty list of them", eos)
    for key in ("rms_norm_eps", "rope_theta"):
        _number(d, key, source)
    _check_rope_scaling(d.get("rope_scaling"), source)
    layer = d.get("mm_vision_select_layer", -2)
    if not _is_int(layer):
        raise _fail(source, "mm_vision_select_layer", "an integer (a hidden-state index of the vision tower)", layer)
    feature = d.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise _fail(source, "mm_vision_select_feature", "'patch' or 'cls_patch'", feature)
    for key in ("mm_vision_tower", "vision_tower", "conv_mode", "mm_projector_type", "image_aspect_ratio"):
        v = d.get(key)
        if v is not None and not isinstance(v, str):
            raise _fail(source, key, "a string or null", v)
    vc = d.get("mm_vision_config")
    if vc is not None and not isinstance(vc, dict):
        raise _fail(source, "mm_vision_config", "an object or null", vc)


def _check_rope_scaling(rs: Any, source: str) -> None:
    if rs in (None, {}):
        return
    if not isinstance(rs, dict):
        raise _fail(source, "rope_scaling", "null or an object like {\"type\": \"linear\", \"factor\": 2.0}", rs)
    kind = rs.get("type", rs.get("rope_type"))
    if kind not in ("linear", "default"):
        raise CheckpointError(f"{source}: rope_scaling {rs} is not supported (only none and 'linear')")
    if kind == "linear":
        factor = rs.get("factor")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) \
                or factor <= 0:
            raise _fail(source, "rope_scaling.factor", "a finite positive number for linear scaling", factor)


def check_vision_select_layer(select_layer: int, tower: Any, source: str) -> None:
    if tower is None:
        return
    n = tower.config.num_hidden_layers + 1  # hidden_states: the embeddings, then one per layer
    if not -n <= select_layer < n:
        raise CheckpointError(f"{source}: mm_vision_select_layer {select_layer} is outside the vision tower's "
                              f"{n} hidden states (valid: {-n} .. {n - 1}; LLaVA-1.5 uses -2); fix config.json")
