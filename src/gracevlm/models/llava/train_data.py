"""LLaVA / ShareGPT4V conversation records -> token ids and labels, with LLaVA-1.5's label masking.

A record is ``{"id": ..., "image": "relative/path.png" (optional), "conversations": [{"from": "human",
"value": "<image>\\nWhat ...?"}, {"from": "gpt", "value": "..."}, ...]}``. As in LLaVA's ``preprocess``:

* a leading message that is not from the human is dropped; roles must then alternate human/gpt;
* with an image, every message holding ``<image>`` is rewritten as ``"<image>\\n" + rest.strip()``;
* the conversation is rendered with the template (``vicuna_v1``: ``"{system} USER: ... ASSISTANT: ...</s>"``)
  and tokenized with ``tokenize_with_images`` (one ``IMAGE_TOKEN_INDEX`` per image);
* labels (``sep = " ASSISTANT: "``, ``sep2 = "</s>"``): the BOS and every instruction part are masked with
  ``IGNORE_INDEX``; each round ``rou`` (the text between ``</s>``) contributes ``len(tok(rou))`` tokens (its
  BOS stands for the ``</s>`` the split removed) of which the first ``len(tok(rou.split(sep)[0] + sep)) - 2``
  are masked; everything after the last round is masked. A tokenizer with ``legacy=False`` encodes text
  after ``</s>`` without the dummy prefix, so rounds after the first are one token shorter. If the
  counted length differs from the real one the whole sample is masked (LLaVA's "tokenization mismatch").

So the supervised tokens are exactly each assistant answer and the ``</s>`` that ends it.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ...errors import InputError
from ..training import IGNORE_INDEX, Example
from .chat import IMAGE_TOKEN, IMAGE_TOKEN_INDEX, SeparatorStyle, get_template, render_prompt, tokenize_with_images
from .processing import ImageSpec, preprocess_image

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
log = logging.getLogger(__name__)


def _messages(record: dict, index: int) -> tuple[list[dict], bool]:
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise InputError(f"record {index}: 'conversations' must be a non-empty list")
    has_image = record.get("image") is not None
    turns = []
    for k, msg in enumerate(conv):
        if not isinstance(msg, dict) or msg.get("from") not in ROLE_MAP or not isinstance(msg.get("value"), str):
            raise InputError(f"record {index}, message {k}: expected {{'from': 'human'|'gpt', 'value': str}}")
        turns.append((ROLE_MAP[msg["from"]], msg["value"]))
    if turns[0][0] != "user":
        turns = turns[1:]
    messages = []
    for k, (role, text) in enumerate(turns):
        if role != ("user" if k % 2 == 0 else "assistant"):
            raise InputError(f"record {index}: roles must alternate human/gpt")
        if has_image and IMAGE_TOKEN in text:
            text = IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()
        elif not has_image and IMAGE_TOKEN in text:
            text = text.replace(IMAGE_TOKEN, "").strip()
        messages.append({"role": role, "content": text})
    if not messages:
        raise InputError(f"record {index}: no human message")
    return messages, has_image


def tokenize_conversation(record: dict, tokenizer, template: str = "vicuna_v1",
                          index: int = 0) -> Example:
    """One LLaVA record -> ``Example`` (ids with one -200 per image, labels with LLaVA's masking)."""
    t = get_template(template)
    if t.sep_style is not SeparatorStyle.TWO:
        raise InputError(f"template {t.name!r}: label masking is implemented for the TWO separator style "
                         "(vicuna_v1, llava_v1)")
    messages, has_image = _messages(record, index)
    if messages[-1]["role"] == "user":
        raise InputError(f"record {index}: the conversation ends with a human message (nothing to learn)")
    prompt = render_prompt(messages, t)

    def tok(text: str) -> list[int]:
        return tokenize_with_images(text, tokenizer) if has_image else tokenizer.encode(text)

    ids = tok(prompt)
    labels = list(ids)
    sep = t.sep + t.roles[1] + ": "
    legacy = getattr(tokenizer, "legacy", True)
    cur = 1
    labels[0] = IGNORE_INDEX
    for i, rou in enumerate(prompt.split(t.sep2)):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        round_len = len(tok(rou))
        instruction_len = len(tok(parts[0] + sep)) - 2
        if i > 0 and not legacy:
            round_len -= 1
            instruction_len -= 1
        for j in range(cur, min(cur + instruction_len, len(labels))):
            labels[j] = IGNORE_INDEX
        cur += round_len
    for j in range(cur, len(labels)):
        labels[j] = IGNORE_INDEX
    if cur != len(ids):
        log.warning("record %d: tokenization mismatch (%d counted vs %d tokens); the sample is ignored",
                    index, cur, len(ids))
        labels = [IGNORE_INDEX] * len(ids)
    return Example(ids, labels, record.get("image"))


class LlavaTrainingFormat:
    """How LLaVA training data becomes model input: ``example(record, index)`` (ids + labels),
    ``image_marker`` (the id standing for an image), ``pixels(path)`` (inference preprocessing), ``max_length``
    (positions the model takes; the family sets it from the config)."""

    image_marker = IMAGE_TOKEN_INDEX
    max_length = 2048

    def __init__(self, tokenizer, image_spec: ImageSpec, template: str = "vicuna_v1"):
        self.tokenizer, self.image_spec, self.template = tokenizer, image_spec, template

    def example(self, record: dict, index: int = 0) -> Example:
        return tokenize_conversation(record, self.tokenizer, self.template, index)

    def pixels(self, path: str | Path) -> torch.Tensor:
        return preprocess_image(path, self.image_spec)
