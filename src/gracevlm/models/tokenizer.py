"""LLaMA SentencePiece tokenizer with the semantics LLaVA-1.5 was evaluated with.

LLaVA-1.5 loads Vicuna's tokenizer as the slow ``LlamaTokenizer`` of transformers 4.37 with the legacy
behaviour. Encoding therefore works like this:

* the text is split on the special-token strings (``<s>``, ``</s>``, ``<unk>``); each of those becomes
  its id, with no whitespace stripped around it;
* every non-empty piece of text in between is encoded by SentencePiece on its own, so every piece gets
  the dummy-prefix ``▁`` (for example ``"</s>USER"`` gives ``[2, ▁US, ER]``);
* BOS (id 1) is prepended unless ``add_bos=False``. EOS is never appended.

Decoding drops negative ids (``-200`` image markers). With ``skip_special_tokens`` (the default, and
what LLaVA uses) it also drops BOS, EOS and UNK; what is left goes through one SentencePiece decode.
That decode removes the dummy-prefix space of the first piece and joins byte-fallback pieces into UTF-8,
putting U+FFFD in place of each invalid byte. Without ``skip_special_tokens``, each special token is
written as its string and the text between special tokens is decoded run by run.

``StreamDecoder`` turns a stream of generated ids into text deltas whose concatenation equals
``decode(all_ids)``. ``train_tokenizer`` builds small LLaMA-style SentencePiece models for synthetic
test checkpoints.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from ..errors import CheckpointError, InputError

MODEL_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"

DEFAULT_BOS, DEFAULT_EOS, DEFAULT_UNK = "<s>", "</s>", "<unk>"
SPIECE_UNDERLINE = "\u2581"
REPLACEMENT_CHAR = "\ufffd"


class LlamaTokenizer:
    """A SentencePiece ``tokenizer.model`` with LLaVA-1.5's (legacy slow-tokenizer) rules."""

    def __init__(self, model_file: str | os.PathLike, *, bos_token: str = DEFAULT_BOS,
                 eos_token: str = DEFAULT_EOS, unk_token: str = DEFAULT_UNK, legacy: bool = True):
        path = Path(model_file)
        if not path.is_file():
            raise CheckpointError(
                f"tokenizer file {path} not found; the checkpoint must ship the SentencePiece model "
                f"'{MODEL_FILE}' next to config.json")
        self.legacy = bool(legacy)
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(
                f"tokenizer file {path} is not a valid SentencePiece model ({exc}); the checkpoint must "
                f"ship an intact '{MODEL_FILE}' (re-download or re-copy it)") from None
        self.sp = sp
        self.model_file = path
        self.bos_token, self.eos_token, self.unk_token = bos_token, eos_token, unk_token
        self.bos_id = self._special_id(bos_token, "bos")
        self.eos_id = self._special_id(eos_token, "eos")
        self.unk_id = self._special_id(unk_token, "unk")
        self._special_by_text = {bos_token: self.bos_id, eos_token: self.eos_id, unk_token: self.unk_id}
        self._text_by_special = {i: t for t, i in self._special_by_text.items()}
        # Control and unknown pieces of the model are special too. They never go to sp.decode: the
        # loop in StreamDecoder relies on sp.decode seeing only normal and byte pieces.
        for i in range(sp.GetPieceSize()):
            if sp.IsControl(i) or sp.IsUnknown(i):
                self._text_by_special.setdefault(i, sp.IdToPiece(i))
        # Longest first, so that a regex alternation takes the longest match where two start together.
        alternatives = sorted(self._special_by_text, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "LlamaTokenizer":
        """Loads ``tokenizer.model`` from a checkpoint folder. The special-token strings come from
        ``tokenizer_config.json`` or ``special_tokens_map.json`` when present (defaults otherwise)."""
        folder = Path(path)
        if not folder.is_dir():
            raise CheckpointError(f"checkpoint folder {folder} does not exist or is not a folder")
        tokens = {"bos_token": DEFAULT_BOS, "eos_token": DEFAULT_EOS, "unk_token": DEFAULT_UNK}
        legacy = True  # transformers' slow LlamaTokenizer default when the config does not say
        # special_tokens_map.json is read first so that tokenizer_config.json wins, as in transformers.
        for name in (SPECIAL_MAP_FILE, CONFIG_FILE):
            file = folder / name
            if not file.is_file():
                continue
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"{file} is not valid JSON ({exc}); fix or delete it") from None
            if not isinstance(data, dict):
                raise CheckpointError(f"{file} must hold a JSON object, got {type(data).__name__}")
            for key in tokens:
                value = data.get(key)
                if isinstance(value, dict):  # serialised AddedToken: {"content": "<s>", ...}
                    value = value.get("content")
                if value is None:
                    continue
                if not isinstance(value, str) or not value:
                    raise CheckpointError(f"{file}: {key} must be a non-empty string, got {value!r}")
                tokens[key] = value
            if name == CONFIG_FILE and data.get("legacy") is not None:
                legacy = bool(data["legacy"])
        return cls(folder / MODEL_FILE, legacy=legacy, **tokens)

    def _special_id(self, token: str, kind: str) -> int:
        i = self.sp.PieceToId(token)
        if self.sp.IdToPiece(i) != token:
            raise CheckpointError(
                f"{kind} token {token!r} is not a piece of {self.model_file}; the special-token strings "
                f"in {CONFIG_FILE}/{SPECIAL_MAP_FILE} must name pieces of the SentencePiece model")
        return i

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    @property
    def pad_id(self) -> int:
        """LLaVA sets ``pad_token = unk_token`` (id 0 in LLaMA's vocabulary)."""
        return self.unk_id

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self._text_by_special)

    def id_to_piece(self, token_id: int) -> str:
        self._check_id(token_id)
        return self.sp.IdToPiece(token_id)

    def piece_to_id(self, piece: str) -> int:
        """Id of a piece; raises InputError if the vocabulary does not have it."""
        i = self.sp.PieceToId(piece)
        if self.sp.IdToPiece(i) != piece:
            raise InputError(f"piece {piece!r} is not in the vocabulary of {self.model_file}")
        return i

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise InputError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise InputError(f"encode expects a str, got {type(text).__name__}")
        ids = [self.bos_id] if add_bos else []
        after_special = False
        for part in self._split_re.split(text):
            if not part:
                continue
            special = self._special_by_text.get(part)
            if special is not None:
                ids.append(special)
                after_special = True
            elif after_special and not self.legacy:
                ids.extend(self._encode_no_prefix(part))
            else:
                ids.extend(self.sp.EncodeAsIds(part))
        return ids

    def _encode_no_prefix(self, text: str) -> list[int]:
        """``legacy=False``: text right after a special token gets no dummy-prefix "▁". Encoded behind the
        unk string as an anchor whose own pieces are then dropped (what transformers' slow tokenizer does)."""
        anchor = self.sp.EncodeAsIds(self.unk_token)
        return self.sp.EncodeAsIds(self.unk_token + text)[len(anchor):]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        out: list[str] = []
        run: list[int] = []
        for token_id in ids:
            token_id = int(token_id)
            if token_id < 0:
                continue
            self._check_id(token_id)
            special = self._text_by_special.get(token_id)
            if special is None:
                run.append(token_id)
            elif not skip_special_tokens:
                if run:
                    out.append(self.sp.DecodeIds(run))
                    run = []
                out.append(special)
        if run:
            out.append(self.sp.DecodeIds(run))
        return "".join(out)

    def __repr__(self) -> str:
        return f"LlamaTokenizer({str(self.model_file)!r}, vocab_size={self.vocab_size})"


