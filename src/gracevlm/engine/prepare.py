"""Prompt preparation: the one path from a request (chat messages, a single prompt with images, an already
templated prompt, or plain text) to token ids and image features, shared by ``VLM`` and the scheduler. It runs
in the caller's thread; the family's ``Runtime`` renders templates, tokenizes and preprocesses images."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError


@dataclass
class PreparedPrompt:
    """A request ready for generation: token ids with one ``image_marker`` per image, the image features
    ``[N, tokens, hidden]`` (or None), the prompt text, seconds spent encoding images, and when preparation
    started (a ``time.perf_counter()`` value: time to first token counts from it); ``image_keys``: one content
    hash per image (``prefix_cache.image_key``) when the prefix cache is on, else None."""

    prompt_ids: list[int]
    image_features: torch.Tensor | None
    prompt_text: str
    image_encode_s: float
    started: float
    image_keys: list[bytes] | None = None


def _as_list(images) -> list[Any]:
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


def prepare_templated(vlm, prompt_text: str, images=None, started: float | None = None) -> PreparedPrompt:
    """An already templated prompt (image markers included, e.g. ``<image>`` for LLaVA) and its images."""
    started = time.perf_counter() if started is None else started
    ids = vlm.runtime.tokenize(prompt_text)
    features, enc_s, keys = vlm.encode_images_keyed(_as_list(images))
    return PreparedPrompt(ids, features, prompt_text, enc_s, started, keys)


def prepare_chat(vlm, messages: list[dict], conv_mode: str | None = None) -> PreparedPrompt:
    """OpenAI-style ``messages`` (content a string or text/image parts) -> ids and image features."""
    started = time.perf_counter()
    text, images = vlm.runtime.chat_prompt(messages, conv_mode)
    return prepare_templated(vlm, text, images, started)


def prepare_prompt(vlm, prompt: str, images=None, conv_mode: str | None = None,
                   system: str | None = None) -> PreparedPrompt:
    """A single-turn ``prompt`` (one image placeholder per image is added in front when it has none);
    ``system`` replaces the template's system text."""
    started = time.perf_counter()
    images = _as_list(images)
    return prepare_templated(vlm, vlm.runtime.user_prompt(prompt, len(images), conv_mode, system), images, started)


def prepare_text(vlm, text: str) -> PreparedPrompt:
    """A plain text prompt with no template (``/v1/completions``): the tokenizer's own reading of ``text``."""
    if not isinstance(text, str):
        raise InputError(f"prompt must be a str, got {type(text).__name__}")
    started = time.perf_counter()
    return PreparedPrompt(vlm.runtime.text_ids(text), None, text, 0.0, started)


def prepare_ids(vlm, ids: list[int]) -> PreparedPrompt:
    """A token-id prompt (``/v1/completions``), used exactly as given (no BOS added, no image markers)."""
    return PreparedPrompt([int(t) for t in ids], None, vlm.tokenizer.decode(ids), 0.0, time.perf_counter())
