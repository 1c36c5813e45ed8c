"""GQA testdev-balanced (eval-protocol.md 3.2): trailing periods removed, lower-cased, exact match."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from .answers import read_json, read_jsonl
from .common import loader_items, pct

NAME = "gqa"
MAX_NEW_TOKENS = 128
HANDLING = {
    "conversion": "prediction = text with trailing '.' removed, then lower-cased (convert_gqa_for_eval.py)",
    "matching": "exact string equality with 'answer'; accuracy over isBalanced questions",
    "missing": "the official eval.py aborts when a balanced question has no prediction; so does this one "
               "unless --partial, which counts such questions as wrong",
    "duplicates": "the last prediction of a questionId wins (dict)",
    "unknown_ids": "predictions whose id is not in the questions file are ignored",
    "unparsable": "convert_gqa_for_eval.py aborts on an unparsable line; so does this one",
}


def load_items(question_file, image_folder=None):
    return loader_items(question_file, image_folder)


def convert(answers: list[dict]) -> list[dict]:
    """convert_gqa_for_eval.py: ``{questionId, prediction}`` in answer order."""
    return [{"questionId": a["question_id"], "prediction": a["text"].rstrip(".").lower()} for a in answers]


def score(annotation_file, result_file, partial: bool = False) -> dict:
    questions = read_json(annotation_file, what="GQA questions file")
    if not isinstance(questions, dict):
        raise InputError(f"{annotation_file}: expected GQA's questions JSON (a dict questionId -> question)")
    answers, _ = read_jsonl(result_file, strict=True, what="result file")
    converted = convert(answers)
    predictions = {str(p["questionId"]): p["prediction"] for p in converted}
    missing = [qid for qid, q in questions.items() if q.get("isBalanced") and qid not in predictions]
    if missing and not partial:
        raise InputError(f"{len(missing)} balanced GQA questions have no prediction (first: {missing[:5]}); the "
                         "official eval.py requires all of them. Finish the run, or pass --partial to count them "
                         "as wrong")
    scores: dict[str, list[int]] = {"accuracy": [], "binary": [], "open": []}
    per_structural: dict[str, list[int]] = {}
    per_semantic: dict[str, list[int]] = {}
    for qid, q in questions.items():
        if not q.get("isBalanced"):
            continue
        s = int(predictions.get(qid) == q["answer"])
        scores["accuracy"].append(s)
        types = q.get("types", {})
        scores["open" if types.get("structural") == "query" else "binary"].append(s)
        per_structural.setdefault(types.get("structural"), []).append(s)
        per_semantic.setdefault(types.get("semantic"), []).append(s)

    def avg(v):
        return pct(sum(v), len(v))

    ids = [str(p["questionId"]) for p in converted]
    counts = {"results": len(answers), "missing": len(missing), "unparsable": 0, "failed": 0,
              "duplicates": len(ids) - len(set(ids)), "unknown_ids": sum(1 for i in set(ids) if i not in questions),
              "balanced": len(scores["accuracy"])}
    return {"benchmark": NAME, "accuracy": avg(scores["accuracy"]), "binary": avg(scores["binary"]),
            "open": avg(scores["open"]), "per_structural": {str(k): avg(v) for k, v in per_structural.items()},
            "per_semantic": {str(k): avg(v) for k, v in per_semantic.items()}, "complete": not missing,
            "counts": counts, "handling": HANDLING, "scale": "percent"}


def submit(result_file, output) -> dict:
    answers, _ = read_jsonl(result_file, strict=True, what="result file")
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(convert(answers)), encoding="utf-8")
    return {"benchmark": NAME, "output": str(out), "written": len(answers)}


def format_text(res: dict) -> str:
    def f(v):
        return "nan" if v is None else f"{v:.2f}%"
    return f"Binary: {f(res['binary'])}\nOpen: {f(res['open'])}\nAccuracy: {f(res['accuracy'])}"
