"""The prompt style of a run (``engine.benchmark``): which messages the model is asked and which answer is
recorded. The benchmark modules build LLaVA-1.5's items; a family with its own protocol (Qwen3-VL: GRACE's
scripts) rewrites the message and extracts its answer here. Scorers read the recorded ``text`` unchanged."""
from __future__ import annotations

from dataclasses import replace

from ..engine.benchmark import BenchmarkPrompts, BenchmarkQuestion, prompt_style
from .common import IMAGE_TOKEN, Item

DEFAULT_STYLE = "llava-1.5"   # endpoint runs (no model loaded) and manifests written before styles existed


def resolve_prompts(name: str | None, model_prompts: BenchmarkPrompts | None = None) -> BenchmarkPrompts:
    """``name`` (``None``/``"model"``: the loaded model's own style, else LLaVA-1.5's)."""
    if name in (None, "", "model"):
        return model_prompts if model_prompts is not None else prompt_style(DEFAULT_STYLE)
    return prompt_style(name)


def benchmark_question(benchmark: str, item: Item) -> BenchmarkQuestion:
    return BenchmarkQuestion(benchmark, item.question_text, item.image is not None, item.choice)


def max_new_tokens(benchmark: str, prompts: BenchmarkPrompts, requested: int | None) -> int:
    """``requested`` if given, else the style's budget for ``benchmark``, else the benchmark's own."""
    if requested is not None:
        return requested
    styled = prompts.max_new_tokens(benchmark)
    if styled is not None:
        return styled
    from . import BENCHMARKS, benchmark as module

    return module(benchmark).MAX_NEW_TOKENS if benchmark in BENCHMARKS else 128


def styled_item(benchmark: str, item: Item, prompts: BenchmarkPrompts) -> Item:
    """``item`` with the style's user message (no image placeholder: the image goes first). The answer line's
    ``prompt`` becomes the text sent (``<image>\\n`` in front for an image question, as LLaVA's ScienceQA
    prompt has, which its scorer's IMG split reads) unless the text is the benchmark's own."""
    text = prompts.user_text(benchmark_question(benchmark, item))
    if text is None:
        return item
    prompt = item.prompt
    if text != item.question_text:
        prompt = (IMAGE_TOKEN + "\n" if item.image is not None else "") + text
    return replace(item, user_message=text, prompt=prompt)


def recorded_answer(benchmark: str, item: Item, prompts: BenchmarkPrompts, generated: str) -> tuple[str, str | None]:
    """(the answer to record, the generated text when the answer was extracted from it, else None)."""
    extracted = prompts.extract_answer(benchmark_question(benchmark, item), generated)
    return (generated, None) if extracted is None else (extracted, generated)


__all__ = ["resolve_prompts", "benchmark_question", "max_new_tokens", "styled_item", "recorded_answer",
           "DEFAULT_STYLE"]
