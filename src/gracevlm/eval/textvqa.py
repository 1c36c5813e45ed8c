"""TextVQA val (eval-protocol.md 3.3): question recovered from the prompt, EvalAI-normalised soft accuracy."""
from __future__ import annotations

import re

from ..errors import InputError
from .answers import read_json, read_jsonl
from .common import loader_items, pct
from .normalize import textvqa_accuracy

NAME = "textvqa"
MAX_NEW_TOKENS = 128
_OCR_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)
HANDLING = {
    "denominator": "accuracy is the mean over result lines (not over annotations), as eval_textvqa.py does",
    "missing": "annotated questions without a result line are not counted",
    "duplicates": "each result line counts (a duplicated line is scored twice)",
    "unknown_ids": "a result whose (image_id, question) is not annotated aborts (KeyError in eval_textvqa.py)",
    "unparsable": "the official script aborts on an unparsable line; so does this one",
    "failed": "a prompt from which no question can be recovered aborts, as in eval_textvqa.py",
}


def load_items(question_file, image_folder=None):
    return loader_items(question_file, image_folder)


def recover_question(prompt: str) -> str:
    """eval_textvqa.py's prompt_processor: the question (lower-cased) from the answer line's prompt."""
    if prompt.startswith("OCR tokens: "):
        m = _OCR_QUESTION.search(prompt)
        if m is None:
            raise InputError(f"prompt starts with 'OCR tokens: ' but has no 'Question: ... Short answer:': {prompt!r}")
        question = m.group(1)
    elif "Reference OCR token: " in prompt and len(prompt.split("\n")) == 3:
        lines = prompt.split("\n")
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(prompt.split("\n")) == 2:
        question = prompt.split("\n")[0]
    else:
        raise InputError(f"cannot recover the TextVQA question from prompt {prompt!r} (eval_textvqa.py aborts)")
    return question.lower()


def score(annotation_file, result_file) -> dict:
    data = read_json(annotation_file, what="TextVQA annotation file")
    try:
        rows = data["data"]
    except (TypeError, KeyError):
        raise InputError(f"{annotation_file}: expected TextVQA_0.5.1_val.json with a 'data' list") from None
    annotations = {(str(a["image_id"]), a["question"].lower()): a for a in rows}
    results, _ = read_jsonl(result_file, strict=True, what="result file")
    scores = []
    for r in results:
        key = (str(r.get("question_id")), recover_question(r.get("prompt", "")))
        if key not in annotations:
            raise InputError(f"result for image {key[0]!r} question {key[1]!r} is not in the annotation file "
                             "(eval_textvqa.py aborts with KeyError)")
        gts = annotations[key]["answers"]
        if len(gts) != 10:
            raise InputError(f"annotation {key} has {len(gts)} answers; the m4c evaluator asserts 10")
        scores.append(textvqa_accuracy(r.get("text", ""), gts))
    keys = [(str(r.get("question_id")), recover_question(r.get("prompt", ""))) for r in results]
    key_set = set(keys)
    counts = {"results": len(results), "missing": sum(1 for k in annotations if k not in key_set),
              "unparsable": 0, "failed": 0, "duplicates": len(keys) - len(set(keys)), "unknown_ids": 0}
    return {"benchmark": NAME, "accuracy": pct(sum(scores), len(scores)), "samples": len(scores),
            "counts": counts, "handling": HANDLING, "scale": "percent"}


def format_text(res: dict) -> str:
    acc = res["accuracy"]
    return f"Samples: {res['samples']}\nAccuracy: {'nan' if acc is None else f'{acc:.2f}'}%"
