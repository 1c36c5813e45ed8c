"""Several engine requests answered as one OpenAI response (``n`` choices, a list of prompts), and the
log-probabilities in OpenAI's two shapes.

* ``follow_choices(handles)`` follows many ``RequestHandle``s from the event loop at once, yielding
  ``(index, deltas, ended)`` as each produces text; it cancels every unfinished one when the consumer
  stops early or (``request`` given) the client disconnects.
* ``LogprobCursor`` hands out the ``TokenLogprob`` entries of one handle not sent yet (the model thread
  appends them before the tokens' text is emitted, so a chunk carries at least its own tokens' entries).
* ``chat_logprobs`` / ``completion_logprobs``: the ``logprobs`` object of a chat choice
  (``{"content": [{token, logprob, bytes, top_logprobs}]}``) and of a completion choice
  (``{tokens, token_logprobs, top_logprobs, text_offset}``). A token's text is its SentencePiece piece
  with "▁" as a space; ``bytes`` are its UTF-8 bytes (a byte-fallback piece ``<0xNN>`` is that one
  byte, and its text is the character when the byte is ASCII, else ``bytes:\\xNN`` as OpenAI writes
  partial characters).
"""
from __future__ import annotations

import asyncio
import re
from typing import AsyncIterator, Sequence

from starlette.requests import Request

from ..engine.sampling import TokenLogprob
from ..engine.scheduler import RequestHandle

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class ClientDisconnected(Exception):
    pass


async def follow_choices(handles: Sequence[RequestHandle],
                         request: Request | None = None) -> AsyncIterator[tuple[int, list[str], bool]]:
    """Yield ``(index, deltas, ended)`` for the handles (``ended`` once per handle, maybe with no deltas).
    A failed handle raises its error from here (the others are cancelled)."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()

    def wake() -> None:
        loop.call_soon_threadsafe(ready.set)

    for h in handles:
        h.set_waker(wake)
    open_ = set(range(len(handles)))
    checked = loop.time()
    try:
        while open_:
            ready.clear()
            for i in sorted(open_):
                deltas, ended = handles[i].drain()
                if ended:
                    open_.discard(i)
                if deltas or ended:
                    yield i, deltas, ended
            if not open_:
                return
            if request is not None and loop.time() - checked >= 0.5:
                checked = loop.time()
                if await request.is_disconnected():
                    raise ClientDisconnected()
            try:
                await asyncio.wait_for(ready.wait(), timeout=0.5)
            except asyncio.TimeoutError:
                pass
    finally:
        for h in handles:
            h.set_waker(None)
            if not h.done:
                h.cancel()


class LogprobCursor:
    """The entries of one handle's ``generation.logprobs`` not handed out yet."""

    def __init__(self, handle: RequestHandle):
        self.handle, self.sent = handle, 0

    def take(self) -> list[TokenLogprob]:
        entries = self.handle.generation.logprobs or []
        end = len(entries)
        out, self.sent = entries[self.sent:end], end
        return out


def token_text(tokenizer, token_id: int) -> tuple[str, list[int]]:
    """``(text, utf-8 bytes)`` of one token as OpenAI reports it (see the module docstring)."""
    piece = tokenizer.id_to_piece(token_id)
    m = _BYTE_PIECE.fullmatch(piece)
    if m:
        b = int(m.group(1), 16)
        return (chr(b) if b < 0x80 else f"bytes:\\x{b:02x}"), [b]
    text = piece.replace("\u2581", " ")
    return text, list(text.encode("utf-8"))


def chat_logprobs(tokenizer, entries: Sequence[TokenLogprob]) -> dict:
    """A chat choice's (or chunk's) ``logprobs``: ``{"content": [...], "refusal": None}``."""
    def one(token_id: int, logprob: float) -> dict:
        text, raw = token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def completion_logprobs(tokenizer, token_ids: Sequence[int], entries: Sequence[TokenLogprob | None],
                        offset: int = 0) -> dict:
    """A completion choice's ``logprobs`` for ``token_ids`` (entry None: no log-probability, the first
    prompt token). ``text_offset`` counts characters of the token texts from ``offset``."""
    tokens, logprobs, tops, offsets = [], [], [], []
    for token_id, e in zip(token_ids, entries):
        text, _ = token_text(tokenizer, token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        logprobs.append(None if e is None else e.logprob)
        tops.append(None if e is None else {token_text(tokenizer, t)[0]: lp for t, lp in e.top})
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}
