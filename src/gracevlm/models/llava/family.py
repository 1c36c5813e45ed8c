"""The LLaVA-1.5 family behind the ``models.registry.Family`` contract, and its per-model ``Runtime``."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ...errors import InputError
from ..checkpoint import OpenedCheckpoint
from ..registry import Family, Runtime
from .build import build_llava
from .chat import (IMAGE_TOKEN_INDEX, default_conv_mode, get_template, prepare_user_text, render_prompt,
                   tokenize_with_images)
from .config import CLIP_L336, PROJECTOR_PREFIX, VISION_PREFIX
from .processing import ImageSpec, preprocess_images
from .train_data import LlavaTrainingFormat
from .train_forward import forward_batch, n_image_tokens
from .weights import config_for_model, grace_key, model_layout, open_llava


def normalize_messages(messages: list[dict]) -> tuple[list[dict], list[Any]]:
    """OpenAI-style messages (content a string or text/image parts) -> LLaVA turns (user texts with their
    ``<image>`` placeholders placed; a system/developer message kept for the template's system slot) and the
    images in order."""
    out, images = [], []
    for i, msg in enumerate(messages):
        role, content = msg.get("role"), msg.get("content")
        if role == "developer":
            role = "system"  # OpenAI's newer name; the template's system slot either way
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise InputError(f"message {i}: content must be a string or a list of parts")
        texts, n_img = [], 0
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(part.get("text", ""))
            elif kind in ("image", "image_url"):
                if role != "user":
                    raise InputError(f"message {i}: images are only allowed in user messages")
                images.append(part.get("image") if kind == "image" else part["image_url"])
                n_img += 1
            else:
                raise InputError(f"message {i}: unknown content part {part!r}")
        text = "\n".join(t for t in texts if t)
        out.append({"role": role, "content": prepare_user_text(text, n_img) if n_img else text})
    return out, images


class LlavaRuntime(Runtime):
    """Templates (``conv_mode``: the checkpoint's, else vicuna_v1), ``<image>`` tokenization, pad-to-square
    CLIP preprocessing at the tower's image size."""

    image_marker = IMAGE_TOKEN_INDEX

    def __init__(self, loaded, conv_mode: str | None = None):
        cfg = loaded.config
        self.tokenizer = loaded.tokenizer
        self.conv_mode = conv_mode or default_conv_mode(cfg.raw)
        get_template(self.conv_mode)  # validate early
        tower = loaded.model.vision_tower
        self.tower, self.select_feature, self._max_token_bytes = tower, loaded.model.select_feature, None
        size = tower.config.image_size if tower is not None else CLIP_L336["image_size"]
        self.image_spec = ImageSpec.from_llava_config(cfg.raw, size=size)
        self.max_context = min(cfg.tokenizer_model_max_length, cfg.max_position_embeddings)

    def chat_prompt(self, messages: list[dict], conv_mode: str | None = None) -> tuple[str, list[Any]]:
        turns, images = normalize_messages(messages)
        return render_prompt(turns, get_template(conv_mode or self.conv_mode)), images

    def user_prompt(self, prompt: str, n_images: int, conv_mode: str | None = None, system: str | None = None) -> str:
        turns = ([] if system is None else [{"role": "system", "content": system}]) + \
            [{"role": "user", "content": prepare_user_text(prompt, n_images)}]
        return render_prompt(turns, get_template(conv_mode or self.conv_mode))

    def tokenize(self, prompt_text: str) -> list[int]:
        return tokenize_with_images(prompt_text, self.tokenizer)

    def text_ids(self, text: str) -> list[int]:
        """A plain prompt with no template: BOS, then ``text`` as the tokenizer reads it (``<image>`` is text)."""
        return self.tokenizer.encode(text, add_bos=True)

    def preprocess(self, images: list[Any]) -> torch.Tensor:
        return preprocess_images(images, self.image_spec)

    def image_positions(self) -> int:
        """(image_size / patch_size)^2 patches (+1 with 'cls_patch'), whatever the image."""
        if self.tower is None:
            return 0
        cfg = self.tower.config
        n = (cfg.image_size // cfg.patch_size) ** 2
        return n + (1 if self.select_feature == "cls_patch" else 0)

    def max_token_bytes(self) -> int:
        if self._max_token_bytes is None:
            tok, sp = self.tokenizer, self.tokenizer.sp
            longest = max(len(sp.IdToPiece(i).encode("utf-8")) for i in range(sp.GetPieceSize()))
            specials = (tok.bos_token, tok.eos_token, tok.unk_token)
            self._max_token_bytes = max(longest, *(len(t.encode("utf-8")) for t in specials), 1)
        return self._max_token_bytes

    def set_max_image_pixels(self, max_pixels: int) -> None:
        self.image_spec = replace(self.image_spec, max_pixels=max_pixels)

    @property
    def max_image_pixels(self) -> int:
        return self.image_spec.max_pixels


class LlavaFamily(Family):
    name = "llava"
    model_types = ("llava", "llava_llama")
    architectures = ("LlavaLlamaForCausalLM", "LlavaForConditionalGeneration")
    export_formats = ("llava-hf", "compressed-tensors", "gguf")
    qat_skip_keywords = ("vision_tower", "mm_projector", "lm_head", "embed_tokens")

    def open(self, folder: Path, fmt: str, raw: dict) -> OpenedCheckpoint:
        return open_llava(self, folder, fmt, raw)

    def build(self, opened, options):
        return build_llava(opened, options)

    def runtime(self, loaded, conv_mode: str | None = None) -> LlavaRuntime:
        return LlavaRuntime(loaded, conv_mode)

    def describe(self, opened: OpenedCheckpoint) -> dict:
        cfg, keys = opened.config, opened.store.keys()
        return {"family": self.name, "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
                "intermediate_size": cfg.intermediate_size, "heads": cfg.num_attention_heads,
                "kv_heads": cfg.num_key_value_heads, "vocab_size": cfg.vocab_size,
                "vision_tower": "bundled" if any(k.startswith(VISION_PREFIX) for k in keys) else cfg.mm_vision_tower,
                "projector": cfg.mm_projector_type, "vision_select_layer": cfg.mm_vision_select_layer,
                "image_aspect_ratio": cfg.image_aspect_ratio}

    def part_of(self, key: str) -> str:
        if key.startswith(VISION_PREFIX):
            return "vision_tower"
        if key.startswith(PROJECTOR_PREFIX):
            return "projector"
        if key.startswith("model.embed_tokens"):
            return "embed_tokens"
        if key.startswith("lm_head"):
            return "lm_head"
        return "language_model"

    def owns_model(self, model) -> bool:
        try:
            model_layout(model)
        except InputError:
            return False
        return True

    def checkpoint_key(self, name: str, model) -> str | None:
        return grace_key(name, model_layout(model))

    def config_for_model(self, model, conv_mode: str | None = None, max_length: int = 2048) -> dict:
        return config_for_model(model, conv_mode, max_length)

    def training_format(self, loaded, conv_mode: str | None = None) -> LlavaTrainingFormat:
        runtime = LlavaRuntime(loaded, conv_mode or "vicuna_v1")  # label masking needs a TWO-style template
        fmt = LlavaTrainingFormat(loaded.tokenizer, runtime.image_spec, runtime.conv_mode)
        fmt.max_length = runtime.max_context
        return fmt

    def training_part(self, name: str) -> str:
        if name.startswith("vision_tower."):
            return "vision"
        return "projector" if name.startswith("projector.") else "language"

    def image_tokens(self, model) -> int:
        return n_image_tokens(model)

    def forward_batch(self, model, batch: dict, hidden_layer: int | None = None):
        return forward_batch(model, batch, hidden_layer)
