"""SEED-Bench (eval-protocol.md 3.7): exact string equality with the answer letter; pooled type accuracies."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..engine.benchmark import ChoiceQuestion
from ..errors import InputError
from .answers import read_json, read_jsonl
from .common import MC_INSTRUCTION, loader_items, pct, split_option_lines

NAME = "seed"
MAX_NEW_TOKENS = 128
HANDLING = {
    "matching": "correct only if the answer text equals the answer letter exactly (no stripping, no case folding)",
    "missing": "a question without an answer counts as wrong (denominators are all annotated questions)",
    "ids": "annotation ids are converted to int when they parse as one, answer ids are used as written; an answer "
           "whose id type differs (\"123\" vs 123) does not match, as in convert_seed_for_submission.py",
    "duplicates": "the last line of a question_id wins (dict by question_id)",
    "unknown_ids": "answers whose id is not in the annotation file are ignored",
    "unparsable": "the official script aborts on an unparsable line; so does this one",
}


def load_items(question_file, image_folder=None):
    """model_vqa_loader items; each also carries its question and options (read back from the LLaVA text
    ``question\\nA. a\\nB. b ...\\n<instruction>``) for prompt styles that lay them out differently."""
    out = []
    for (item,) in loader_items(question_file, image_folder):
        head, options = split_option_lines(item.question_text, (MC_INSTRUCTION,))
        choice = ChoiceQuestion("\n".join(head), tuple(options)) if options else None
        out.append([replace(item, choice=choice)])
    return out


def _official_id(qid):
    try:
        return int(qid)
    except (TypeError, ValueError):
        return qid


def _load(annotation_file, result_file):
    data = read_json(annotation_file, what="SEED-Bench.json")
    if not isinstance(data, dict) or "questions" not in data:
        raise InputError(f"{annotation_file}: expected SEED-Bench.json with 'question_type' and 'questions'")
    answers, _ = read_jsonl(result_file, strict=True, what="result file")
    results = {}
    for a in answers:
        results[a.get("question_id")] = a
    return data, answers, results


def _accuracy(data, results, only_type=None):
    type_counts: dict = {}
    correct_counts: dict = {}
    for q in data["questions"]:
        if only_type is not None and q.get("data_type") != only_type:
            continue
        t = q["question_type_id"]
        type_counts[t] = type_counts.get(t, 0) + 1
        correct_counts.setdefault(t, 0)
        row = results.get(_official_id(q["question_id"]))
        if row is not None and row.get("text") == q["answer"]:
            correct_counts[t] += 1
    total = sum(type_counts.values())
    correct = sum(correct_counts.values())
    per_type = {t: pct(correct_counts[t], type_counts[t]) for t in sorted(type_counts)}
    return pct(correct, total), per_type, correct, total


def score(annotation_file, result_file) -> dict:
    data, answers, results = _load(annotation_file, result_file)
    names = {v: k for k, v in data.get("question_type", {}).items()}
    accuracy, per_type, correct, total = _accuracy(data, results)
    image_acc, _, img_correct, img_total = _accuracy(data, results, "image")
    video_acc, _, vid_correct, vid_total = _accuracy(data, results, "video")
    official_ids = [_official_id(q["question_id"]) for q in data["questions"]]
    official_set = set(official_ids)
    ids = [a.get("question_id") for a in answers]
    counts = {"results": len(answers), "missing": sum(1 for i in official_ids if i not in results),
              "unparsable": 0, "failed": 0, "duplicates": len(ids) - len(set(map(json.dumps, ids))),
              "unknown_ids": sum(1 for i in results if i not in official_set)}
    return {"benchmark": NAME, "accuracy": accuracy, "image_accuracy": image_acc, "video_accuracy": video_acc,
            "per_type": {names.get(t, str(t)): v for t, v in per_type.items()},
            "correct": correct, "count": total, "image_correct": img_correct, "image_count": img_total,
            "video_correct": vid_correct, "video_count": vid_total, "counts": counts, "handling": HANDLING,
            "scale": "percent"}


def submit(annotation_file, result_file, output) -> dict:
    """The upload JSONL ``{question_id, prediction}`` for every annotated question; fails unless complete."""
    data, answers, results = _load(annotation_file, result_file)
    lines, missing = [], []
    for q in data["questions"]:
        qid = q["question_id"]
        row = results.get(qid)
        if row is None:
            row = results.get(_official_id(qid))
        if row is None:
            missing.append(qid)
            continue
        lines.append(json.dumps({"question_id": qid, "prediction": row.get("text")}) + "\n")
    if missing:
        raise InputError(f"SEED upload needs an answer for every question: {len(missing)} of "
                         f"{len(data['questions'])} are missing (first: {missing[:5]}); finish the run first")
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(lines), encoding="utf-8")
    return {"benchmark": NAME, "output": str(out), "written": len(lines)}


def format_text(res: dict) -> str:
    def f(v):
        return "nan" if v is None else f"{v:.2f}"
    lines = [f"{name}: {f(v)}%" for name, v in res["per_type"].items()]
    lines += [f"Total accuracy: {f(res['accuracy'])}%", f"image accuracy: {f(res['image_accuracy'])}%",
              f"video accuracy: {f(res['video_accuracy'])}%"]
    return "\n".join(lines)
