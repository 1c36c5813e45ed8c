"""LLaVA-1.5 assembly: CLIP vision tower -> feature selection -> projector -> LLaMA input embeddings."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...errors import InputError
from ..kv_cache import KVCache, KVPool
from ..llama import LlamaForCausalLM
from .chat import IMAGE_TOKEN_INDEX


class Projector(nn.Sequential):
    """``mlp2x_gelu``: Linear(mm_hidden -> d) -> GELU (erf) -> Linear(d -> d); keys ``0.*`` and ``2.*``."""

    def __init__(self, mm_hidden: int, hidden: int):
        super().__init__(nn.Linear(mm_hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))


@dataclass
class EmbeddedPrompt:
    """A LLaVA prompt ready for prefill: ``embeds [T, D]``; positions are the cache indexes (offset 0)."""

    embeds: torch.Tensor
    decode_offset: int = 0

    @property
    def length(self) -> int:
        return self.embeds.shape[0]


class LlavaModel(nn.Module):
    """``vision_tower`` is a ``CLIPVisionTower`` (or transformers' ``CLIPVisionModel``, which has the same
    interface; None for text-only models). ``supports_prefix_cache``: positions are plain 1-D (the KV of a
    prefix depends only on the prefix), so ``engine.prefix_cache`` may reuse it."""

    supports_prefix_cache = True
    kv_dtype: torch.dtype | None = None

    def __init__(self, vision_tower: nn.Module | None, projector: nn.Module | None,
                 language_model: LlamaForCausalLM, select_layer: int = -2, select_feature: str = "patch"):
        super().__init__()
        self.vision_tower = vision_tower
        self.projector = projector
        self.language_model = language_model
        self.select_layer = select_layer
        self.select_feature = select_feature

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.language_model.model.norm.weight.dtype

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values [N, 3, H, W]`` -> projected features ``[N, n_patches, hidden]`` (compute dtype)."""
        if self.vision_tower is None or self.projector is None:
            raise RuntimeError("this model has no vision tower; it cannot take images")
        tower_dtype = next(self.vision_tower.parameters()).dtype
        out = self.vision_tower(pixel_values.to(tower_dtype), output_hidden_states=True)
        feats = out.hidden_states[self.select_layer]
        if self.select_feature == "patch":
            feats = feats[:, 1:]
        proj_dtype = self.projector[0].weight.dtype
        return self.projector(feats.to(proj_dtype)).to(self.compute_dtype)

    def prompt_length(self, token_ids: list[int], image_features: torch.Tensor | None) -> int:
        """Positions ``token_ids`` take once each ``IMAGE_TOKEN_INDEX`` is replaced by its image's feature rows
        (computed without building any embedding: the length check comes first)."""
        n = sum(1 for t in token_ids if t == IMAGE_TOKEN_INDEX)
        return len(token_ids) - n + n * (image_features.shape[1] if image_features is not None else 0)

    def embed_prompt(self, token_ids: list[int], image_features: torch.Tensor | None) -> torch.Tensor:
        """Text embeddings with each ``IMAGE_TOKEN_INDEX`` replaced by one image's feature rows.

        ``token_ids`` has one -200 per image (in order); returns ``[L, hidden]``.
        """
        n_images = sum(1 for t in token_ids if t == IMAGE_TOKEN_INDEX)
        have = 0 if image_features is None else image_features.shape[0]
        if n_images != have:
            raise InputError(f"prompt has {n_images} image positions but {have} images were given")
        lm = self.language_model
        dtype = self.compute_dtype
        pieces, run, img = [], [], 0
        for t in token_ids:
            if t == IMAGE_TOKEN_INDEX:
                if run:
                    pieces.append(lm.embed(torch.tensor(run, device=lm.lm_head.weight.device), dtype))
                    run = []
                pieces.append(image_features[img])
                img += 1
            else:
                run.append(t)
        if run:
            pieces.append(lm.embed(torch.tensor(run, device=lm.lm_head.weight.device), dtype))
        return torch.cat(pieces, dim=0)

    def new_cache(self, slots: int, max_len: int, dtype: torch.dtype | None = None,
                  pool: KVPool | None = None) -> KVCache:
        """A KV cache in ``dtype``, else ``kv_dtype`` when set (``VLM.set_kv_dtype``), else the compute dtype;
        with ``pool``, slots are allocated on demand from it (``models.kv_cache``)."""
        return KVCache(self.language_model.spec, slots, max_len, dtype or self.kv_dtype or self.compute_dtype,
                       self.language_model.lm_head.weight.device, pool)

    def decode_read_bytes(self) -> dict:
        """Weight bytes one decode step reads (``models.loader.decode_read_bytes``): the decoder linears in
        their kernels' layout, ``lm_head``, norms; not the embedding rows."""
        from ..loader import decode_read_bytes

        return decode_read_bytes(self.language_model, self.language_model.model.embed_tokens)

    # -- the engine's model contract (models.registry) -------------------------------------------------
    def prompt_for(self, token_ids: list[int], image_features: torch.Tensor | None) -> EmbeddedPrompt:
        return EmbeddedPrompt(self.embed_prompt(token_ids, image_features))

    def forward_prompt(self, prompt: EmbeddedPrompt, cache: KVCache, slot: int = 0, start: int = 0,
                       end: int | None = None, logits_for: str = "last") -> torch.Tensor:
        """Prompt positions ``start:end`` (a prefill chunk) into cache slot ``slot`` -> logits ``[1, V]`` of the
        chunk's last position (``logits_for="all"``: ``[1, end - start, V]``; ``"none"``: None, the cache only)."""
        end = prompt.length if end is None else end
        dev = prompt.embeds.device
        positions = torch.arange(start, end, device=dev).unsqueeze(0)
        return self.language_model(prompt.embeds[start:end].unsqueeze(0), positions, cache,
                                   torch.tensor([slot], device=dev), logits_for=logits_for)

    def forward_decode(self, tokens: torch.Tensor, cache_positions: torch.Tensor, offsets, cache: KVCache,
                       slots: torch.Tensor | None = None, rows_alone: bool = False) -> torch.Tensor:
        """One token per row at cache indexes ``cache_positions [B]`` -> logits ``[B, V]`` (LLaVA's rope
        positions are the cache indexes: ``offsets`` are all 0)."""
        lm = self.language_model
        b = tokens.shape[0]
        return lm(lm.embed(tokens.view(b, 1), self.compute_dtype), cache_positions.view(b, 1), cache, slots,
                  rows_alone=rows_alone)
