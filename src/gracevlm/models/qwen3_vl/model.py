"""Qwen3-VL composition: vision tower + Qwen3 decoder, prompt preparation (image embeddings scattered
into the pad positions, deepstack mask, 3-axis positions), the engine's model contract
(``models.registry``: ``encode_images`` / ``prompt_for`` / ``forward_prompt`` / ``forward_decode``) and a
greedy prefill + decode loop used as a self-contained reference in tests.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...errors import InputError
from .config import Qwen3VLConfig
from .language import Qwen3LanguageModel, Qwen3Spec, VisualInjection
from .rope import decode_positions, mrope_positions
from .vision import VisionTower


@dataclass
class PreparedPrompt:
    """One prompt ready for prefill: ``embeds [T, D]``, ``rope_positions [3, T]``, the decode offset
    ``delta`` and the deepstack injection (``None`` without images)."""

    embeds: torch.Tensor
    rope_positions: torch.Tensor
    delta: int
    visual: VisualInjection | None

    @property
    def length(self) -> int:
        return self.embeds.shape[0]

    @property
    def decode_offset(self) -> int:
        """Rope position of a decode token minus its cache index (the engine's per-request offset)."""
        return self.delta

    def chunk(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor, VisualInjection | None]:
        """Embeddings, rope positions ``[3, 1, n]`` and deepstack injection of prompt positions ``start:end``."""
        visual = None
        if self.visual is not None:
            mask = self.visual.mask[:, start:end]
            before = int(self.visual.mask[:, :start].sum())
            n = int(mask.sum())
            visual = VisualInjection(mask, [f[before:before + n] for f in self.visual.features])
        return self.embeds[start:end], self.rope_positions[:, start:end].unsqueeze(1), visual


@dataclass
class ImagePixels:
    """The vision tower's input for a request's images: ``pixel_values [patches, C*T*P*P]`` and
    ``grid_thw [images, 3]`` (what ``Runtime.preprocess`` returns)."""

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor

    def to(self, device=None, dtype=None) -> "ImagePixels":
        return ImagePixels(self.pixel_values.to(device=device, dtype=dtype), self.grid_thw.to(device=device))


@dataclass
class ImageFeatures:
    """Encoded images: merged tokens ``embeds [n, D]`` (images one after another), the deepstack features
    (one ``[n, D]`` per injection layer) and each image's patch grid."""

    embeds: torch.Tensor
    deepstack: list[torch.Tensor]
    grids: list[tuple[int, int, int]]
    merge_size: int

    @property
    def tokens_per_image(self) -> list[int]:
        return [t * h * w // self.merge_size ** 2 for t, h, w in self.grids]

    @property
    def positions(self) -> int:
        """Prompt positions all the images take."""
        return self.embeds.shape[0]

    def to(self, device=None, dtype=None) -> "ImageFeatures":
        return ImageFeatures(self.embeds.to(device=device, dtype=dtype),
                             [f.to(device=device, dtype=dtype) for f in self.deepstack], self.grids, self.merge_size)


class Qwen3VLModel(nn.Module):
    """``visual`` (transformers ``model.visual.*``) + ``language_model`` (``model.language_model.*``, ``lm_head``).
    ``kv_dtype``: dtype K/V are stored in (``VLM.set_kv_dtype``; None: the compute dtype)."""

    kv_dtype: torch.dtype | None = None

    def __init__(self, config: Qwen3VLConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTower(config.vision)
        self.language_model = Qwen3LanguageModel(Qwen3Spec.from_config(config.text, config.tie_word_embeddings))

    # -- the engine's model contract (models.registry) ----------------------------------------------
    @property
    def vision_tower(self) -> nn.Module:
        return self.visual

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.language_model.norm.weight.dtype

    def new_cache(self, slots: int, max_len: int, dtype: torch.dtype | None = None, pool=None):
        """A KV cache (``models.kv_cache``); with ``pool``, slots are allocated on demand from it."""
        return self.language_model.new_cache(slots, max_len, dtype or self.kv_dtype or self.compute_dtype,
                                             pool=pool)

    def decode_read_bytes(self) -> dict:
        """Weight bytes one decode step reads (``models.loader.decode_read_bytes``): the 7 decoder linears of
        every layer, the tied ``lm_head`` (the embedding matrix, read once), norms; not the embedding rows."""
        from ..loader import decode_read_bytes

        return decode_read_bytes(self.language_model, self.language_model.embed_tokens)

    @torch.inference_mode()
    def encode_images(self, pixels: ImagePixels) -> ImageFeatures:
        grids = [tuple(int(v) for v in g) for g in pixels.grid_thw.reshape(-1, 3).tolist()]
        embeds, deepstack = self.visual(pixels.pixel_values, grids)
        dtype = self.compute_dtype
        return ImageFeatures(embeds.to(dtype), [f.to(dtype) for f in deepstack], grids,
                             self.config.vision.spatial_merge_size)

    def prompt_for(self, ids: list[int], features: ImageFeatures | None) -> PreparedPrompt:
        """Prompt ids with ONE ``image_token_id`` per image (the runtime's marker) -> the prompt ready for
        prefill: each marker expanded to its image's tokens, 3-axis positions, image and deepstack rows."""
        marker = self.config.image_token_id
        n_markers = sum(1 for t in ids if t == marker)
        have = 0 if features is None else len(features.grids)
        if n_markers != have:
            raise InputError(f"the prompt has {n_markers} image placeholder(s) but {have} image(s) were given")
        if features is None:
            return self.prepare(ids, dtype=self.compute_dtype)
        counts = iter(features.tokens_per_image)
        expanded: list[int] = []
        for t in ids:
            expanded.extend([marker] * next(counts) if t == marker else [t])
        return self.place(expanded, features.grids, features.embeds, features.deepstack, self.compute_dtype)

    def prompt_length(self, ids: list[int], features: ImageFeatures | None) -> int:
        """Positions ``ids`` take once each image marker is expanded to its image's tokens (no embedding built)."""
        n = sum(1 for t in ids if t == self.config.image_token_id)
        return len(ids) - n + (sum(features.tokens_per_image) if features is not None else 0)

    def forward_prompt(self, prompt: PreparedPrompt, cache, slot: int = 0, start: int = 0,
                       end: int | None = None, logits_for: str = "last") -> torch.Tensor:
        """Prompt positions ``start:end`` (a prefill chunk) into cache slot ``slot`` -> logits ``[1, V]`` of the
        chunk's last position (``logits_for="all"``: ``[1, end - start, V]``; ``"none"``: None, the cache only)."""
        end = prompt.length if end is None else end
        embeds, rope, visual = prompt.chunk(start, end)
        dev = embeds.device
        positions = torch.arange(start, end, device=dev).unsqueeze(0)
        return self.language_model(embeds.unsqueeze(0), positions, cache, slots=torch.tensor([slot], device=dev),
                                   rope_positions=rope, visual=visual, logits_for=logits_for)

    def forward_decode(self, tokens: torch.Tensor, cache_positions: torch.Tensor, offsets, cache,
                       slots: torch.Tensor | None = None, rows_alone: bool = False) -> torch.Tensor:
        """One token per row at cache indexes ``cache_positions [B]``; rope position = index + the row's
        ``offsets`` entry (its prompt's ``decode_offset``) -> logits ``[B, V]``."""
        lm = self.language_model
        pos = cache_positions.view(-1, 1)
        embeds = lm.embed(tokens.view(-1, 1), self.compute_dtype)
        return lm(embeds, pos, cache, slots=slots, rope_positions=decode_positions(pos, offsets),
                  rows_alone=rows_alone)

    # -- prompts -------------------------------------------------------------------------------------------
    def prepare(self, ids: list[int], pixel_values: torch.Tensor | None = None, grid_thw=None,
                dtype: torch.dtype | None = None) -> PreparedPrompt:
        """Embed ``ids`` (image pads expanded), run the vision tower on the images (if any), place their tokens."""
        grids = [] if grid_thw is None else torch.as_tensor(grid_thw).reshape(-1, 3).tolist()
        image_embeds, deepstack = None, []
        if grids:
            if pixel_values is None:
                raise InputError("image grids were given without pixel_values")
            image_embeds, deepstack = self.visual(pixel_values, grids)
        return self.place(ids, grids, image_embeds, deepstack, dtype)

    def place(self, ids: list[int], grids: list, image_embeds: torch.Tensor | None, deepstack: list[torch.Tensor],
              dtype: torch.dtype | None = None) -> PreparedPrompt:
        """Embeddings of ``ids`` (pads expanded) with ``image_embeds`` at the pads, positions, deepstack mask."""
        lm, cfg = self.language_model, self.config
        dtype = dtype or self.compute_dtype
        ids_t = torch.as_tensor(ids, dtype=torch.long, device=lm.embed_tokens.weight.device).reshape(-1)
        if ids_t.numel() == 0:
            raise InputError("the prompt is empty")
        if int(ids_t.max()) >= cfg.text.vocab_size or int(ids_t.min()) < 0:
            raise InputError(f"token ids must lie in [0, {cfg.text.vocab_size})")
        positions, delta = mrope_positions(ids_t.cpu(), grids, cfg.image_token_id, cfg.vision.spatial_merge_size)
        embeds = lm.embed(ids_t, dtype)
        visual = None
        if grids:
            mask = ids_t == cfg.image_token_id
            embeds = embeds.clone()
            embeds[mask] = image_embeds.to(dtype)
            visual = VisualInjection(mask.unsqueeze(0), [f.to(dtype) for f in deepstack])
        return PreparedPrompt(embeds, positions.to(embeds.device), delta, visual)

    def prefill(self, prompt: PreparedPrompt, cache, slot: int = 0, logits_for: str = "last") -> torch.Tensor:
        """Run the whole prompt into ``cache`` slot ``slot`` (cache indexes ``0..T-1``)."""
        dev = prompt.embeds.device
        positions = torch.arange(prompt.length, device=dev).unsqueeze(0)
        return self.language_model(prompt.embeds.unsqueeze(0), positions, cache,
                                   slots=torch.tensor([slot], device=dev), logits_for=logits_for,
                                   rope_positions=prompt.rope_positions.unsqueeze(1), visual=prompt.visual)

    def decode_step(self, tokens: torch.Tensor, cache_positions: torch.Tensor, deltas, cache,
                    slots: torch.Tensor | None = None) -> torch.Tensor:
        """One new token per row: ``tokens [B]`` at cache indexes ``cache_positions [B]`` (rope position =
        cache index + the row's ``delta``) -> logits ``[B, V]``."""
        lm = self.language_model
        pos = cache_positions.view(-1, 1)
        embeds = lm.embed(tokens.view(-1, 1), self.compute_dtype)
        return lm(embeds, pos, cache, slots=slots, rope_positions=decode_positions(pos, deltas))


def greedy_generate(model: Qwen3VLModel, ids: list[int], pixel_values=None, grid_thw=None,
                    max_new_tokens: int = 16, eos_ids: tuple[int, ...] = ()) -> list[int]:
    """Argmax decoding; stops after emitting an id of ``eos_ids`` (included, as transformers returns it)."""
    with torch.inference_mode():
        prompt = model.prepare(ids, pixel_values, grid_thw)
        cache = model.language_model.new_cache(1, prompt.length + max_new_tokens)
        logits = model.prefill(prompt, cache)
        out: list[int] = []
        dev = prompt.embeds.device
        for step in range(max_new_tokens):
            token = int(logits[0].argmax())
            out.append(token)
            if token in eos_ids or step == max_new_tokens - 1:
                break
            logits = model.decode_step(torch.tensor([token], device=dev),
                                       torch.tensor([prompt.length + step], device=dev), prompt.delta, cache)
        return out
