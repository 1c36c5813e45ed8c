"""POPE (eval-protocol.md 3.4): yes/no parsing of the first sentence, positional matching with the label files."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError
from .answers import read_jsonl
from .common import frac, loader_items, read_question_jsonl

NAME = "pope"
MAX_NEW_TOKENS = 128
CATEGORIES = ("adversarial", "popular", "random")
HANDLING = {
    "matching": "answers of a category (in answer-file order) are zipped POSITIONALLY with the label file lines, "
                "as eval_pope.py does; extra answers or labels beyond the shorter list are ignored",
    "unparsable": "the official script aborts on an unparsable line; so does this one",
    "unknown_ids": "an answer whose question_id is not in the question file aborts (KeyError in eval_pope.py)",
    "duplicates": "kept: each line takes the next label position",
    "missing": "not detected by the official script; labels without an answer at their position are dropped by "
               "zip, and every later answer of the category is compared with the wrong label "
               "(see 'misaligned')",
    "yes_ratio": "share of yes over all answers of the category (not only the zipped ones)",
    "undefined": "a metric with a zero denominator (official: ZeroDivisionError) is reported as null",
}


def load_items(question_file, image_folder=None):
    return loader_items(question_file, image_folder)


def parse_yes_no(text: str) -> str:
    """eval_pope.py: keep the text before its first '.', delete commas, split on single spaces; 'no' when a token is
    exactly 'No', 'no' or 'not', else 'yes'."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def category_metrics(answers: list[str], labels: list[str]) -> dict:
    """Metrics of one category from raw answer texts and label strings (positional)."""
    preds = [parse_yes_no(a) for a in answers]
    labs = [0 if lab == "no" else 1 for lab in labels]
    pred_bits = [0 if p == "no" else 1 for p in preds]
    tp = tn = fp = fn = 0
    for p, lab in zip(pred_bits, labs):
        if p == 1 and lab == 1:
            tp += 1
        elif p == 1 and lab == 0:
            fp += 1
        elif p == 0 and lab == 0:
            tn += 1
        else:
            fn += 1
    precision = frac(tp, tp + fp)
    recall = frac(tp, tp + fn)
    f1 = None
    if precision is not None and recall is not None and precision + recall > 0:
        f1 = 2 * precision * recall / (precision + recall)
    return {"accuracy": frac(tp + tn, tp + tn + fp + fn), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": frac(pred_bits.count(1), len(pred_bits)),
            "tp": tp, "fp": fp, "tn": tn, "fn": fn, "answers": len(answers), "labels": len(labels),
            "compared": min(len(answers), len(labels))}


def score(annotation_dir, question_file, result_file) -> dict:
    questions = {q["question_id"]: q for q in read_question_jsonl(question_file)}
    answers, _ = read_jsonl(result_file, strict=True, what="result file")
    ann_dir = Path(annotation_dir)
    if not ann_dir.is_dir():
        raise InputError(f"--annotation-dir {ann_dir} is not a folder (expected POPE's coco/ with coco_pope_*.json)")
    files = sorted(os.listdir(ann_dir))
    for f in files:
        if not (f.startswith("coco_pope_") and f.endswith(".json")):
            raise InputError(f"{ann_dir / f}: eval_pope.py requires every file of the annotation folder to be "
                             "coco_pope_<category>.json; move other files away")
    if not files:
        raise InputError(f"{ann_dir} has no coco_pope_<category>.json label files")
    for a in answers:
        if a.get("question_id") not in questions:
            raise InputError(f"{result_file}: answer question_id {a.get('question_id')!r} is not in the question "
                             "file (eval_pope.py aborts with KeyError)")
    seen = {}
    for a in answers:
        seen[a["question_id"]] = seen.get(a["question_id"], 0) + 1
    duplicates = sum(n - 1 for n in seen.values())
    cats = {}
    missing_total = misaligned_total = 0
    for f in files:
        category = f[len("coco_pope_"):-len(".json")]
        label_rows, _ = read_jsonl(ann_dir / f, strict=True, what="POPE label file")
        cur = [a for a in answers if questions[a["question_id"]].get("category") == category]
        m = category_metrics([a.get("text", "") for a in cur], [r.get("label") for r in label_rows])
        # diagnostics the official script does not compute: answers whose question does not show the image and
        # question of the label at the same position
        misaligned = 0
        for a, lab in zip(cur, label_rows):
            q = questions[a["question_id"]]
            q_text = q.get("text", "").split("\n")[0]
            if q.get("image") != lab.get("image") or (lab.get("text") is not None and q_text != lab.get("text")):
                misaligned += 1
        m["misaligned"] = misaligned
        m["missing"] = max(0, len(label_rows) - len(cur))
        missing_total += m["missing"]
        misaligned_total += misaligned
        cats[category] = m
    f1s = [cats[c]["f1"] for c in CATEGORIES if c in cats]
    mean_f1 = None
    if len(f1s) == len(CATEGORIES) and all(v is not None for v in f1s):
        mean_f1 = sum(f1s) / len(f1s)
    counts = {"results": len(answers), "missing": missing_total, "unparsable": 0, "failed": 0,
              "duplicates": duplicates, "unknown_ids": 0, "misaligned": misaligned_total,
              "uncategorised": sum(1 for a in answers
                                   if questions[a["question_id"]].get("category") not in cats)}
    return {"benchmark": NAME, "categories": cats, "mean_f1": mean_f1, "counts": counts, "handling": HANDLING,
            "scale": "fractions 0..1"}


def format_text(res: dict) -> str:
    lines = []
    for cat, m in res["categories"].items():
        def f(v):
            return "nan" if v is None else f"{v:.3f}"
        lines.append(f"Category: {cat}, # samples: {m['answers']}")
        lines.append(f"TP\tFP\tTN\tFN\t\n{m['tp']}\t{m['fp']}\t{m['tn']}\t{m['fn']}")
        lines.append(f"Accuracy: {f(m['accuracy'])}\nPrecision: {f(m['precision'])}\nRecall: {f(m['recall'])}\n"
                     f"F1 score: {f(m['f1'])}\nYes ratio: {f(m['yes_ratio'])}")
        lines.append(f"{f(m['f1'])}, {f(m['accuracy'])}, {f(m['precision'])}, {f(m['recall'])}, "
                     f"{f(m['yes_ratio'])}")
        lines.append("====================================")
    mf = res["mean_f1"]
    lines.append(f"mean F1 (adversarial, popular, random): {'n/a' if mf is None else f'{mf:.4f}'}")
    return "\n".join(lines)

