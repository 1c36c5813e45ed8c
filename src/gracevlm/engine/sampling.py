"""Sampling parameters and the token sampler (greedy, temperature, top-k, top-p, seeded)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import InputError


@dataclass
class SamplingParams:
    """``temperature == 0`` means greedy. ``top_k == 0`` and ``top_p == 1`` disable those filters.
    ``seed`` makes sampling reproducible. ``stop`` strings end generation (not included in the text)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

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
        if not torch.isfinite(logits).any() or torch.isnan(logits).any():
            raise FloatingPointError("the model produced non-finite logits (NaN/inf); the checkpoint or the "
                                     "kernel backend is broken - try --backend reference to compare")
        p = self.params
        if p.greedy:
            return int(torch.argmax(logits))
        scaled = logits.to(torch.float32) / p.temperature
        if not torch.isfinite(scaled).all():
            # a temperature so small that logits / T overflows float32: the T -> 0 limit is greedy
            return int(torch.argmax(logits))
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
        return int(torch.multinomial(probs, 1, generator=self.generator))
