"""LLaVA / ShareGPT4V conversation records -> Qwen3-VL token ids and labels, as GRACE's Qwen3-VL training builds them.

A record is the format LLaVA training reads: ``{"image": "relative/path.png" (optional), "conversations":
[{"from": "human", "value": "<image>\\nWhat ...?"}, {"from": "gpt", "value": "..."}, ...]}``. As GRACE's
``qwenvl/data/data_processor.py`` (``_build_messages`` + ``preprocess_qwen_visual``):

* a human message becomes a user message whose content parts are its text split at ``<image>``: each
  ``<image>`` an image part, each non-blank text piece a text part (stripped); a gpt message becomes an
  assistant message with one text part holding its value verbatim. The number of ``<image>`` placeholders must
  equal the number of images (one per record here);
* the messages are rendered with the checkpoint's own chat template (no generation prompt) and tokenized
  (special tokens matched literally); each image is ONE ``<|image_pad|>`` (``image_marker``), expanded to the
  image's ``t*h*w/m^2`` tokens when a batch is collated;
* labels: only the tokens of each assistant turn's content, its end-of-turn tokens included (what GRACE labels:
  from after ``<|im_start|>assistant\\n`` through ``<|im_end|>`` and the newline after it). The span of an
  assistant message ``k`` is found from the template itself: ``render(messages[:k], generation prompt)`` must be
  a prefix of ``render(messages[:k + 1])``, and the span is the rest of the latter. A token is supervised when
  its first character lies inside a span. Nothing is hard-coded: no token id, no role text.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ...errors import InputError
from ..images import DEFAULT_MAX_PIXELS, decode_image
from ..training import IGNORE_INDEX, Example
from .chat import IMAGE_PAD, ChatPrompt
from .model import ImagePixels
from .processing import ImageProcessorConfig, image_token_count, process_images

IMAGE_PLACEHOLDER = "<image>"
ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def record_messages(record: dict, index: int = 0) -> tuple[list[dict], int]:
    """One record -> (template messages, number of image parts). Raises InputError naming the record."""
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise InputError(f"record {index}: 'conversations' must be a non-empty list")
    image = record.get("image")
    if image is not None and not isinstance(image, str):
        raise InputError(f"record {index}: 'image' must be one path (a string); multi-image records are not "
                         "supported for Qwen3-VL training")
    messages, n_images = [], 0
    for k, msg in enumerate(conv):
        if not isinstance(msg, dict) or msg.get("from") not in ROLE_MAP or not isinstance(msg.get("value"), str):
            raise InputError(f"record {index}, message {k}: expected {{'from': 'human'|'gpt', 'value': str}}")
        role, text = ROLE_MAP[msg["from"]], msg["value"]
        if role == "user":
            parts = []
            for seg in re.split(f"({re.escape(IMAGE_PLACEHOLDER)})", text):
                if seg == IMAGE_PLACEHOLDER:
                    parts.append({"type": "image"})
                    n_images += 1
                elif seg.strip():
                    parts.append({"type": "text", "text": seg.strip()})
            messages.append({"role": role, "content": parts})
        elif IMAGE_PLACEHOLDER in text:
            raise InputError(f"record {index}, message {k}: {IMAGE_PLACEHOLDER} is only allowed in human messages")
        elif role == "system":
            messages.append({"role": role, "content": text})
        else:
            messages.append({"role": role, "content": [{"type": "text", "text": text}]})
    want = 0 if image is None else 1
    if n_images != want:
        raise InputError(f"record {index}: {n_images} {IMAGE_PLACEHOLDER} placeholder(s) but {want} image(s); "
                         f"Qwen3-VL training needs one {IMAGE_PLACEHOLDER} per image")
    if not any(m["role"] == "assistant" for m in messages):
        raise InputError(f"record {index}: no gpt message (nothing to learn)")
    return messages, n_images


def assistant_spans(prompt: ChatPrompt, messages: list[dict], index: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The templated text of ``messages`` (no generation prompt) and the character span of each assistant turn
    (its content and end-of-turn text, up to where the next message starts)."""
    full = prompt.text(messages, add_generation_prompt=False)
    spans = []
    for k, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        head = prompt.text(messages[:k], add_generation_prompt=True)
        upto = prompt.text(messages[:k + 1], add_generation_prompt=False)
        if not upto.startswith(head) or not full.startswith(upto):
            raise InputError(f"record {index}: the chat template does not render this conversation turn by turn "
                             f"(message {k}), so its assistant tokens cannot be located")
        spans.append((len(head), len(upto)))
    return full, spans


def tokenize_conversation(record: dict, prompt: ChatPrompt, index: int = 0) -> Example:
    """One record -> ``Example``: ids with one ``<|image_pad|>`` per image, labels on the assistant spans only."""
    messages, _ = record_messages(record, index)
    text, spans = assistant_spans(prompt, messages, index)
    enc = prompt.tokenizer.tok.encode(text, add_special_tokens=False)
    ids = list(enc.ids)
    labels = [IGNORE_INDEX] * len(ids)
    for i, (start, _) in enumerate(enc.offsets):
        if any(a <= start < b for a, b in spans):
            labels[i] = ids[i]
    return Example(ids, labels, record.get("image"))


class Qwen3VLTrainingFormat:
    """How training records become Qwen3-VL input: ``example(record, index)`` (ids + labels), ``image_marker``
    (``config.image_token_id``), ``pixels(path)`` (inference preprocessing: ``ImagePixels`` of one image),
    ``image_tokens(pixels)`` (its token count, which depends on the image) and ``collate_pixels`` (the images
    of a batch, concatenated in order, as the vision tower takes them)."""

    def __init__(self, prompt: ChatPrompt, image_config: ImageProcessorConfig, max_length: int,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.prompt, self.image_config = prompt, image_config
        self.tokenizer = prompt.tokenizer
        if self.tokenizer.pad_id is None:
            raise InputError("the tokenizer names no pad_token (tokenizer_config.json); training batches need one")
        self.image_marker = prompt.config.image_token_id
        self.max_length, self.max_pixels = max_length, max_pixels
        if IMAGE_PAD not in self.prompt.text([{"role": "user", "content": [{"type": "image"}]}]):
            raise InputError(f"the chat template does not render an image part as {IMAGE_PAD}")

    def example(self, record: dict, index: int = 0) -> Example:
        return tokenize_conversation(record, self.prompt, index)

    def pixels(self, path: str | Path) -> ImagePixels:
        pixels, grids = process_images([decode_image(str(path), self.max_pixels).image], self.image_config)
        return ImagePixels(torch.from_numpy(pixels), torch.from_numpy(np.asarray(grids)))

    def image_tokens(self, pixels: ImagePixels) -> int:
        return sum(image_token_count(g, self.image_config.merge_size) for g in pixels.grid_thw.tolist())

    @staticmethod
    def collate_pixels(images: list[ImagePixels]) -> ImagePixels:
        return ImagePixels(torch.cat([p.pixel_values for p in images]), torch.cat([p.grid_thw for p in images]))
