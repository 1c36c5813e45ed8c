"""Training data files -> padded batches: records (JSON list or JSON Lines) tokenized by the model family's
training format (``Family.training_format``: ids, labels, image marker, image preprocessing)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import InputError
from ..models.training import IGNORE_INDEX, Example  # noqa: F401 - re-exported for users of the data path


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
    """Records tokenized by ``fmt`` (a family's training format) when a batch needs them (no per-record cache:
    LLaVA-scale files stay small in memory), plus image preprocessing identical to inference preprocessing.
    The first ``check`` records are tokenized up front so that a malformed file fails before training starts."""

    def __init__(self, records: list[dict], fmt, image_folder: str | os.PathLike | None, max_length: int = 2048,
                 check: int = 64):
        self.records = records
        self.fmt = fmt
        for i in range(min(check, len(records))):
            self.example(i)
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.max_length = max_length
        self.pad_id = fmt.tokenizer.pad_id

    def __len__(self) -> int:
        return len(self.records)

    def example(self, i: int) -> Example:
        return self.fmt.example(self.records[i], i)

    def image_path(self, name: str) -> Path:
        return self.image_folder / name if self.image_folder is not None else Path(name)

    def collate(self, indices: list[int], n_patches: int | None) -> dict:
        """Right-padded batch. Each image marker is expanded to ``n_patches`` positions holding the marker
        (label ignored; ``None``: as many as the format's ``image_tokens(pixels)`` gives for that image);
        sequences are truncated to ``max_length``. ``pixel_values``: the images stacked, or the format's
        ``collate_pixels`` of them."""
        marker = self.fmt.image_marker
        rows, labels, pixels = [], [], []
        for i in indices:
            ex = self.example(i)
            image = None
            if ex.image is not None and marker in ex.input_ids:
                image = self.fmt.pixels(self.image_path(ex.image))
            n = n_patches if n_patches is not None else (self.fmt.image_tokens(image) if image is not None else 0)
            ids, lab = [], []
            for t, y in zip(ex.input_ids, ex.labels):
                if t == marker:
                    ids.extend([marker] * n)
                    lab.extend([IGNORE_INDEX] * n)
                else:
                    ids.append(t)
                    lab.append(y)
            if len(ids) > self.max_length:
                ids, lab = ids[:self.max_length], lab[:self.max_length]
                if n and ids.count(marker) % n:
                    raise InputError(f"sample {i}: max_length {self.max_length} cuts through the image tokens")
            if image is not None and marker in ids:
                pixels.append(image)
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
        pix = None
        if pixels:
            pix = self.fmt.collate_pixels(pixels) if hasattr(self.fmt, "collate_pixels") else torch.stack(pixels)
        return {"input_ids": input_ids, "labels": label_t, "attention_mask": mask, "pixel_values": pix}
