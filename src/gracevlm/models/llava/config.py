"""LLaVA-1.5 configuration: the LLaVA-original ``config.json`` (``LlavaConfig``), llava-hf configs read into it,
and the CLIP vision tower's config (from the config, the ``mm_vision_tower`` folder, or implied by the tensors)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import CheckpointError
from ...formats.checkpoint import read_json_object
from ...formats.hub import resolve_local_path

log = logging.getLogger(__name__)

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
PROJECTOR_PREFIX = "model.mm_projector."
IGNORED_KEYS = ("model.image_newline",)  # anyres' separator row: unused by LLaVA-1.5's flat merge
PREPROCESSOR_NAME = "preprocessor_config.json"


@dataclass
class LlavaConfig:
    """The fields of a LLaVA-original ``config.json`` that the runtime uses (parsed by hand: such a config
    must never go through ``AutoConfig``, where ``llava`` means another layout)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    tie_word_embeddings: bool = False
    mm_vision_tower: str | None = "openai/clip-vit-large-patch14-336"
    mm_hidden_size: int = 1024
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    mm_projector_type: str = "mlp2x_gelu"
    image_aspect_ratio: str = "pad"
    mm_use_im_start_end: bool = False
    tokenizer_model_max_length: int = 2048
    conv_mode: str | None = None
    vision_config: dict | None = None  # gracevlm extension: explicit CLIP vision config of a bundled tower
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "LlavaConfig":
        def need(key):
            if key not in d:
                raise CheckpointError(f"{source}: required field {key!r} is missing; is this a LLaVA "
                                      "(LlavaLlamaForCausalLM) config?")
            return d[key]
        if "text_config" in d and "hidden_size" not in d:
            raise CheckpointError(f"{source} is a llava-hf (LlavaForConditionalGeneration) config; this "
                                  "loader expects the LLaVA-original layout (hidden_size at the top level)")
        from .config_checks import validate_llava_config

        validate_llava_config(d, source)
        eos = d.get("eos_token_id", 2)
        cfg = cls(
            hidden_size=int(need("hidden_size")), intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")), num_attention_heads=int(need("num_attention_heads")),
            num_key_value_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
            vocab_size=int(need("vocab_size")), rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            rope_theta=float(d.get("rope_theta", 10000.0)), rope_scaling=d.get("rope_scaling"),
            bos_token_id=int(d.get("bos_token_id", 1) or 1),
            eos_token_id=int(eos[0] if isinstance(eos, list) else eos),
            pad_token_id=int(d.get("pad_token_id") or 0),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            mm_vision_tower=d.get("mm_vision_tower", d.get("vision_tower")),
            mm_hidden_size=int(d.get("mm_hidden_size", 1024)),
            mm_vision_select_layer=int(d.get("mm_vision_select_layer", -2)),
            mm_vision_select_feature=d.get("mm_vision_select_feature", "patch"),
            mm_projector_type=d.get("mm_projector_type", "mlp2x_gelu"),
            image_aspect_ratio=d.get("image_aspect_ratio") or "square",
            mm_use_im_start_end=bool(d.get("mm_use_im_start_end", False)),
            tokenizer_model_max_length=int(d.get("tokenizer_model_max_length") or 2048),
            conv_mode=d.get("conv_mode"), vision_config=d.get("mm_vision_config"), raw=d,
        )
        if cfg.hidden_size % cfg.num_attention_heads:
            raise CheckpointError(f"{source}: hidden_size {cfg.hidden_size} is not divisible by "
                                  f"num_attention_heads {cfg.num_attention_heads}")
        if cfg.mm_vision_select_feature not in ("patch", "cls_patch"):
            raise CheckpointError(f"{source}: mm_vision_select_feature {cfg.mm_vision_select_feature!r} "
                                  "is not supported (expected 'patch' or 'cls_patch')")
        if cfg.rope_scaling not in (None, {}) and cfg.rope_scaling.get("type", cfg.rope_scaling.get("rope_type")) \
                not in ("linear", "default"):
            raise CheckpointError(f"{source}: rope_scaling {cfg.rope_scaling} is not supported "
                                  "(only none and 'linear')")
        return cfg

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "LlavaConfig":
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path} not found: a checkpoint folder needs its config.json")
        return cls.from_dict(read_json_object(path), str(path))


