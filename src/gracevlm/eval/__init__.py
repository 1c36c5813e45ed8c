"""Benchmark evaluation with LLaVA-1.5's protocol: prompts, answer files and scores identical to the official
scripts (see eval-protocol.md). One module per benchmark:

``vqav2``, ``gqa``, ``textvqa``, ``pope``, ``mme``, ``scienceqa``, ``seed``, ``mmbench`` — each with
``load_items`` (question file -> work items), ``score`` (-> dict), ``format_text`` and, where a server does the
scoring, ``submit``. Shared: ``normalize`` (EvalAI / VQA answer processing, soft accuracy), ``answers`` (answer
files: append + fsync, resume, chunks, merge), ``runner`` (``eval run``), ``prompting`` (the model family's
prompt style: another family's prompts and answer extraction, e.g. GRACE's Qwen3-VL ones), ``client``
(OpenAI-compatible endpoint), ``report``; ``cli.register(subparsers)`` adds ``gracevlm eval``.
"""
from __future__ import annotations

import importlib

BENCHMARKS = ("vqav2", "gqa", "textvqa", "pope", "mme", "scienceqa", "seed", "mmbench")


def benchmark(name: str):
    """The module of benchmark ``name``."""
    if name not in BENCHMARKS:
        from ..errors import InputError

        raise InputError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return importlib.import_module(f"{__name__}.{name}")


__all__ = ["BENCHMARKS", "benchmark"]
