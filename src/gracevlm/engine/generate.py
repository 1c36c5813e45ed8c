"""The single-sequence generation loop shared by every front end (CLI, Python API, server, eval).

``TokenStream`` is the per-request output logic (sampling, EOS, stop strings, length, incremental
detokenizing, LLaVA's strip) that both ``stream_generate`` and the batch scheduler run."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch

from ..errors import InputError
from ..models.tokenizer import LlamaTokenizer, StreamDecoder
from .sampling import Sampler, SamplingParams


@dataclass
class Timings:
    """Seconds and tokens/second of one generation. ``ttft_s`` counts from the call to the first
    sampled token (image encoding + prefill)."""

    image_encode_s: float = 0.0
    prefill_s: float = 0.0
    prefill_tokens: int = 0
    decode_s: float = 0.0
    decode_tokens: int = 0
    ttft_s: float = 0.0
    total_s: float = 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(prefill_tok_s=self.prefill_tok_s, decode_tok_s=self.decode_tok_s)
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    timings: Timings = field(default_factory=Timings)
    prompt: str = ""

    def as_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "prompt_token_ids": self.prompt_token_ids,
                "finish_reason": self.finish_reason, "timings": self.timings.as_dict()}


def logits_rows(lm) -> int:
    return lm.lm_head.weight.shape[0]


class _StopMatcher:
    """Finds stop strings in the growing text and tells how much text is safe to emit."""

    def __init__(self, stops: list[str]):
        self.stops = stops

    def find(self, text: str, start: int) -> int:
        """Index of the earliest stop string found at or after ``start`` (-1 if none)."""
        hits = [i for s in self.stops if (i := text.find(s, max(0, start - len(s) + 1))) >= 0]
        return min(hits) if hits else -1

    def safe_end(self, text: str) -> int:
        """Length of the prefix that cannot become part of a stop string."""
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return len(text) - hold


class TokenStream:
    """Per-request output logic shared by ``stream_generate`` and the batch scheduler.

    Feed it one logits row per step (``push``); it samples the next token with the request's seeded
    ``Sampler``, detects EOS, stop strings and the length limit, detokenizes incrementally and returns the
    text delta that is safe to emit. ``close`` returns the last delta and fixes ``text`` and
    ``finish_reason``. Deltas never split a multi-byte character, never contain (a prefix of) a stop
    string, and add up to the final text, which is stripped as LLaVA strips its answers.
    """

    def __init__(self, tokenizer: LlamaTokenizer, params: SamplingParams, max_new_tokens: int, vocab: int):
        self.eos_id = tokenizer.eos_id
        # a family's tokenizer may name several ids that end a generation, and bring its own detokenizer
        self.stop_ids = frozenset(getattr(tokenizer, "stop_ids", None) or (tokenizer.eos_id,))
        self.sampler = Sampler(params)
        make_decoder = getattr(tokenizer, "stream_decoder", None)
        self.decoder = make_decoder() if make_decoder is not None else StreamDecoder(tokenizer)
        self.stops = _StopMatcher(params.stop)
        self.max_new_tokens = max_new_tokens
        self.vocab = vocab  # rows past the tokenizer (padding) are never sampled
        self.token_ids: list[int] = []
        self.steps = 0  # tokens sampled (EOS included)
        self.done = max_new_tokens <= 0
        self.finish_reason = "length"
        self.text = ""
        self._raw, self._emitted, self._cut = "", 0, -1

    @property
    def last_token(self) -> int:
        """The token to feed to the model for the next step."""
        return self.token_ids[-1]

    def push(self, logits: torch.Tensor) -> str:
        """Sample from ``logits [>= vocab]``; returns the new safe delta (maybe ""). Sets ``done``."""
        if self.done:
            raise RuntimeError("TokenStream.push after the stream finished")
        token = self.sampler(logits[:self.vocab])
        self.steps += 1
        if token in self.stop_ids:
            self.finish_reason, self.done = "stop", True
            return ""
        self.token_ids.append(token)
        self._raw += self.decoder.push(token)
        text = self._raw.lstrip()  # LLaVA strips the decoded answer; deltas add up to the stripped text
        self._cut = self.stops.find(text, self._emitted) if self.stops.stops else -1
        if self._cut >= 0:
            self.finish_reason, self.done = "stop", True
            return ""
        delta = ""
        end = min(self.stops.safe_end(text), len(text.rstrip()))
        if end > self._emitted:
            delta = text[self._emitted:end]
            self._emitted = end
        if self.steps >= self.max_new_tokens:
            self.done = True
        return delta

    def close(self, finish_reason: str | None = None) -> str:
        """Finish the stream (early when ``finish_reason`` is given, e.g. "cancelled"); returns the
        last delta. ``text`` and ``finish_reason`` are final afterwards."""
        if finish_reason is not None:
            self.finish_reason = finish_reason
        if self._cut < 0:
            self._raw += self.decoder.flush()
        text = self._raw.lstrip()
        cut = self.stops.find(text, 0) if self.stops.stops else -1
        if cut >= 0:
            text = text[:cut]
            if finish_reason is None:
                self.finish_reason = "stop"
        text = text.rstrip()
        self.done, self.text = True, text
        delta = text[self._emitted:] if len(text) > self._emitted else ""
        self._emitted = max(self._emitted, len(text))
        return delta


def stream_generate(model, tokenizer: LlamaTokenizer, prompt_ids: list[int],
                    image_features: torch.Tensor | None, params: SamplingParams, max_context: int,
                    result: Generation | None = None, started: float | None = None) -> Iterator[str]:
    """Yield text deltas; fill ``result`` (if given) with the final text, ids, finish reason, timings.
    ``model`` is a family's model (the engine contract in ``models.registry``: ``prompt_for``,
    ``forward_prompt``, ``forward_decode``, ``new_cache``, ``language_model``).

    Deltas never split a multi-byte character and never contain (a prefix of) a stop string.
    """
    t_start = started if started is not None else time.perf_counter()
    res = result if result is not None else Generation("", [], list(prompt_ids), "length")
    res.prompt_token_ids = list(prompt_ids)
    lm = model.language_model
    with torch.inference_mode():
        prompt = model.prompt_for(prompt_ids, image_features)
        length = prompt.length
        check_prompt_length(length, max_context, image_features)
        max_new = min(params.max_new_tokens, max_context - length)
        cache = model.new_cache(1, length + max_new)
        out = TokenStream(tokenizer, params, max_new, min(tokenizer.vocab_size, logits_rows(lm)))
        res.token_ids = out.token_ids
        t0 = time.perf_counter()
        dev = prompt.embeds.device
        logits = model.forward_prompt(prompt, cache)
        res.timings.prefill_s = time.perf_counter() - t0
        res.timings.prefill_tokens = length
        steps = 0
        t_decode = time.perf_counter()
        while True:
            delta = out.push(logits[0])
            if out.steps == 1:
                res.timings.ttft_s = time.perf_counter() - t_start
            if delta:
                yield delta
            if out.done:
                break
            logits = model.forward_decode(torch.tensor([out.last_token], device=dev),
                                          torch.tensor([length + steps], device=dev), prompt.decode_offset, cache)
            steps += 1
        last = out.close()
        if last:
            yield last
        res.timings.decode_s = time.perf_counter() - t_decode
        res.timings.decode_tokens = steps
        res.timings.total_s = time.perf_counter() - t_start
        res.text, res.finish_reason = out.text, out.finish_reason


class PromptTooLong(InputError):
    """The prompt fills the context window (an ``InputError``)."""


def image_positions(image_features) -> int:
    """Prompt positions a request's images take: ``[N, tokens, D]`` features (LLaVA) or a family's
    features object with ``positions`` (images of different sizes)."""
    if image_features is None:
        return 0
    if isinstance(image_features, torch.Tensor):
        return image_features.shape[0] * image_features.shape[1]
    return int(image_features.positions)


def check_prompt_length(length: int, max_context: int, image_features) -> None:
    """Raise ``PromptTooLong`` when a prompt of ``length`` positions leaves no room to generate."""
    if length >= max_context:
        raise PromptTooLong(f"the prompt takes {length} positions ({image_positions(image_features)} of them for "
                            f"images) but the context window is {max_context}; shorten the prompt or use fewer "
                            "images")
