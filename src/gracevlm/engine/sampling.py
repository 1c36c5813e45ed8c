"""Sampling parameters and the token sampler (greedy, temperature, top-k, top-p, seeded), the
log-probabilities it reports, and the seeds of the choices of an ``n > 1`` request.

Log-probabilities are those of the distribution the token was actually drawn from: for greedy
(``temperature == 0``) the model's own distribution, ``log_softmax(logits)``; otherwise the distribution
after temperature, top-k and top-p, renormalized (tokens those filters remove have probability 0 and are
never listed among the alternatives)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import InputError


MAX_LOGPROBS = 20
RESPONSE_FORMATS = ("text", "json_object")


@dataclass
class TokenLogprob:
    """One token's log-probability and the ``top`` most likely tokens ``[(id, logprob), ...]`` (best first)
    of the same distribution."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def logprob_entry(logp: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """``logp [V]`` (log-probabilities, -inf where impossible) -> the entry of ``token`` with ``k``
    alternatives (fewer when fewer tokens are possible)."""
    top: list[tuple[int, float]] = []
    if k:
        values, ids = torch.topk(logp, min(k, logp.numel()))
        top = [(int(i), float(v)) for v, i in zip(values.tolist(), ids.tolist()) if v != float("-inf")]
    return TokenLogprob(int(token), float(logp[token]), top)


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice ``index`` of a request with ``seed``: choice 0 uses ``seed`` itself (so ``n=1``
    and the first of ``n`` choices agree), the others a splitmix64 mix of (seed, index). None stays None."""
    if seed is None or index == 0:
        return seed
    z = (int(seed) + 0x9E3779B97F4A7C15 * index) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1  # a non-negative int64 (torch.Generator.manual_seed takes it)


@dataclass
class SamplingParams:
    """``temperature == 0`` means greedy. ``top_k == 0`` and ``top_p == 1`` disable those filters.
    ``seed`` makes sampling reproducible. ``stop`` strings end generation (not included in the text).
    ``logprobs``: None (off) or 0-20, the number of most likely alternatives to report beside each sampled
    token's log-probability. ``prompt_logprobs``: the same for the prompt's tokens (model's distribution,
    text-only prompts; the first token has none). ``response_format``: "text", or "json_object" for
    grammar-constrained decoding of one JSON object (``engine.json_grammar``)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    response_format: str = "text"

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (self.temperature >= 0) or self.temperature == float("inf"):
            raise InputError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            raise InputError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not -(2**63) <= self.seed <= 2**64 - 1):
            raise InputError(f"seed must be an integer in [-2**63, 2**64 - 1], got {self.seed!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if self.response_format not in RESPONSE_FORMATS:
            raise InputError(f"response_format must be one of {RESPONSE_FORMATS}, got {self.response_format!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 0 <= value <= MAX_LOGPROBS):
                raise InputError(f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Turns a float32 logits vector ``[V]`` into a token id."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(int(params.seed))
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        return self.sample(logits)[0]

    def sample(self, logits: torch.Tensor, logprobs: int | None = None) -> tuple[int, TokenLogprob | None]:
        """The next token and, when ``logprobs`` is not None, its ``TokenLogprob`` with that many
        alternatives, of the distribution it was drawn from (see the module docstring)."""
        if not torch.isfinite(logits).any() or torch.isnan(logits).any():
            raise FloatingPointError("the model produced non-finite logits (NaN/inf); the checkpoint or the "
                                     "kernel backend is broken - try --backend reference to compare")
        p = self.params
        if p.greedy:
            token = int(torch.argmax(logits))
            if logprobs is None:
                return token, None
            return token, logprob_entry(torch.log_softmax(logits.to(torch.float32), dim=-1), token, logprobs)
        logits32 = logits.to(device="cpu", dtype=torch.float32)  # the CPU generator: same draws on any device
        scaled = logits32 / p.temperature
        if bool((torch.isinf(scaled) & torch.isfinite(logits32)).any()):
            # a temperature so small that logits / T overflows float32: the T -> 0 limit is greedy (masked
            # entries, -inf already, e.g. under a JSON grammar, are not an overflow)
            token = int(torch.argmax(logits))
            if logprobs is None:
                return token, None
            return token, logprob_entry(torch.log_softmax(logits.to(torch.float32), dim=-1), token, logprobs)
        logits = scaled
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            drop = cumulative - sorted_probs >= p.top_p  # keep the smallest prefix reaching top_p
            drop[0] = False  # and always the most likely token (a top_p below float32's range rounds to 0)
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        token = int(torch.multinomial(probs, 1, generator=self.generator))
        if logprobs is None:
            return token, None
        return token, logprob_entry(torch.log(probs / probs.sum()), token, logprobs)
