"""LLaVA / ShareGPT4V conversation data -> token ids and labels, with LLaVA-1.5's label masking.

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

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..models.llava.processing import ImageSpec, preprocess_image
from ..models.llava.chat import IMAGE_TOKEN, IMAGE_TOKEN_INDEX, SeparatorStyle, get_template, render_prompt, \
    tokenize_with_images

IGNORE_INDEX = -100
ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
log = logging.getLogger(__name__)


@dataclass
class Example:
    input_ids: list[int]  # one IMAGE_TOKEN_INDEX per image (not yet expanded to patches)
    labels: list[int]
    image: str | None


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


def load_records(path: str | os.PathLike) -> list[dict]:
    """A LLaVA data file: a JSON list of records, or JSON Lines."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"training data {path} not found")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} is neither a JSON list nor JSON Lines: {exc}") from exc
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise InputError(f"{path} must hold a list of records (dicts with 'conversations')")
    return data


class ConversationDataset:
    """LLaVA records, tokenized when a batch needs them (no per-record cache: LLaVA-scale files stay small
    in memory), plus image preprocessing identical to inference preprocessing. The first ``check`` records
    are tokenized up front so that a malformed file fails before training starts."""

    def __init__(self, records: list[dict], tokenizer, image_folder: str | os.PathLike | None,
                 image_spec: ImageSpec, template: str = "vicuna_v1", max_length: int = 2048, check: int = 64):
        self.records = records
        self.tokenizer, self.template = tokenizer, template
        for i in range(min(check, len(records))):
            self.example(i)
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.image_spec = image_spec
        self.max_length = max_length
        self.pad_id = tokenizer.pad_id

    def __len__(self) -> int:
        return len(self.records)

    def example(self, i: int) -> Example:
        return tokenize_conversation(self.records[i], self.tokenizer, self.template, i)

    def image_path(self, name: str) -> Path:
        return self.image_folder / name if self.image_folder is not None else Path(name)

    def collate(self, indices: list[int], n_patches: int) -> dict:
        """Right-padded batch. Each image marker is expanded to ``n_patches`` positions holding
        ``IMAGE_TOKEN_INDEX`` (label ignored); sequences are truncated to ``max_length``."""
        rows, labels, pixels = [], [], []
        for i in indices:
            ex = self.example(i)
            ids, lab = [], []
            for t, y in zip(ex.input_ids, ex.labels):
                if t == IMAGE_TOKEN_INDEX:
                    ids.extend([IMAGE_TOKEN_INDEX] * n_patches)
                    lab.extend([IGNORE_INDEX] * n_patches)
                else:
                    ids.append(t)
                    lab.append(y)
            if len(ids) > self.max_length:
                ids, lab = ids[:self.max_length], lab[:self.max_length]
                if ids.count(IMAGE_TOKEN_INDEX) % n_patches:
                    raise InputError(f"sample {i}: max_length {self.max_length} cuts through the image tokens")
            if ex.image is not None and IMAGE_TOKEN_INDEX in ids:
                pixels.append(preprocess_image(self.image_path(ex.image), self.image_spec))
            rows.append(ids)
            labels.append(lab)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        label_t = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, (ids, lab) in enumerate(zip(rows, labels)):
            input_ids[b, :len(ids)] = torch.tensor(ids)
            label_t[b, :len(lab)] = torch.tensor(lab)
            mask[b, :len(ids)] = 1
        pix = torch.stack(pixels) if pixels else None
        return {"input_ids": input_ids, "labels": label_t, "attention_mask": mask, "pixel_values": pix}
