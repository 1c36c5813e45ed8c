"""transformers Qwen3-VL state dict (``model.visual.*``, ``model.language_model.*``, ``lm_head.weight``)
-> ``Qwen3VLModel`` parameter names (spec section 2).

Renames: ``model.visual.X`` -> ``visual.X`` (the Conv3d ``patch_embed.proj`` becomes the linear
``patch_embed``, its weight flattened to ``[Dv, C*T*P*P]``), ``model.language_model.X`` ->
``language_model.X``, ``lm_head.weight`` -> ``language_model.lm_head.weight``. With tied embeddings a
stored ``lm_head.weight`` is dropped (the head computes with ``embed_tokens``); untied, it is required.
Older exports without the ``model.`` level (``visual.*`` / ``model.*`` for the text model) are accepted.
"""
from __future__ import annotations

import torch

from ...errors import CheckpointError
from .config import Qwen3VLConfig

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_to_ours(key: str) -> str | None:
    """Our parameter name of one transformers key (``None`` for keys without a parameter here)."""
    if key.endswith(IGNORED_SUFFIXES):
        return None
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    for prefix, ours in (("model.visual.", "visual."), ("visual.", "visual."),
                         ("model.language_model.", "language_model."), ("model.", "language_model.")):
        if key.startswith(prefix):
            rest = key[len(prefix):]
            if ours == "visual." and rest.startswith("patch_embed.proj."):
                rest = "patch_embed." + rest[len("patch_embed.proj."):]
            return ours + rest
    return None


def map_hf_state_dict(state: dict[str, torch.Tensor], config: Qwen3VLConfig) -> dict[str, torch.Tensor]:
    """Rename (and reshape the patch embedding of) a transformers state dict; unknown keys raise."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        ours = hf_to_ours(key)
        if ours is None:
            if not key.endswith(IGNORED_SUFFIXES):
                unknown.append(key)
            continue
        if ours == "language_model.lm_head.weight" and config.tie_word_embeddings:
            continue
        if ours == "visual.patch_embed.weight":
            tensor = tensor.reshape(tensor.shape[0], -1)
        if ours in out:
            raise CheckpointError(f"two checkpoint keys map to {ours} (one of them {key})")
        out[ours] = tensor
    if unknown:
        raise CheckpointError(f"{len(unknown)} checkpoint key(s) are not part of Qwen3-VL, e.g. {unknown[0]}")
    return out


def load_hf_state_dict(model, state: dict[str, torch.Tensor]) -> None:
    """Copy a transformers Qwen3-VL state dict into ``model`` (a ``Qwen3VLModel``), checking that every
    parameter is present with its shape; tensors are cast to the parameter dtype."""
    mapped = map_hf_state_dict(state, model.config)
    params = dict(model.named_parameters(remove_duplicate=True))
    missing = [k for k in params if k not in mapped]
    if missing:
        hint = " (untied lm_head needs lm_head.weight)" if "language_model.lm_head.weight" in missing else ""
        raise CheckpointError(f"the checkpoint lacks {len(missing)} tensor(s), e.g. {missing[0]}{hint}")
    extra = [k for k in mapped if k not in params]
    if extra:
        raise CheckpointError(f"checkpoint tensor {extra[0]} has no place in this Qwen3-VL model")
    with torch.no_grad():
        for name, p in params.items():
            t = mapped[name]
            if tuple(t.shape) != tuple(p.shape):
                raise CheckpointError(f"{name}: checkpoint shape {list(t.shape)}, config expects {list(p.shape)}")
            p.copy_(t.to(p.dtype))


def ours_to_hf(name: str, config: Qwen3VLConfig) -> str | None:
    """The transformers key of one ``Qwen3VLModel`` state-dict entry (inverse of ``hf_to_ours``); ``None`` for a
    tied ``lm_head`` (the checkpoint stores the matrix once, as ``embed_tokens``) and names outside the model."""
    if name == "language_model.lm_head.weight":
        return None if config.tie_word_embeddings else "lm_head.weight"
    if name.startswith("visual.patch_embed."):
        return "model.visual.patch_embed.proj." + name[len("visual.patch_embed."):]
    if name.startswith(("visual.", "language_model.")):
        return "model." + name
    return None


def hf_tensor(key: str, tensor: torch.Tensor, config: Qwen3VLConfig) -> torch.Tensor:
    """A tensor in its on-disk shape: the patch embedding back to the Conv3d's ``[Dv, C, T, P, P]``."""
    if key == "model.visual.patch_embed.proj.weight":
        v = config.vision
        return tensor.reshape(tensor.shape[0], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return tensor
