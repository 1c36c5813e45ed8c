"""The engine's face for benchmark harnesses: a family's benchmark prompt style (``models.benchmark_prompts``),
from a loaded ``VLM`` (``VLM.benchmark_prompts``) or by style name (an endpoint run, where no model is loaded)."""
from __future__ import annotations

from ..errors import InputError
from ..models.benchmark_prompts import BenchmarkPrompts, BenchmarkQuestion, ChoiceQuestion
from ..models.registry import benchmark_prompt_styles


def prompt_style(name: str) -> BenchmarkPrompts:
    """The benchmark prompt style called ``name`` (``llava-1.5``, ``grace-qwen3-vl``)."""
    styles = benchmark_prompt_styles()
    if name not in styles:
        raise InputError(f"unknown prompt style {name!r}; known: {', '.join(sorted(styles))}")
    return styles[name]


__all__ = ["BenchmarkPrompts", "BenchmarkQuestion", "ChoiceQuestion", "prompt_style"]
