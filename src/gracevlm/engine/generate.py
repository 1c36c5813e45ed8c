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
from .json_grammar import JsonObjectConstraint
from .kv_slots import reserve_lone
from .prefix_cache import plan_for, prefill_chunks
from .sampling import Sampler, SamplingParams, TokenLogprob, choice_seed, logprob_entry


@dataclass
class Timings:
    """Seconds and tokens/second of one generation. ``ttft_s`` counts from the call to the first
    sampled token (image encoding + prefill). ``cached_tokens``: prompt positions taken from a prefix cache
    instead of being prefilled (``engine.prefix_cache``); ``prefill_tokens`` counts only the positions computed."""

    image_encode_s: float = 0.0
    prefill_s: float = 0.0
    prefill_tokens: int = 0
    cached_tokens: int = 0
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
    """One generated sequence. ``logprobs`` (when asked for): one ``TokenLogprob`` per entry of
    ``token_ids``; ``prompt_logprobs``: one per prompt token, None for the first."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    timings: Timings = field(default_factory=Timings)
    prompt: str = ""
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def as_dict(self) -> dict:
        d = {"text": self.text, "token_ids": self.token_ids, "prompt_token_ids": self.prompt_token_ids,
             "finish_reason": self.finish_reason, "timings": self.timings.as_dict()}
        if self.logprobs is not None:
            d["logprobs"] = [{"token_id": e.token_id, "logprob": e.logprob, "top": e.top} for e in self.logprobs]
        return d


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
    ``Sampler`` (from the logits masked by the JSON grammar when ``params.response_format`` asks for it), detects EOS, stop strings and the length limit, detokenizes incrementally and returns the
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
        self.k_logprobs = params.logprobs
        self.constraint = JsonObjectConstraint(tokenizer, vocab) if params.response_format == "json_object" else None
        self.logprobs: list[TokenLogprob] | None = None if params.logprobs is None else []  # per token_ids entry
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
        row = logits[:self.vocab]
        if self.constraint is not None:
            row = self.constraint.mask(row)
        token, entry = self.sampler.sample(row, self.k_logprobs)
        if self.constraint is not None:
            self.constraint.advance(token)
        self.steps += 1
        if token in self.stop_ids:
            self.finish_reason, self.done = "stop", True
            return ""
        if entry is not None:
            self.logprobs.append(entry)  # before token_ids: a reader of both never sees a token without it
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
                    result: Generation | None = None, started: float | None = None,
                    prefix_cache=None, image_keys: list[bytes] | None = None, kv_pool=None) -> Iterator[str]:
    """Yield text deltas; fill ``result`` (if given) with the final text, ids, finish reason, timings.
    ``model`` is a family's model (the engine contract in ``models.registry``: ``prompt_for``,
    ``forward_prompt``, ``forward_decode``, ``new_cache``, ``language_model``). With a ``prefix_cache`` (and one
    content key per image in ``image_keys``) the prompt's cached prefix is reused and the rest prefilled in
    block-aligned chunks (``engine.prefix_cache``: exact against a cold run). With ``kv_pool`` the KV storage
    is taken from it for the call (``KVBudgetExceeded`` / ``KVPoolFull`` when it cannot be; ``engine.kv_slots``).

    Deltas never split a multi-byte character and never contain (a prefix of) a stop string.
    """
    t_start = started if started is not None else time.perf_counter()
    res = result if result is not None else Generation("", [], list(prompt_ids), "length")
    res.prompt_token_ids = list(prompt_ids)
    with torch.inference_mode():
        prompt = model.prompt_for(prompt_ids, image_features)
        length = prompt.length
        check_prompt_length(length, max_context, image_features)
        max_new = min(params.max_new_tokens, max_context - length)
        cache = _lone_cache(model, 1, length + max_new, kv_pool)
        try:
            yield from _stream_lone(model, tokenizer, prompt, params, max_new, cache, res, t_start,
                                    plan_for(prefix_cache, model, prompt_ids, image_keys, image_features, length))
        finally:
            cache.free_all()


def _lone_cache(model, slots: int, positions: int, kv_pool):
    """A cache of ``slots`` slots for one call, allocated (from ``kv_pool`` when given) for ``positions``."""
    if kv_pool is None:
        return model.new_cache(slots, positions)
    cache = model.new_cache(slots, positions, pool=kv_pool)
    reserve_lone(cache, slots, positions)
    return cache


def _stream_lone(model, tokenizer, prompt, params: SamplingParams, max_new: int, cache, res: Generation,
                 t_start: float, plan) -> Iterator[str]:
    """``stream_generate`` once its cache is allocated: prefill (``plan``: the prefix cache's), decode loop."""
    lm = model.language_model
    length = prompt.length
    out = TokenStream(tokenizer, params, max_new, min(tokenizer.vocab_size, logits_rows(lm)))
    res.token_ids, res.logprobs = out.token_ids, out.logprobs
    t0 = time.perf_counter()
    dev = prompt.embeds.device
    if plan is None:
        logits = model.forward_prompt(prompt, cache)
    else:
        logits = prefill_chunks(model, prompt, cache, 0, plan)
        res.timings.cached_tokens = plan.cached
    res.timings.prefill_s = time.perf_counter() - t0
    res.timings.prefill_tokens = length - res.timings.cached_tokens
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


def prompt_logprob_entries(logits: torch.Tensor, ids: list[int], start: int, k: int, vocab: int) -> list:
    """Entries for the prompt tokens ``ids[start + 1 : start + 1 + len(logits)]`` from the logits rows of
    positions ``start ...`` (row j predicts token ``start + j + 1``): the model's own distribution."""
    logp = torch.log_softmax(logits[:, :vocab].to(torch.float32), dim=-1)
    return [logprob_entry(logp[j], ids[start + j + 1], k) for j in range(logp.shape[0]) if start + j + 1 < len(ids)]


def generate_choices(model, tokenizer: LlamaTokenizer, prompt_ids: list[int],
                     image_features: torch.Tensor | None, params: SamplingParams, n: int, max_context: int,
                     started: float | None = None, prefix_cache=None,
                     image_keys: list[bytes] | None = None, kv_pool=None) -> list[Generation]:
    """``n`` independent samples of one prompt: ONE prefill, its KV copied to ``n`` cache rows, then the
    rows decode together. Choice i samples with ``choice_seed(params.seed, i)``; every row is computed as
    a lone sequence would be (``rows_alone``), so choice i equals a lone ``stream_generate`` with that seed
    on row-invariant kernels (the CPU ones; see ``engine.scheduler``)."""
    t_start = started if started is not None else time.perf_counter()
    lm = model.language_model
    vocab = min(tokenizer.vocab_size, logits_rows(lm))
    with torch.inference_mode():
        prompt = model.prompt_for(prompt_ids, image_features)
        length = prompt.length
        check_prompt_length(length, max_context, image_features)
        max_new = min(params.max_new_tokens, max_context - length)
        cache = _lone_cache(model, n, length + max_new, kv_pool)
        try:
            return _choices_lone(model, tokenizer, prompt, prompt_ids, params, n, max_new, cache, vocab, t_start,
                                 plan_for(prefix_cache, model, prompt_ids, image_keys, image_features, length))
        finally:
            cache.free_all()


def _choices_lone(model, tokenizer, prompt, prompt_ids, params, n, max_new, cache, vocab, t_start, plan):
    """``generate_choices`` once its ``n`` slots are allocated."""
    from dataclasses import replace

    length = prompt.length
    outs = [TokenStream(tokenizer, replace(params, seed=choice_seed(params.seed, i)), max_new, vocab)
            for i in range(n)]
    gens = [Generation("", o.token_ids, list(prompt_ids), "length", logprobs=o.logprobs) for o in outs]
    dev = prompt.embeds.device
    t0 = time.perf_counter()
    if plan is None:
        logits = model.forward_prompt(prompt, cache, 0)
    else:
        logits = prefill_chunks(model, prompt, cache, 0, plan)
    cached = 0 if plan is None else plan.cached
    prefill_s = time.perf_counter() - t0
    for slot in range(1, n):
        cache.copy_positions(0, slot, length)
    for o, g in zip(outs, gens):
        o.push(logits[0])
        g.timings.ttft_s = time.perf_counter() - t_start
    decoded = [0] * n
    t_decode = time.perf_counter()
    while rows := [i for i, o in enumerate(outs) if not o.done]:
        tokens = torch.tensor([outs[i].last_token for i in rows], device=dev)
        pos = torch.tensor([length + decoded[i] for i in rows], device=dev)
        offsets = torch.tensor([prompt.decode_offset] * len(rows), device=dev)
        logits = model.forward_decode(tokens, pos, offsets, cache, torch.tensor(rows, device=dev),
                                      rows_alone=True)
        for r, i in enumerate(rows):
            decoded[i] += 1
            outs[i].push(logits[r])
    for i, (o, g) in enumerate(zip(outs, gens)):
        o.close()
        g.text, g.finish_reason = o.text, o.finish_reason
        t = g.timings
        t.prefill_s, t.prefill_tokens, t.decode_tokens = prefill_s, length - cached, decoded[i]
        t.cached_tokens = cached
        t.decode_s = time.perf_counter() - t_decode
        t.total_s = time.perf_counter() - t_start
    return gens


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
