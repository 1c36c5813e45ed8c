"""Grammar-constrained decoding of one JSON object (OpenAI's ``response_format: {"type": "json_object"}``).

``step(state, ch)`` is a character-level pushdown automaton of JSON (RFC 8259): it returns the next state,
or None when ``ch`` cannot continue a valid JSON text. States are immutable tuples, so a state can be
tried against every token of the vocabulary. The top-level value must be an object, whitespace runs are
at most ``MAX_WS_RUN`` characters (a model cannot stall on spaces), and once the object is closed only
EOS may follow.

``JsonObjectConstraint`` masks a logits row: a token is allowed when its text (its SentencePiece piece,
"▁" as a space; a byte-fallback piece only when it is an ASCII character) keeps the output a valid prefix
of a JSON object; EOS is allowed only once the object is complete. The sampler then draws from the
masked logits, so temperature, top-k, top-p and the reported log-probabilities are those of the masked
distribution. Masks are cached by the part of the state a token can reach (see ``_key``).

The output always parses once the model stops (finish reason "stop"); a length limit can still cut it.
"""
from __future__ import annotations

import re
import weakref

import torch

MAX_WS_RUN = 16
_WS = " \t\n\r"
_HEX = "0123456789abcdefABCDEF"
_ESCAPES = '"\\/bfnrtu'
_DIGITS = "0123456789"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

# state: (mode, sub, stack, ws_run); stack: tuple of "{" / "["; sub depends on mode:
#   "value": expecting a value (sub: "top" at the very start, "" else); "arr0": after "[" (value or "]");
#   "obj0": after "{" ("\"" or "}"); "key": after "," in an object; "colon": after a key;
#   "after": after a value (",", the closing bracket; at top level: done); "done": the object is complete;
#   "str": in a string (sub: "key" or "val"); "esc": after "\\" (sub as str); "u1".."u4": hex digits left
#   (sub as str); "num": in a number (sub: "-", "0", "int", ".", "frac", "e", "e+", "exp");
#   "lit": in true/false/null (sub: the letters still expected)
START = ("value", "top", (), 0)
_NUM_END = {"0", "int", "frac", "exp"}  # number states that may end here


def _after_value(stack: tuple) -> tuple:
    return ("after", "", stack, 0) if stack else ("done", "", (), 0)


def _begin_value(ch: str, stack: tuple, top: bool):
    if ch == "{":
        return ("obj0", "", stack + ("{",), 0)
    if top:
        return None  # json_object: the top-level value is an object
    if ch == "[":
        return ("arr0", "", stack + ("[",), 0)
    if ch == '"':
        return ("str", "val", stack, 0)
    if ch == "-":
        return ("num", "-", stack, 0)
    if ch == "0":
        return ("num", "0", stack, 0)
    if ch in _DIGITS:
        return ("num", "int", stack, 0)
    for word in ("true", "false", "null"):
        if ch == word[0]:
            return ("lit", word[1:], stack, 0)
    return None


def step(state: tuple, ch: str):
    """The state after ``ch``, or None if ``ch`` cannot continue a JSON object text."""
    mode, sub, stack, ws = state
    if mode in ("str", "esc") or mode[0] == "u" and len(mode) == 2:
        return _step_string(mode, sub, stack, ch)
    if mode == "num":
        nxt = _step_number(sub, ch)
        if nxt is not None:
            return ("num", nxt, stack, 0)
        if sub not in _NUM_END:
            return None
        return step(_after_value(stack), ch)  # the number ended; ch is the next token
    if mode == "lit":
        if ch != sub[0]:
            return None
        return ("lit", sub[1:], stack, 0) if len(sub) > 1 else _after_value(stack)
    if ch in _WS:
        if mode == "done" or ws >= MAX_WS_RUN:
            return None
        return (mode, sub, stack, ws + 1)
    if mode == "value":
        return _begin_value(ch, stack, sub == "top")
    if mode == "arr0":
        return _after_value(stack[:-1]) if ch == "]" else _begin_value(ch, stack, False)
    if mode == "obj0":
        if ch == "}":
            return _after_value(stack[:-1])
        return ("str", "key", stack, 0) if ch == '"' else None
    if mode == "key":
        return ("str", "key", stack, 0) if ch == '"' else None
    if mode == "colon":
        return ("value", "", stack, 0) if ch == ":" else None
    if mode == "after":
        top = stack[-1]
        if ch == ",":
            return ("key", "", stack, 0) if top == "{" else ("value", "", stack, 0)
        if ch == ("}" if top == "{" else "]"):
            return _after_value(stack[:-1])
        return None
    return None  # done: nothing but EOS


