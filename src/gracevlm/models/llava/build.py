"""Build a ``LlavaModel`` from an opened LLaVA checkpoint: LLaMA decoder, mlp2x_gelu projector, CLIP tower
(bundled in the checkpoint, or the CLIP folder ``mm_vision_tower`` names)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...errors import CheckpointError
from ...formats.hub import resolve_model_path
from ..checkpoint import OpenedCheckpoint
from ..llama import LlamaSpec
from ..loader import LoadedModel, LoadOptions, LoadStats, assign, language_bytes, load_llama, module_nbytes, warn_unused
from ..tokenizer import LlamaTokenizer
from .config_checks import check_vision_select_layer
from .config import IGNORED_KEYS, PROJECTOR_PREFIX, VISION_PREFIX, LlavaConfig, vision_config_dict
from .model import LlavaModel, Projector
from .vision import CLIPVisionSpec, load_clip_folder, tower_from_tensors


def llama_spec(cfg: LlavaConfig) -> LlamaSpec:
    factor = 1.0
    if cfg.rope_scaling and cfg.rope_scaling.get("type", cfg.rope_scaling.get("rope_type")) == "linear":
        factor = float(cfg.rope_scaling["factor"])
    return LlamaSpec(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                     cfg.num_key_value_heads, cfg.vocab_size, cfg.rms_norm_eps, cfg.rope_theta, factor,
                     cfg.max_position_embeddings)


def bundled_vision_spec(cfg: LlavaConfig, store, folder: Path) -> CLIPVisionSpec:
    """The config of a tower bundled in the checkpoint (``vision_config_dict``: explicit, the
    ``mm_vision_tower`` folder's, or implied by the tensors)."""
    return CLIPVisionSpec.from_dict(vision_config_dict(cfg, store.keys(), store.get_slice_shape, base=folder),
                                    f"the vision tower config of {folder}")


def load_vision_tower(cfg: LlavaConfig, store, folder: Path, dtype: torch.dtype) -> nn.Module | None:
    """The CLIP tower: bundled in the checkpoint (``VISION_PREFIX`` tensors), else the transformers CLIP
    folder or Hub id ``mm_vision_tower`` names (LLaVA-1.5: openai/clip-vit-large-patch14-336)."""
    keys = [k for k in store.keys() if k.startswith(VISION_PREFIX)]
    if keys:
        return tower_from_tensors(bundled_vision_spec(cfg, store, folder),
                                  {k[len(VISION_PREFIX):]: store.get(k) for k in keys}, dtype, str(folder))
    if not cfg.mm_vision_tower:
        return None
    path = resolve_model_path(cfg.mm_vision_tower, base=folder)
    try:
        return load_clip_folder(path, dtype)
    except CheckpointError as exc:
        raise CheckpointError(f"cannot load the vision tower from {path} (mm_vision_tower="
                              f"{cfg.mm_vision_tower!r}): {exc}") from exc


def load_projector(cfg: LlavaConfig, store, dtype: torch.dtype,
                   device: torch.device = torch.device("cpu")) -> tuple[nn.Module | None, set[str]]:
    if f"{PROJECTOR_PREFIX}0.weight" not in store:
        return None, set()
    if cfg.mm_projector_type != "mlp2x_gelu":
        raise CheckpointError(f"mm_projector_type {cfg.mm_projector_type!r} is not supported (mlp2x_gelu)")
    with torch.device("meta"):
        projector = Projector(cfg.mm_hidden_size, cfg.hidden_size)
    used = set()
    for name, _ in list(projector.named_parameters()):
        key = PROJECTOR_PREFIX + name
        assign(projector, name, store.get(key).to(device=device, dtype=dtype))
        used.add(key)
    return projector, used


def build_llava(opened: OpenedCheckpoint, options: LoadOptions) -> LoadedModel:
    cfg, store, folder = opened.config, opened.store, opened.folder
    tokenizer = LlamaTokenizer.from_dir(folder)
    lm, used = load_llama(opened, llama_spec(cfg), options, cfg.tie_word_embeddings)
    vision_dtype = options.vision_dtype or options.dtype
    projector, proj_keys = load_projector(cfg, store, vision_dtype, options.device)
    vision = load_vision_tower(cfg, store, folder, vision_dtype) if projector is not None else None
    if vision is not None and options.device.type != "cpu":
        vision.to(options.device)  # CLIP-L is 0.6 GB in fp16: built on the CPU, then moved
    check_vision_select_layer(cfg.mm_vision_select_layer, vision, str(folder / "config.json"))
    warn_unused(opened, used | proj_keys | set(IGNORED_KEYS), also_ignored=(VISION_PREFIX,))
    model = LlavaModel(vision, projector, lm, cfg.mm_vision_select_layer, cfg.mm_vision_select_feature).eval()
    stats = LoadStats(opened.format)
    stats.bytes_by_part = {**language_bytes(lm), "vision_tower": module_nbytes(vision),
                           "projector": module_nbytes(projector)}
    return LoadedModel(model, tokenizer, cfg, folder, stats)