def is_llava_hf_config(d: dict) -> bool:
    return isinstance(d, dict) and isinstance(d.get("text_config"), dict) and "hidden_size" not in d


VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
               "patch_size", "hidden_act", "layer_norm_eps", "num_channels")
CLIP_L336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
              "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
              "num_channels": 3}


def vision_config_from_tensors(keys: list[str], shape) -> dict:
    """CLIP vision config implied by bundled tower tensors (``shape(key)`` gives a tensor's shape). The head
    count is not in the weights: head size 64 (every released CLIP ViT) is assumed; callers warn."""
    patch = shape(VISION_PREFIX + "embeddings.patch_embedding.weight")
    pos = shape(VISION_PREFIX + "embeddings.position_embedding.weight")
    fc1 = shape(VISION_PREFIX + "encoder.layers.0.mlp.fc1.weight")
    n_layers = 1 + max(int(k[len(VISION_PREFIX):].split(".")[2]) for k in keys
                       if k.startswith(VISION_PREFIX + "encoder.layers."))
    hidden, patch_size = patch[0], patch[2]
    side = round((pos[0] - 1) ** 0.5)
    return {"hidden_size": hidden, "intermediate_size": fc1[0], "num_hidden_layers": n_layers,
            "num_attention_heads": max(1, hidden // 64), "image_size": side * patch_size, "patch_size": patch_size,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "num_channels": patch[1]}


def tower_folder_config(cfg: "LlavaConfig", base: Path | None) -> tuple[dict, Path] | None:
    """(CLIP vision config, folder) of the tower ``mm_vision_tower`` names when it resolves without a download:
    a folder (absolute, or relative to the checkpoint ``base``) or a Hub id in the local cache; else None."""
    if not cfg.mm_vision_tower:
        return None
    folder = resolve_local_path(cfg.mm_vision_tower, base=base)
    if folder is None or not (folder / "config.json").is_file():
        return None
    raw = read_json_object(folder / "config.json")
    vc = raw["vision_config"] if isinstance(raw.get("vision_config"), dict) else raw
    out = dict(CLIP_L336)
    out.update({k: vc[k] for k in VISION_KEYS if vc.get(k) is not None})
    return out, folder


def _check_tensors_match(vision: dict, keys: list[str], shape, source: str) -> None:
    """Refuse a bundled tower whose tensor shapes disagree with the config describing it."""
    implied = vision_config_from_tensors(keys, shape)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "image_size", "patch_size", "num_channels"):
        if int(vision[key]) != int(implied[key]):
            raise CheckpointError(f"the bundled vision tower has {key}={implied[key]} but {source} says "
                                  f"{vision[key]}; mm_vision_tower names a different CLIP than the one in the "
                                  "checkpoint (fix mm_vision_tower or add mm_vision_config to config.json)")
    if int(vision["hidden_size"]) % int(vision["num_attention_heads"]):
        raise CheckpointError(f"{source}: num_attention_heads {vision['num_attention_heads']} does not divide "
                              f"hidden_size {vision['hidden_size']}")


def vision_config_dict(cfg: "LlavaConfig", keys: list[str], shape, base: Path | None = None) -> dict:
    """The CLIP vision config of a LLaVA checkpoint whose tower tensors are ``keys`` (``shape(key)`` their shapes).

    In order: explicit (``mm_vision_config`` / llava-hf ``vision_config``); else the config of the CLIP folder
    ``mm_vision_tower`` names, when it resolves locally (``base``: the checkpoint folder, for relative
    paths), with the tensors checked against it; else implied by the tensors, with a warning naming the
    assumed head count (heads are not stored in the weights)."""
    if cfg.vision_config:
        out = dict(CLIP_L336)
        out.update({k: cfg.vision_config[k] for k in VISION_KEYS if k in cfg.vision_config})
        return out
    found = tower_folder_config(cfg, base)
    if found is not None:
        vision, folder = found
        if any(k.startswith(VISION_PREFIX + "encoder.layers.") for k in keys):
            _check_tensors_match(vision, keys, shape, f"{folder / 'config.json'} (mm_vision_tower)")
        return vision
    out = vision_config_from_tensors(keys, shape)
    log.warning("vision tower config not found (no mm_vision_config; mm_vision_tower %r is not available "
                "locally): assuming %d attention heads of size 64 from the bundled tensors",
                cfg.mm_vision_tower, out["num_attention_heads"])
    return out


def llava_config_from_hf(d: dict, preprocessor: dict | None = None, source: str = "config.json") -> LlavaConfig:
    """A llava-hf ``LlavaConfig`` dict -> our LLaVA-original ``LlavaConfig``.

    ``image_aspect_ratio`` follows the checkpoint's own processing: a top-level ``image_aspect_ratio``
    (our exports write ``"pad"``), else ``do_pad`` in ``preprocessor_config.json`` (``LlavaImageProcessor``),
    else ``"square"`` (what ``CLIPImageProcessor`` does with e.g. llava-hf/llava-1.5-7b-hf).
    """
    text = d.get("text_config") or {}
    if text.get("model_type", "llama") not in ("llama", None):
        raise CheckpointError(f"{source}: text_config.model_type {text.get('model_type')!r} is not supported "
                              "(LLaVA-1.5 uses a LLaMA language model)")
    vision = d.get("vision_config") or {}
    if vision.get("model_type", "clip_vision_model") not in ("clip_vision_model", None):
        raise CheckpointError(f"{source}: vision_config.model_type {vision.get('model_type')!r} is not supported "
                              "(LLaVA-1.5 uses a CLIP vision tower)")
    act = d.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"{source}: projector_hidden_act {act!r} is not supported (LLaVA-1.5 uses gelu)")
    layer = d.get("vision_feature_layer", -2)
    if isinstance(layer, list):
        raise CheckpointError(f"{source}: several vision_feature_layer values ({layer}) are not supported")
    strategy = d.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise CheckpointError(f"{source}: vision_feature_select_strategy {strategy!r} is not supported")
    aspect = d.get("image_aspect_ratio")
    if aspect is None:
        aspect = "pad" if (preprocessor or {}).get("do_pad") else "square"
    rope = text.get("rope_parameters") or {}
    scaling = text.get("rope_scaling")
    if rope and rope.get("rope_type", "default") not in ("default", None):
        scaling = {"type": rope["rope_type"], "factor": rope.get("factor", 1.0)}
    flat = {
        "hidden_size": text.get("hidden_size", 4096), "intermediate_size": text.get("intermediate_size", 11008),
        "num_hidden_layers": text.get("num_hidden_layers", 32),
        "num_attention_heads": text.get("num_attention_heads", 32),
        "num_key_value_heads": text.get("num_key_value_heads") or text.get("num_attention_heads", 32),
        "vocab_size": text.get("vocab_size", 32000), "rms_norm_eps": text.get("rms_norm_eps", 1e-6),
        "max_position_embeddings": text.get("max_position_embeddings", 4096),
        "rope_theta": rope.get("rope_theta", text.get("rope_theta", 10000.0)), "rope_scaling": scaling,
        "bos_token_id": text.get("bos_token_id", 1), "eos_token_id": text.get("eos_token_id", 2),
        "pad_token_id": text.get("pad_token_id"), "tie_word_embeddings": d.get("tie_word_embeddings", False),
        "mm_vision_tower": d.get("mm_vision_tower"), "mm_hidden_size": vision.get("hidden_size", 1024),
        "mm_vision_select_layer": layer, "mm_vision_select_feature": "patch" if strategy == "default" else "cls_patch",
        "mm_projector_type": "mlp2x_gelu", "image_aspect_ratio": aspect,
        "tokenizer_model_max_length": d.get("tokenizer_model_max_length", 2048), "conv_mode": d.get("conv_mode"),
        "mm_vision_config": {k: vision[k] for k in VISION_KEYS if k in vision} or dict(CLIP_L336),
    }
    return LlavaConfig.from_dict(flat, source)