def _step_string(mode: str, sub: str, stack: tuple, ch: str):
    if mode == "str":
        if ch == '"':
            return ("colon", "", stack, 0) if sub == "key" else _after_value(stack)
        if ch == "\\":
            return ("esc", sub, stack, 0)
        return None if ord(ch) < 0x20 else ("str", sub, stack, 0)
    if mode == "esc":
        if ch not in _ESCAPES:
            return None
        return ("u4", sub, stack, 0) if ch == "u" else ("str", sub, stack, 0)
    if ch not in _HEX:  # u4 .. u1
        return None
    left = int(mode[1]) - 1
    return (f"u{left}", sub, stack, 0) if left else ("str", sub, stack, 0)


def _step_number(sub: str, ch: str):
    """The number sub-state after ``ch``, or None when ``ch`` is not part of the number."""
    digit = ch in _DIGITS
    if sub == "-":
        return "0" if ch == "0" else ("int" if digit else None)
    if sub == "0":
        return "." if ch == "." else ("e" if ch in "eE" else None)
    if sub == "int":
        return "int" if digit else ("." if ch == "." else ("e" if ch in "eE" else None))
    if sub == ".":
        return "frac" if digit else None
    if sub == "frac":
        return "frac" if digit else ("e" if ch in "eE" else None)
    if sub == "e":
        return "exp" if digit else ("e+" if ch in "+-" else None)
    if sub in ("e+", "exp"):
        return "exp" if digit else None
    return None


def feed(state: tuple | None, text: str):
    """``step`` over every character of ``text`` (None once invalid)."""
    for ch in text:
        if state is None:
            return None
        state = step(state, ch)
    return state


def is_complete(state: tuple | None) -> bool:
    return state is not None and state[0] == "done"


def accepts_prefix(text: str) -> bool:
    """Whether ``text`` can be continued into a JSON object (or is one)."""
    return feed(START, text) is not None


class _Vocab:
    """Per tokenizer: every token's text (None: never allowed) and the masks computed so far."""

    def __init__(self, tokenizer, rows: int):
        specials = set(tokenizer.special_ids)
        texts: list[str | None] = []
        for i in range(rows):
            if i >= tokenizer.vocab_size or i in specials:
                texts.append(None)
                continue
            piece = tokenizer.id_to_piece(i)
            m = _BYTE_PIECE.fullmatch(piece)
            if m:
                b = int(m.group(1), 16)
                texts.append(chr(b) if b < 0x80 else None)
            else:
                texts.append(piece.replace("\u2581", " ") or None)
        self.texts = texts
        self.reach = max((len(t) for t in texts if t), default=1)  # brackets one token can close at most
        self.masks: dict[tuple, torch.Tensor] = {}


_VOCABS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class JsonObjectConstraint:
    """The per-request constraint: ``mask(logits)`` before sampling, ``advance(token)`` after it."""

    MAX_CACHED = 4096

    def __init__(self, tokenizer, rows: int):
        vocab = _VOCABS.get(tokenizer)
        if vocab is None or len(vocab.texts) != rows:
            vocab = _VOCABS[tokenizer] = _Vocab(tokenizer, rows)
        self.vocab, self.eos_id, self.state = vocab, tokenizer.eos_id, START

    def _key(self, state: tuple) -> tuple:
        mode, sub, stack, ws = state
        reach = self.vocab.reach
        return mode, sub, stack[-reach:], len(stack) > reach, ws

    def allowed(self) -> torch.Tensor:
        """Bool ``[rows]``: the tokens that may come next."""
        key = self._key(self.state)
        mask = self.vocab.masks.get(key)
        if mask is None:
            state = self.state
            mask = torch.tensor([t is not None and feed(state, t) is not None for t in self.vocab.texts])
            if is_complete(state) and 0 <= self.eos_id < len(mask):
                mask[self.eos_id] = True
            if len(self.vocab.masks) >= self.MAX_CACHED:
                self.vocab.masks.clear()
            self.vocab.masks[key] = mask
        return mask

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` with every token that cannot come next set to -inf."""
        allowed = self.allowed()[:logits.shape[0]].to(logits.device)
        return logits.masked_fill(~allowed, float("-inf"))

    def advance(self, token: int) -> None:
        if token == self.eos_id:
            return
        self.state = feed(self.state, self.vocab.texts[token] or "\0")
        if self.state is None:
            raise RuntimeError(f"token {token} was sampled although the JSON constraint forbids it")
