"""Qwen3-VL composition: vision tower + Qwen3 decoder, prompt preparation (image embeddings scattered
into the pad positions, deepstack mask, 3-axis positions) and a greedy prefill + decode loop that drives
the decoder the way ``engine.generate.stream_generate`` drives ``LlamaForCausalLM``.
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


class Qwen3VLModel(nn.Module):
    """``visual`` (transformers ``model.visual.*``) + ``language_model`` (``model.language_model.*``, ``lm_head``)."""

    def __init__(self, config: Qwen3VLConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTower(config.vision)
        self.language_model = Qwen3LanguageModel(Qwen3Spec.from_config(config.text, config.tie_word_embeddings))

    def prepare(self, ids: list[int], pixel_values: torch.Tensor | None = None, grid_thw=None,
                dtype: torch.dtype | None = None) -> PreparedPrompt:
        """Embed ``ids``, run the vision tower on the images (if any) and place their tokens."""
        lm, cfg = self.language_model, self.config
        dtype = dtype or lm.embed_tokens.weight.dtype
        ids_t = torch.as_tensor(ids, dtype=torch.long, device=lm.embed_tokens.weight.device).reshape(-1)
        if ids_t.numel() == 0:
            raise InputError("the prompt is empty")
        if int(ids_t.max()) >= cfg.text.vocab_size or int(ids_t.min()) < 0:
            raise InputError(f"token ids must lie in [0, {cfg.text.vocab_size})")
        grids = [] if grid_thw is None else torch.as_tensor(grid_thw).reshape(-1, 3).tolist()
        positions, delta = mrope_positions(ids_t.cpu(), grids, cfg.image_token_id, cfg.vision.spatial_merge_size)
        embeds = lm.embed(ids_t, dtype)
        visual = None
        if grids:
            if pixel_values is None:
                raise InputError("image grids were given without pixel_values")
            image_embeds, deepstack = self.visual(pixel_values, grids)
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
        embeds = lm.embed(tokens.view(-1, 1), lm.embed_tokens.weight.dtype)
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
