"""Admission checks that run BEFORE a request costs memory or CPU: text size, image count, context length.

A request is refused with ``PromptTooLong`` / ``InputError`` from facts that are cheap to get - text bytes,
the number of image parts, the token count of the templated prompt - before any image is fetched,
decoded or encoded and before any embedding is built:

* ``text_byte_cap(vlm, max_len)``: every token covers at most ``runtime.max_token_bytes()`` bytes of text, so a
  text longer than ``max_len`` times that cannot fit in ``max_len`` positions; it is refused without being
  tokenized (a 2 MB prompt costs nothing).
* ``runtime.image_positions()``: the most positions one image can take in the prompt (LLaVA-1.5: exactly
  576), so ``prompt positions <= text tokens - images + images * image_positions``.
* ``plan_chat(...)``: the templated prompt and its ids for messages whose images are still unfetched
  references; ``prepare_planned`` then decodes and encodes the images of a plan that fits.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import InputError
from .generate import PromptTooLong, check_prompt_length
from .prepare import PreparedPrompt


def text_byte_cap(vlm, max_len: int) -> int:
    return max_len * vlm.runtime.max_token_bytes()


def check_text_size(text: str, vlm, max_len: int) -> None:
    """``PromptTooLong`` when ``text`` is certainly too long for ``max_len`` positions (see the module)."""
    cap = text_byte_cap(vlm, max_len)
    if len(text) > cap or len(text.encode("utf-8", "surrogatepass")) > cap:
        raise PromptTooLong(f"the prompt text has {len(text.encode('utf-8', 'surrogatepass')):,} bytes, more than "
                            f"{max_len} positions can hold (at most {cap:,} bytes); shorten it")


def prompt_positions(ids: list[int], marker: int, per_image: int) -> int:
    n = sum(1 for t in ids if t == marker)
    return len(ids) - n + n * per_image


@dataclass
class ChatPlan:
    """A templated prompt that fits: its ids (one image marker per image) and the image references in order."""

    prompt_text: str
    prompt_ids: list[int]
    images: list[Any]
    positions: int
    started: float


def plan_chat(vlm, messages: list[dict], conv_mode: str | None, max_len: int, max_images: int) -> ChatPlan:
    """Template and tokenize ``messages`` whose image parts hold unfetched references (any objects), and
    refuse - before any image is touched - more than ``max_images`` images, text too large to tokenize,
    or a prompt that leaves no room in ``max_len`` positions."""
    started = time.perf_counter()
    runtime = vlm.runtime
    prompt, images = runtime.chat_prompt(messages, conv_mode)
    if len(images) > max_images:
        raise InputError(f"the request has {len(images)} images; this server takes at most {max_images} per "
                         "request (--limit-images-per-prompt)")
    check_text_size(prompt, vlm, max_len)
    ids = runtime.tokenize(prompt)
    per_image = runtime.image_positions()
    positions = prompt_positions(ids, runtime.image_marker, per_image)
    check_prompt_length(positions, max_len, _Shape(per_image, len(images)) if images else None)
    return ChatPlan(prompt, ids, images, positions, started)


class _Shape:
    """Stands in for image features in ``check_prompt_length``'s message (``shape[1]`` / ``positions``)."""

    def __init__(self, per_image: int, n_images: int):
        self.shape = (n_images, per_image)
        self.positions = per_image * n_images


def prepare_planned(vlm, plan: ChatPlan, fetch: Callable[[Any], Any]):
    """Fetch/decode each image reference of ``plan`` with ``fetch``, encode them: a ``PreparedPrompt``."""
    images = [fetch(ref) for ref in plan.images]
    features, enc_s, keys = vlm.encode_images_keyed(images)  # keys: for the prefix cache
    del images
    return PreparedPrompt(plan.prompt_ids, features, plan.prompt_text, enc_s, plan.started, keys)
