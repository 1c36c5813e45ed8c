"""Admission checks that run BEFORE a request costs memory or CPU: text size, image count, context length.

A request is refused with ``PromptTooLong`` / ``InputError`` from facts that are cheap to get - text bytes,
the number of image parts, the token count of the templated prompt - before any image is fetched,
decoded or encoded and before any embedding is built:

* ``text_byte_cap(tokenizer, max_len)``: every token covers at most ``max_piece_bytes`` bytes of text, so a
  text longer than ``max_len * max_piece_bytes`` bytes cannot fit in ``max_len`` positions; it is refused
  without being tokenized (a 2 MB prompt costs nothing).
* ``image_positions(vlm)``: positions one image takes in the prompt (LLaVA-1.5: 576), from the vision
  tower's config, so ``prompt positions = text tokens - images + images * image_positions``.
* ``plan_chat(...)``: the templated prompt and its ids for messages whose images are still unfetched
  references; ``prepare_planned`` then decodes and encodes the images of a plan that fits.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

from ..errors import InputError
from ..model.prompts import IMAGE_TOKEN_INDEX, tokenize_with_images
from .generate import PromptTooLong, check_prompt_length


@lru_cache(maxsize=8)
def max_piece_bytes(tokenizer) -> int:
    """The most UTF-8 bytes of text one token id can stand for (vocabulary pieces and special texts)."""
    sp = tokenizer.sp
    longest = max(len(sp.IdToPiece(i).encode("utf-8")) for i in range(sp.GetPieceSize()))
    specials = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token)
    return max(longest, *(len(t.encode("utf-8")) for t in specials), 1)


def text_byte_cap(tokenizer, max_len: int) -> int:
    return max_len * max_piece_bytes(tokenizer)


def check_text_size(text: str, tokenizer, max_len: int) -> None:
    """``PromptTooLong`` when ``text`` is certainly too long for ``max_len`` positions (see the module)."""
    cap = text_byte_cap(tokenizer, max_len)
    if len(text) > cap or len(text.encode("utf-8", "surrogatepass")) > cap:
        raise PromptTooLong(f"the prompt text has {len(text.encode('utf-8', 'surrogatepass')):,} bytes, more than "
                            f"{max_len} positions can hold (at most {cap:,} bytes); shorten it")


def image_positions(vlm) -> int:
    """Prompt positions one image takes: (image_size / patch_size)^2 patches (+1 with 'cls_patch')."""
    tower = vlm.model.vision_tower
    if tower is None:
        return 0
    cfg = tower.config
    n = (cfg.image_size // cfg.patch_size) ** 2
    return n + (1 if vlm.model.select_feature == "cls_patch" else 0)


def prompt_positions(ids: list[int], per_image: int) -> int:
    n = sum(1 for t in ids if t == IMAGE_TOKEN_INDEX)
    return len(ids) - n + n * per_image


@dataclass
class ChatPlan:
    """A templated prompt that fits: its ids (one -200 per image) and the image references in order."""

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
    msgs, images = vlm._chat_inputs(messages)
    if len(images) > max_images:
        raise InputError(f"the request has {len(images)} images; this server takes at most {max_images} per "
                         "request (--limit-images-per-prompt)")
    text = "".join(m["content"] for m in msgs if isinstance(m.get("content"), str))
    check_text_size(text, vlm.tokenizer, max_len)
    prompt = vlm.build_prompt(msgs, conv_mode)
    ids = tokenize_with_images(prompt, vlm.tokenizer)
    per_image = image_positions(vlm)
    positions = prompt_positions(ids, per_image)
    check_prompt_length(positions, max_len, _Shape(per_image) if images else None)
    return ChatPlan(prompt, ids, images, positions, started)


class _Shape:
    """Stands in for image features in ``check_prompt_length``'s message (it reads ``shape[1]``)."""

    def __init__(self, per_image: int):
        self.shape = (0, per_image)


def prepare_planned(vlm, plan: ChatPlan, fetch: Callable[[Any], Any]):
    """Fetch/decode each image reference of ``plan`` with ``fetch``, encode them: a ``PreparedPrompt``."""
    from .scheduler import PreparedPrompt

    images = [fetch(ref) for ref in plan.images]
    features, enc_s = vlm.encode_images(images)
    del images
    return PreparedPrompt(plan.prompt_ids, features, plan.prompt_text, enc_s, plan.started)
