"""Qwen3-VL's benchmark prompts as GRACE's own evaluation scripts build them (``evaluation/MMBench/
eval_mmbench.py``, ``evaluation/SEEDBench/eval_seedbench.py``, ``evaluation/ScienceQA/eval_scienceqa.py``).

Those scripts send ONE user message, no system message, the image part first (text-only ScienceQA problems:
no image), through the checkpoint's chat template with the generation prompt; the processor alone handles the
image (RGB, the checkpoint's ``smart_resize``, no pad-to-square); greedy (``do_sample=False``),
``max_new_tokens=8`` (their slurm files pass 8); the answer is decoded without special tokens. The text is

    Context: <hint stripped>          (only when the hint is non-empty and not 'nan'; SEED has none)
    Question: <question stripped>
    Options:
    (A) <option>
    (B) <option> ...
    Answer with only the option letter.

and the letter is the first character of the upper-cased, stripped answer that is one of the question's
option letters (so "B." and "(B) cat" give B, but "The answer is B" gives A when A is an option, from
"ANSWER", and "cat" gives C when C is one); no option letter at all gives "" (wrong). There is no matching
of option texts.

GRACE defines no Qwen3-VL protocol for VQAv2, GQA, TextVQA, POPE or MME (its Qwen3-VL table covers
HallusionBench, MMBench, ScienceQA, AI2D, MMMU, SEED, MMStar): for those the benchmark's own (LLaVA) question
text is sent as it is, image part first, with the benchmark's max_new_tokens and its own answer parsing.

Where gracevlm's run differs from GRACE's scripts: scoring stays the official one (MMBench circular over the
TSV's rows, GRACE's script reports per-row accuracy; SEED's scorer pools image and video questions and
reports the image line separately, GRACE's script keeps image questions only); MMBench options end at the
first empty cell (LLaVA's reading; GRACE skips empty cells, the same for MMBench's contiguous options);
MMBench-CN gets this same English text (GRACE has no CN script); SEED's question and options are read back
from LLaVA's question file (``eval.seed``), ScienceQA's from ``problems.json`` or the LLaVA question file.
"""
from __future__ import annotations

from ...errors import InputError
from ..benchmark_prompts import BenchmarkPrompts, BenchmarkQuestion, ChoiceQuestion

INSTRUCTION = "Answer with only the option letter."
MAX_NEW_TOKENS = 8
CHOICE_BENCHMARKS = ("mmbench", "seed", "scienceqa")


def grace_choice_text(choice: ChoiceQuestion) -> str:
    """``format_prompt`` of GRACE's MMBench / SEED / ScienceQA scripts (they differ only in having a hint)."""
    parts = []
    hint = (choice.hint or "").strip()
    if hint and hint.lower() != "nan":
        parts.append(f"Context: {hint}")
    parts.append(f"Question: {choice.question.strip()}")
    options = "\n".join(f"({letter}) {text}" for letter, text in zip(choice.letters, choice.options))
    parts.append(f"Options:\n{options}")
    parts.append(INSTRUCTION)
    return "\n".join(parts)


def first_option_letter(text: str, letters: str) -> str:
    """``parse_choice`` of GRACE's scripts: the first character of ``text.strip().upper()`` that is one of
    ``letters``, or ``""``."""
    valid = set(letters)
    for ch in text.strip().upper():
        if ch in valid:
            return ch
    return ""


class GraceQwen3VLPrompts(BenchmarkPrompts):
    style = "grace-qwen3-vl"

    def user_text(self, q: BenchmarkQuestion) -> str:
        if q.benchmark in CHOICE_BENCHMARKS:
            if q.choice is None:
                raise InputError(f"{q.benchmark}: the question {q.text[:80]!r} has no options this protocol can "
                                 "read (expected the LLaVA question layout)")
            return grace_choice_text(q.choice)
        return q.text

    def max_new_tokens(self, benchmark: str) -> int | None:
        return MAX_NEW_TOKENS if benchmark in CHOICE_BENCHMARKS else None

    def extract_answer(self, q: BenchmarkQuestion, text: str) -> str | None:
        if q.benchmark in CHOICE_BENCHMARKS and q.choice is not None:
            return first_option_letter(text, q.choice.letters)
        return None


__all__ = ["GraceQwen3VLPrompts", "grace_choice_text", "first_option_letter", "INSTRUCTION", "MAX_NEW_TOKENS"]