class StreamDecoder:
    """Incremental detokeniser: ``push(id)`` returns the text the new id adds, ``flush()`` the rest.

    ``"".join(push(i) for i in ids) + flush() == tokenizer.decode(ids, skip_special_tokens)``.

    A character spread over several byte-fallback pieces (``<0xE2> <0x82> <0xAC>``) is held back until
    its last byte arrives, so no delta ever ends in half a character. Each step decodes only a short
    window: the tokens since the previous emission point plus the new ones. The window is decoded
    behind a fixed anchor piece (UNK, which SentencePiece writes as " ⁇ "). With the anchor in front, no
    window piece is at the start of the text, so SentencePiece never strips a window's leading space. The
    one real strip, the first piece of a run, is applied by hand.
    """

    def __init__(self, tokenizer: LlamaTokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        sp = tokenizer.sp
        self._sp = sp
        self._anchor = sp.unk_id()
        self._anchor_text = sp.DecodeIds([self._anchor])
        self._byte_value = {i: int(sp.IdToPiece(i)[3:5], 16) for i in range(sp.GetPieceSize()) if sp.IsByte(i)}
        self._reset_run()

    def _reset_run(self) -> None:
        self._window: list[int] = []  # ids from the previous emission point on
        self._read = 0  # window[:_read] is text already emitted
        self._fresh = True  # no id of the current run seen yet
        self._strip_first = False  # drop the first character of the run's first delta

    def _anchored(self, ids: Sequence[int]) -> str:
        text = self._sp.DecodeIds([self._anchor, *ids])
        return text[len(self._anchor_text):]

    def _incomplete_utf8_tail(self) -> bool:
        """True if the window ends in a lead byte followed by fewer continuation bytes than it needs."""
        tail: list[int] = []
        for token_id in reversed(self._window[-3:]):
            value = self._byte_value.get(token_id)
            if value is None:
                break
            tail.append(value)  # tail[k - 1] is the k-th byte from the end
        for k, value in enumerate(tail, start=1):
            if 0x80 <= value < 0xC0:
                continue  # continuation byte: look further back for its lead byte
            needed = 2 if 0xC0 <= value < 0xE0 else 3 if 0xE0 <= value < 0xF0 else 4 if 0xF0 <= value < 0xF8 else 0
            return needed > k
        return False

    def _emit(self, final: bool) -> str:
        new_text = self._anchored(self._window)
        if not final and new_text.endswith(REPLACEMENT_CHAR) and self._incomplete_utf8_tail():
            return ""
        prefix_text = self._anchored(self._window[:self._read])
        delta = new_text[len(prefix_text):]
        # Keep the just-emitted tokens as the next window's prefix; drop everything before them.
        del self._window[:self._read]
        self._read = len(self._window)
        if self._strip_first and delta:
            delta = delta[1:]
            self._strip_first = False
        return delta

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id < 0:
            return ""
        self.tokenizer._check_id(token_id)
        special = self.tokenizer._text_by_special.get(token_id)
        if special is not None:
            if self.skip_special_tokens:
                return ""
            return self.flush() + special
        if self._fresh:
            self._fresh = False
            # sp.decode strips the leading "▁" of a run's first piece if it is a normal piece.
            self._strip_first = (not self._sp.IsByte(token_id)
                                 and self._sp.IdToPiece(token_id).startswith(SPIECE_UNDERLINE))
        self._window.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Returns the held-back rest (incomplete bytes become U+FFFD) and ends the run; ids pushed
        afterwards start a new run, decoded as if they began a fresh ``decode`` call."""
        delta = self._emit(final=True) if self._window else ""
        self._reset_run()
        return delta


# ---------------------------------------------------------------------- training

TRAINER_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    normalization_rule_name="identity",
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    unk_piece=DEFAULT_UNK, bos_piece=DEFAULT_BOS, eos_piece=DEFAULT_EOS,
    character_coverage=1.0,
    hard_vocab_limit=False,
    num_threads=1,
    input_sentence_size=0,
    shuffle_input_sentence=False,
    minloglevel=2,
)


def tokenizer_config(model_max_length: int = 2048) -> dict:
    """tokenizer_config.json of a LLaVA-1.5 checkpoint as the slow LlamaTokenizer writes it."""
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": DEFAULT_BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": DEFAULT_EOS,
        "legacy": True,
        "model_max_length": model_max_length,
        "pad_token": DEFAULT_UNK,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": DEFAULT_UNK,
    }


def special_tokens_map() -> dict:
    return {"bos_token": DEFAULT_BOS, "eos_token": DEFAULT_EOS, "pad_token": DEFAULT_UNK,
            "unk_token": DEFAULT_UNK}


def train_tokenizer(out_dir: str | os.PathLike, corpus_lines: Iterable[str], vocab_size: int) -> LlamaTokenizer:
    """Trains a LLaMA-style SentencePiece BPE model and writes ``tokenizer.model``,
    ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``out_dir``.

    The options follow LLaMA's: byte fallback, split digits, dummy prefix, no whitespace folding,
    identity normalisation, ``<unk>``/``<s>``/``</s>`` at ids 0/1/2, byte pieces at ids 3..258. Lines are
    split at newlines and empty lines are dropped, so a newline is always encoded with its byte piece
    ``<0x0A>`` (id 13), as in LLaMA. ``vocab_size`` is an upper bound (``hard_vocab_limit=False``).
    Training runs on one thread over the lines in the given order, so the same inputs give a
    byte-identical ``tokenizer.model``. Nothing is written to disk except the three output files.
    """
    if isinstance(corpus_lines, str):
        raise InputError("corpus_lines must be an iterable of lines, not one str")
    sentences = [s for line in corpus_lines for s in str(line).split("\n") if s]
    if not sentences:
        raise InputError("corpus_lines is empty; give some text to train the tokenizer on")
    minimum = 3 + 256 + 1
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise InputError(f"vocab_size must be an int >= {minimum} (3 special + 256 byte pieces + text pieces), "
                         f"got {vocab_size!r}")
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(sentence_iterator=iter(sentences), model_writer=buffer,
                                       vocab_size=vocab_size, **TRAINER_OPTIONS)
    except RuntimeError as exc:
        raise InputError(f"SentencePiece training failed for vocab_size={vocab_size}: {exc}; a larger "
                         f"vocab_size (the corpus's distinct characters + 259 at least) may be needed") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_FILE).write_bytes(buffer.getvalue())
    for name, data in ((CONFIG_FILE, tokenizer_config()), (SPECIAL_MAP_FILE, special_tokens_map())):
        (out / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return LlamaTokenizer.from_dir(out)


def default_corpus() -> list[str]:
    """The built-in corpus (see ``gracevlm.synth.corpus``)."""
    from ..synth.corpus import default_corpus as _default_corpus

    return _default_corpus()
