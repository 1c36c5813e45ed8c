"""How a model family is asked benchmark questions: the part of the family contract ``gracevlm eval`` uses.

The eval modules build each benchmark's questions with LLaVA-1.5's protocol (eval-protocol.md: user message
``<image>\\n`` + question text, the benchmark's max_new_tokens, the answer recorded as generated). A family whose
authors evaluate it differently (Qwen3-VL: GRACE's ``evaluation/`` scripts) returns its own ``BenchmarkPrompts``
from ``Family.benchmark_prompts()``; every method of the base class says "keep the benchmark's own", which is
LLaVA's protocol. The scorers never change: they read the recorded answer.
"""
from __future__ import annotations

from dataclasses import dataclass

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class ChoiceQuestion:
    """A multiple-choice question in parts: the question, the option texts (lettered A, B, ... in order) and
    the hint/context (None when there is none). Texts are as the benchmark file holds them (not stripped)."""

    question: str
    options: tuple[str, ...]
    hint: str | None = None

    @property
    def letters(self) -> str:
        return LETTERS[:len(self.options)]


@dataclass(frozen=True)
class BenchmarkQuestion:
    """One benchmark question as a family sees it: the benchmark's name, its own question text (LLaVA's, with
    the benchmark's instruction; no image placeholder), whether an image comes with it, and the parts of a
    multiple-choice question (MMBench, SEED, ScienceQA; None for the short-answer benchmarks)."""

    benchmark: str
    text: str
    has_image: bool
    choice: ChoiceQuestion | None = None


class BenchmarkPrompts:
    """LLaVA-1.5's protocol (the base): the benchmark's own prompt, max_new_tokens and raw answers."""

    style = "llava-1.5"

    def user_text(self, q: BenchmarkQuestion) -> str | None:
        """The text of the single user message asking ``q``, its image (if any) placed before it; None: the
        benchmark's own message (LLaVA: ``<image>\\n`` + ``q.text``)."""
        return None

    def max_new_tokens(self, benchmark: str) -> int | None:
        """The generation budget this protocol uses for ``benchmark``; None: the benchmark's own."""
        return None

    def extract_answer(self, q: BenchmarkQuestion, text: str) -> str | None:
        """The answer to record (and score) for the generated ``text``; None: ``text`` as generated. A family
        that extracts an option letter returns ``""`` when it finds none (scored as wrong)."""
        return None


__all__ = ["LETTERS", "ChoiceQuestion", "BenchmarkQuestion", "BenchmarkPrompts"]
