"""The Qwen byte-level BPE tokenizer, read from the checkpoint's ``tokenizer.json`` with ``tokenizers``.

Added tokens (``<|im_start|>``, ``<|image_pad|>``, ...) are matched literally before BPE; no BOS is
prepended. ``eos_token`` / ``pad_token`` come from ``tokenizer_config.json`` (strings or
``{"content": ...}`` objects); every id is looked up in the tokenizer, none is hard-coded.
"""
from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer

from ...errors import CheckpointError, InputError
from ...formats.checkpoint import read_json_object


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class QwenTokenizer:
    """``encode`` / ``decode`` over a ``tokenizers.Tokenizer`` plus the special tokens of the checkpoint."""

    def __init__(self, tokenizer: Tokenizer, config: dict | None = None, source: str = "tokenizer"):
        self.tok = tokenizer
        self.config = config or {}
        self.source = source
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.pad_token = _token_text(self.config.get("pad_token"))
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_id = self.token_id(self.eos_token) if self.eos_token else None
        self.stop_ids: list[int] = [self.eos_id] if self.eos_id is not None else []  # the engine stops on any
        self.pad_id = self.token_id(self.pad_token) if self.pad_token else None

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "QwenTokenizer":
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{folder}: tokenizer.json not found (a Qwen3-VL checkpoint ships its "
                                  "byte-level BPE tokenizer as tokenizer.json)")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises a bare Exception on bad files
            raise CheckpointError(f"{path} is not a valid tokenizers file: {exc}") from exc
        cfg_path = folder / "tokenizer_config.json"
        config = read_json_object(cfg_path) if cfg_path.is_file() else {}
        return cls(tok, config, str(path))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (added tokens included)."""
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        """The id of one token (special or not), or a CheckpointError."""
        i = self.tok.token_to_id(token)
        if i is None:
            raise CheckpointError(f"{self.source}: token {token!r} is not in the vocabulary")
        return i

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``, special tokens matched literally, nothing prepended or appended."""
        if not isinstance(text, str):
            raise InputError(f"text to tokenize must be a string, got {type(text).__name__}")
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self) -> ByteLevelStreamDecoder:
        """The incremental detokenizer the engine's ``TokenStream`` uses."""
        return ByteLevelStreamDecoder(self)

    def special_tokens(self) -> dict[str, str]:
        """The ``bos/eos/pad`` token strings that chat templates may read (those the config names)."""
        return {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                  ("pad_token", self.pad_token)) if v is not None}


class ByteLevelStreamDecoder:
    """Incremental detokenizer for byte-level BPE: ``push(id)`` returns the text the new id completes,
    ``flush()`` the rest; ``"".join(push(i) for i in ids) + flush() == decode(ids)``. Each token stands for
    whole bytes, so the ids since the last emission are decoded alone and emitted once they no longer end
    in an incomplete UTF-8 sequence (decoded as U+FFFD)."""

    def __init__(self, tokenizer: "QwenTokenizer", skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self._pending: list[int] = []

    def push(self, token: int) -> str:
        self._pending.append(int(token))
        text = self.tokenizer.decode(self._pending, self.skip)
        if text.endswith("\ufffd") and len(self._pending) < 8:
            return ""
        self._pending = []
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self._pending, self.skip) if self._pending else ""
        self._pending = []
        return text


def stop_token_ids(folder: str | os.PathLike, tokenizer: QwenTokenizer) -> list[int]:
    """Ids that end a generation: ``generation_config.json``'s ``eos_token_id`` (an int or a list), then
    the tokenizer's ``eos_token`` if not already there."""
    path = Path(folder) / "generation_config.json"
    ids: list[int] = []
    if path.is_file():
        eos = read_json_object(path).get("eos_token_id")
        eos = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else eos
        if eos is not None and (not isinstance(eos, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < tokenizer.vocab_size for i in eos)):
            raise CheckpointError(f"{path}: eos_token_id must be a token id or a list of them, got {eos!r}")
        ids = list(eos or [])
    if tokenizer.eos_id is not None and tokenizer.eos_id not in ids:
        ids.append(tokenizer.eos_id)
    return ids


def answer_text(tokenizer: QwenTokenizer, new_ids: list[int]) -> str:
    """The decoded answer as GRACE's scripts read it: special tokens skipped, then stripped."""
    return tokenizer.decode(new_ids, skip_special_tokens=True).strip()
