"""The single-sequence generation loop shared by every front end (CLI, Python API, server, eval)."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch

from ..errors import InputError
from ..model.llava import LlavaModel
from ..model.tokenizer import LlamaTokenizer, StreamDecoder
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


def stream_generate(model: LlavaModel, tokenizer: LlamaTokenizer, prompt_ids: list[int],
                    image_features: torch.Tensor | None, params: SamplingParams, max_context: int,
                    result: Generation | None = None, started: float | None = None) -> Iterator[str]:
    """Yield text deltas; fill ``result`` (if given) with the final text, ids, finish reason, timings.

    Deltas never split a multi-byte character and never contain (a prefix of) a stop string.
    """
    t_start = started if started is not None else time.perf_counter()
    res = result if result is not None else Generation("", [], list(prompt_ids), "length")
    res.prompt_token_ids = list(prompt_ids)
    lm = model.language_model
    with torch.inference_mode():
        embeds = model.embed_prompt(prompt_ids, image_features)
        length = embeds.shape[0]
        if length >= max_context:
            raise InputError(f"the prompt takes {length} positions (each image counts as "
                             f"{image_features.shape[1] if image_features is not None else 0}) but the context "
                             f"window is {max_context}; shorten the prompt or use fewer images")
        max_new = min(params.max_new_tokens, max_context - length)
        cache = model.new_cache(1, length + max_new)
        sampler = Sampler(params)
        vocab = min(tokenizer.vocab_size, logits_rows(lm))
        decoder = StreamDecoder(tokenizer)
        stops = _StopMatcher(params.stop)
        t0 = time.perf_counter()
        dev = embeds.device
        logits = lm(embeds.unsqueeze(0), torch.arange(length, device=dev).unsqueeze(0), cache)
        res.timings.prefill_s = time.perf_counter() - t0
        res.timings.prefill_tokens = length
        raw, emitted, steps = "", 0, 0
        finish, cut = "length", -1
        t_decode = time.perf_counter()
        for step in range(max_new):
            token = sampler(logits[0, :vocab])  # rows past the tokenizer (padding) are never sampled
            if step == 0:
                res.timings.ttft_s = time.perf_counter() - t_start
            if token == tokenizer.eos_id:
                finish = "stop"
                break
            res.token_ids.append(token)
            raw += decoder.push(token)
            text = raw.lstrip()  # LLaVA strips the decoded answer; deltas add up to the stripped text
            cut = stops.find(text, emitted) if stops.stops else -1
            if cut >= 0:
                finish = "stop"
                break
            end = min(stops.safe_end(text), len(text.rstrip()))
            if end > emitted:
                yield text[emitted:end]
                emitted = end
            if step + 1 < max_new:
                pos = torch.tensor([[length + step]], device=dev)
                logits = lm(lm.embed(torch.tensor([[token]], device=dev), embeds.dtype), pos, cache)
                steps += 1
        if cut < 0:
            raw += decoder.flush()
        text = raw.lstrip()
        cut = stops.find(text, 0) if stops.stops else -1
        if cut >= 0:
            text, finish = text[:cut], "stop"
        text = text.rstrip()
        if len(text) > emitted:
            yield text[emitted:]
        res.timings.decode_s = time.perf_counter() - t_decode
        res.timings.decode_tokens = steps
        res.timings.total_s = time.perf_counter() - t_start
        res.text, res.finish_reason = text, finish
