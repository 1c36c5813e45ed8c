"""The Qwen3-VL family behind the ``models.registry.Family`` contract, and its per-model ``Runtime``.

Prompts come from the checkpoint's own chat template (system messages supported). In prompt ids each image is
ONE ``<|image_pad|>`` (``image_marker`` = ``config.image_token_id``); the model's ``prompt_for`` expands it to the
image's ``t*h*w/m^2`` tokens once the image is encoded, so ``generate``/``chat``/the scheduler/the server give
the ids ``Qwen3VLProcessor.apply_chat_template(..., tokenize=True)`` gives, pads expanded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import InputError
from ..checkpoint import OpenedCheckpoint
from ..images import DEFAULT_MAX_PIXELS, decode_image
from ..registry import Family, Runtime
from .benchmark_prompts import GraceQwen3VLPrompts
from .build import DECODER_LINEARS, build_qwen3_vl, open_qwen3_vl
from .chat import IMAGE_PAD, ChatPrompt, load_chat_template
from .export import FORMATS as EXPORT_FORMATS, write_qwen3_vl_export
from .model import ImagePixels, Qwen3VLModel
from .processing import ImageProcessorConfig, process_images
from .train_data import Qwen3VLTrainingFormat
from .train_forward import forward_batch
from .weights import hf_tensor, ours_to_hf

PLACEHOLDER = "<image>"  # where ``user_prompt`` puts the images when the prompt names their places


def normalize_messages(messages: list[dict]) -> tuple[list[dict], list[Any]]:
    """OpenAI-style messages (content a string or text/image/image_url parts) -> template messages (each image
    part ``{"type": "image"}``) and the images in prompt order."""
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    out, images = [], []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise InputError(f"message {i}: must be an object with a 'role' string")
        role, content = msg["role"], msg.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise InputError(f"message {i}: content must be a string or a list of parts")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind in ("image", "image_url"):
                if role != "user":
                    raise InputError(f"message {i}: images are only allowed in user messages")
                source = part.get("image") if kind == "image" else part.get("image_url")
                if source is None:
                    raise InputError(f"message {i}: an {kind} part needs its {kind!r} value")
                images.append(source)
                parts.append({"type": "image"})
            else:
                raise InputError(f"message {i}: unknown content part {part!r}")
        out.append({"role": role, "content": parts})
    return out, images


def user_parts(prompt: str, n_images: int) -> list[dict]:
    """A single-turn user message: the images first (one part each), or at the ``<image>`` placeholders when the
    prompt has exactly one per image."""
    if not isinstance(prompt, str):
        raise InputError(f"prompt must be a str, got {type(prompt).__name__}")
    count = prompt.count(PLACEHOLDER)
    if count == 0:
        return [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
    if count != n_images:
        raise InputError(f"prompt has {count} {PLACEHOLDER} placeholder(s) but {n_images} image(s) were given; use "
                         f"one {PLACEHOLDER} per image, or none to put the images before the text")
    parts: list[dict] = []
    for k, text in enumerate(prompt.split(PLACEHOLDER)):
        if k:
            parts.append({"type": "image"})
        if text:
            parts.append({"type": "text", "text": text})
    return parts


class Qwen3VLRuntime(Runtime):
    """The checkpoint's chat template and tokenizer, ``smart_resize`` processing as ``preprocessor_config.json``
    sets it, and a decompression-bomb pixel cap checked before any image is decoded."""

    def __init__(self, loaded, conv_mode: str | None = None):
        cfg = loaded.config
        if conv_mode not in (None, "", "default"):
            raise InputError(f"conv_mode {conv_mode!r} does not apply to Qwen3-VL: its prompts come from the "
                             "checkpoint's chat template")
        self.conv_mode = None
        self.tokenizer = loaded.tokenizer
        self.prompt = ChatPrompt(load_chat_template(loaded.path), loaded.tokenizer, cfg)
        self.prompt.check_token_ids()
        self.image_config = ImageProcessorConfig.from_folder(loaded.path)
        self.image_marker = cfg.image_token_id
        self.max_context = cfg.text.max_position_embeddings
        self._max_pixels = DEFAULT_MAX_PIXELS
        self._max_token_bytes = None

    def chat_prompt(self, messages: list[dict], conv_mode: str | None = None) -> tuple[str, list[Any]]:
        turns, images = normalize_messages(messages)
        return self.prompt.text(turns), images

    def user_prompt(self, prompt: str, n_images: int, conv_mode: str | None = None, system: str | None = None) -> str:
        turns = ([] if system is None else [{"role": "system", "content": system}]) + \
            [{"role": "user", "content": user_parts(prompt, n_images)}]
        return self.prompt.text(turns)

    def image_positions(self) -> int:
        """The most tokens one image can take: ``smart_resize`` keeps h*w <= max_pixels, one token per
        (patch * merge)^2 pixels."""
        c = self.image_config
        return max(1, c.max_pixels // (c.patch_size * c.merge_size) ** 2)

    def max_token_bytes(self) -> int:
        """Byte-level BPE: one vocabulary character per byte; added (special) tokens by their UTF-8 text."""
        if self._max_token_bytes is None:
            vocab = self.tokenizer.tok.get_vocab(with_added_tokens=True)
            special = set(self.tokenizer.special_tokens().values())
            self._max_token_bytes = max([len(t.encode("utf-8")) if t in special else len(t) for t in vocab] + [1])
        return self._max_token_bytes

    def tokenize(self, prompt_text: str) -> list[int]:
        """Templated text (one ``<|image_pad|>`` per image) -> ids."""
        return self.tokenizer.encode(prompt_text)

    def text_ids(self, text: str) -> list[int]:
        """A plain prompt: the tokenizer's ids of ``text`` (special tokens read literally, nothing prepended); an
        ``<|image_pad|>`` in it is refused, since no image comes with a plain prompt."""
        if IMAGE_PAD in text:
            raise InputError(f"a plain text prompt cannot contain {IMAGE_PAD}: it takes no images")
        return self.tokenizer.encode(text)

    def preprocess(self, images: list[Any]) -> ImagePixels:
        decoded = []
        for i, source in enumerate(images):
            try:
                decoded.append(decode_image(source, self._max_pixels).image)
            except InputError as exc:
                raise InputError(f"image {i} of {len(images)}: {exc}") from exc
        pixels, grids = process_images(decoded, self.image_config)
        return ImagePixels(torch.from_numpy(pixels), torch.from_numpy(np.asarray(grids)))

    def set_max_image_pixels(self, max_pixels: int) -> None:
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
            raise InputError(f"max_pixels must be a positive integer, got {max_pixels!r}")
        self._max_pixels = max_pixels

    @property
    def max_image_pixels(self) -> int:
        return self._max_pixels


class Qwen3VLFamily(Family):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    architectures = ("Qwen3VLForConditionalGeneration",)
    qat_skip_keywords = ("visual", "merger", "lm_head", "embed_tokens")  # GRACE's replace_linears_with_qat
    qat_fields = ("bits", "group_size", "skip_keywords", "num_replaced")  # train_qwen_qat.py's config.qat
    release_dtype = "bfloat16"  # GRACE's Qwen3-VL releases: dense bf16, baked weights bf16(q * s)
    export_formats = EXPORT_FORMATS

    def export_writer(self, fmt: str):
        return write_qwen3_vl_export

    def export_card(self, fmt: str, out: str, source: str) -> dict:
        from .card import card_sections

        return card_sections(fmt, out, source)

    def transformers_check(self, folder: Path):
        from .peer import TransformersPeer

        return TransformersPeer(folder)

    def open(self, folder: Path, fmt: str, raw: dict) -> OpenedCheckpoint:
        return open_qwen3_vl(self, folder, fmt, raw)

    def build(self, opened, options):
        return build_qwen3_vl(opened, options)

    def runtime(self, loaded, conv_mode: str | None = None) -> Qwen3VLRuntime:
        return Qwen3VLRuntime(loaded, conv_mode)

    def benchmark_prompts(self) -> GraceQwen3VLPrompts:
        """GRACE's Qwen3-VL evaluation prompts and letter extraction (``benchmark_prompts``)."""
        return GraceQwen3VLPrompts()

    def describe(self, opened: OpenedCheckpoint) -> dict:
        cfg = opened.config
        t, v = cfg.text, cfg.vision
        out = {"family": self.name, "layers": t.num_hidden_layers, "hidden_size": t.hidden_size,
               "intermediate_size": t.intermediate_size, "heads": t.num_attention_heads,
               "kv_heads": t.num_key_value_heads, "head_dim": t.head_dim, "vocab_size": t.vocab_size,
               "tie_word_embeddings": cfg.tie_word_embeddings, "mrope_section": t.mrope_section,
               "vision": {"depth": v.depth, "hidden_size": v.hidden_size, "patch_size": v.patch_size,
                          "merge_size": v.spatial_merge_size, "position_grid": v.grid_side,
                          "deepstack_visual_indexes": v.deepstack_visual_indexes}}
        q = opened.quantized
        if q.method is not None:
            out["quantized"] = {"method": q.method, "bits": q.bits, "group_size": q.group_size,
                                "modules": len(q.names), "linears_per_layer": list(DECODER_LINEARS)}
        return out

    def part_of(self, key: str) -> str:
        if key.startswith(("model.visual.", "visual.")):
            return "vision_tower"
        if "embed_tokens" in key:
            return "embed_tokens"
        if key.startswith("lm_head"):
            return "lm_head"
        return "language_model"

    # -- training (gracevlm.train) ----------------------------------------------------------------------------
    def owns_model(self, model) -> bool:
        return isinstance(model, Qwen3VLModel)

    def checkpoint_key(self, name: str, model) -> str | None:
        return ours_to_hf(name, model.config)

    def checkpoint_tensor(self, key: str, tensor: torch.Tensor, model) -> torch.Tensor:
        return hf_tensor(key, tensor, model.config)

    def config_for_model(self, model, conv_mode: str | None = None, max_length: int = 2048) -> dict:
        """The model's own ``config.json`` (as read; a training export adds or drops ``qat``)."""
        return dict(model.config.raw)

    def training_format(self, loaded, conv_mode: str | None = None) -> Qwen3VLTrainingFormat:
        runtime = Qwen3VLRuntime(loaded, conv_mode)
        return Qwen3VLTrainingFormat(runtime.prompt, runtime.image_config, runtime.max_context)

    def image_tokens(self, model) -> None:
        return None  # t*h*w/m^2: depends on each image's size (Qwen3VLTrainingFormat.image_tokens)

    def training_part(self, name: str) -> str:
        """GRACE's Qwen3-VL recipe (``tune_mm_vision False, tune_mm_mlp True``): the ViT blocks, patch and position
        embeddings and deepstack mergers are the frozen "vision"; the final merger is the "projector"."""
        if name.startswith("visual.merger."):
            return "projector"
        return "vision" if name.startswith("visual.") else "language"

    def forward_batch(self, model, batch: dict, hidden_layer: int | None = None):
        return forward_batch(model, batch, hidden_layer)
