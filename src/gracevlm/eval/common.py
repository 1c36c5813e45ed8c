"""Pieces shared by the benchmark modules: prompt constants, work items, question-file reading, counts."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from ..engine.benchmark import ChoiceQuestion
from ..errors import InputError
from .answers import read_jsonl

IMAGE_TOKEN = "<image>"
SHORT_ANSWER = "Answer the question using a single word or phrase."
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
MC_INSTRUCTION_CN = "请直接回答选项字母。"


@dataclass
class Item:
    """One generation: what goes to the model and what goes into the answer line."""

    question_id: Any
    prompt: str                      # the answer file's ``prompt`` field (as the LLaVA loader writes it)
    user_message: str                # the full user message; starts with "<image>\n" when there is an image
    image: str | bytes | None        # path, raw bytes (MMBench) or None (text-only ScienceQA)
    before_prompt: dict = field(default_factory=dict)   # extra answer fields between question_id and prompt
    after_text: dict = field(default_factory=dict)      # extra answer fields between text and answer_id
    choice: ChoiceQuestion | None = None  # the parts of a multiple-choice question (for other prompt styles)

    @property
    def question_text(self) -> str:
        """The user message without its leading image placeholder."""
        prefix = IMAGE_TOKEN + "\n"
        if self.image is not None and self.user_message.startswith(prefix):
            return self.user_message[len(prefix):]
        return self.user_message

    def record(self, text: str, answer_id: str, model_id: str, raw_text: str | None = None) -> dict:
        """The answer line; ``raw_text`` (the generated text when ``text`` was extracted from it) follows
        ``text``."""
        raw = {} if raw_text is None else {"raw_text": raw_text}
        rec = {"question_id": self.question_id, **self.before_prompt, "prompt": self.prompt, "text": text, **raw,
               **self.after_text, "answer_id": answer_id, "model_id": model_id, "metadata": {}}
        return rec


_OPTION_LINE = re.compile(r"([A-Z])\. (.*)")


def split_option_lines(text: str, instructions: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """A LLaVA multiple-choice text (``...\\nA. opt\\nB. opt`` [+ ``\\n`` + one of ``instructions``]) -> the
    lines before the options and the option texts (A, B, ... consecutive); no options: ``(lines, [])``."""
    lines = text.split("\n")
    if lines and lines[-1] in instructions:
        lines = lines[:-1]
    options: list[str] = []
    expect = None  # the letter the next line up must carry (the one before the last found)
    while lines:
        m = _OPTION_LINE.fullmatch(lines[-1])
        if m is None or (expect is not None and m.group(1) != expect):
            break
        options.insert(0, m.group(2))
        lines = lines[:-1]
        if m.group(1) == "A":
            return lines, options
        expect = chr(ord(m.group(1)) - 1)
    return text.split("\n"), []


def read_question_jsonl(path: str | os.PathLike) -> list[dict]:
    """A LLaVA question file (JSON lines with question_id, image, text, category)."""
    records, _ = read_jsonl(path, strict=True, what="question file")
    for i, q in enumerate(records):
        if not isinstance(q, dict) or "question_id" not in q or "text" not in q:
            raise InputError(f"{path}: line {i + 1} is not a LLaVA question (needs question_id and text)")
    return records


def loader_items(question_file: str | os.PathLike, image_folder: str | os.PathLike | None) -> list[list[Item]]:
    """Work items of ``model_vqa_loader``: the user message is ``<image>\\n`` + the question-file text and the
    answer line's prompt is the question-file text."""
    out = []
    for q in read_question_jsonl(question_file):
        image = q.get("image")
        if not image:
            raise InputError(f"{question_file}: question {q['question_id']!r} has no image; model_vqa_loader "
                             "benchmarks are image questions")
        path = os.path.join(image_folder, image) if image_folder else image
        text = q["text"]
        out.append([Item(q["question_id"], text, IMAGE_TOKEN + "\n" + text, path)])
    return out


def pct(num: float, den: float) -> float | None:
    return None if den == 0 else 100.0 * num / den


def frac(num: float, den: float) -> float | None:
    return None if den == 0 else num / den
