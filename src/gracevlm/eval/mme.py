"""MME (eval-protocol.md 3.5): LLaVA's converter to the MME tool's per-subtask files, then the tool's scoring.

Both steps are reproduced through the same text format the official tools exchange (``file<TAB>question<TAB>
GT<TAB>answer`` lines, read back two at a time), so every quirk follows: answers with tabs or newlines break the
format, pairs are consecutive lines, the parsed answer keeps its trailing newline.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError
from .answers import read_jsonl
from .common import SHORT_ANSWER, loader_items, read_question_jsonl

NAME = "mme"
MAX_NEW_TOKENS = 128
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
YES_NO = " Please answer yes or no."
HANDLING = {
    "pairing": "lines of a subtask are taken two at a time in answer-file order as one image (calculation.py); "
               "answer order must follow the question file",
    "unparsable": "the official converter aborts on an unparsable line; so does this one",
    "unknown_ids": "an answer whose (subtask, file, question) is not in the benchmark's GT files aborts "
                   "(KeyError in convert_answer_to_mme.py)",
    "failed": "answers parsed as 'other' (no yes/no in the first 4 characters) count as wrong",
    "duplicates": "kept as lines (they shift the pairing, as in the official tools)",
    "missing": "official: a subtask without answers has no file and calculation.py aborts; an odd number of "
               "lines aborts too. With --partial such subtasks are left out and the totals cover the rest",
}


def load_items(question_file, image_folder=None):
    return loader_items(question_file, image_folder)


def read_gt(data_dir) -> dict[tuple[str, str, str], str]:
    """GT map (category, txt file name, question) -> 'Yes'/'No' from the MME release folder."""
    root = Path(data_dir)
    if not root.is_dir():
        raise InputError(f"--data-dir {root} is not a folder (expected MME_Benchmark_release_version)")
    gt: dict[tuple[str, str, str], str] = {}
    for category in sorted(os.listdir(root)):
        cdir = root / category
        if not cdir.is_dir():
            continue
        if (cdir / "images").exists():
            qa_dir = cdir / "questions_answers_YN"
        else:
            qa_dir = cdir
        if not qa_dir.is_dir():
            raise InputError(f"{qa_dir} is missing: a category with an images/ folder keeps its questions in "
                             "questions_answers_YN/")
        for name in sorted(os.listdir(qa_dir)):
            if not name.endswith(".txt"):
                continue
            with open(qa_dir / name, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    parts = line.strip().split("\t")
                    if len(parts) != 2:
                        raise InputError(f"{qa_dir / name}:{lineno}: expected 'question<TAB>answer' (the official "
                                         "converter aborts here)")
                    gt[(category, name, parts[0])] = parts[1]
    return gt


def converter_lines(answers: list[dict], gt: dict) -> dict[str, str]:
    """convert_answer_to_mme.py: subtask -> file content ``file\\tquestion\\tGT\\tanswer\\n`` lines in answer order."""
    per_cat: dict[str, list[str]] = {}
    for a in answers:
        qid = str(a["question_id"])
        category = qid.split("/")[0]
        fname = qid.split("/")[-1].split(".")[0] + ".txt"
        prompt = a["prompt"]
        if SHORT_ANSWER in prompt:
            prompt = prompt.replace(SHORT_ANSWER, "").strip()
        if "Please answer yes or no." not in prompt:
            prompt = prompt + YES_NO
            if (category, fname, prompt) not in gt:
                prompt = prompt.replace(YES_NO, " " + YES_NO)
        key = (category, fname, prompt)
        if key not in gt:
            raise InputError(f"MME answer {qid!r} with question {prompt!r} has no GT in the release folder "
                             "(convert_answer_to_mme.py aborts with KeyError); check --data-dir and the prompt")
        per_cat.setdefault(category, []).append("\t".join((fname, prompt, gt[key], a["text"])) + "\n")
    return {c: "".join(lines) for c, lines in per_cat.items()}


def parse_answer(pred: str) -> str:
    """calculation.py: exactly yes/no, else 'yes' within the first 4 characters, else 'no' there, else other."""
    if pred in ("yes", "no"):
        return pred
    head = pred[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def _readlines(content: str) -> list[str]:
    """What ``open(...).readlines()`` gives for a file holding ``content`` (universal newlines)."""
    text = content.replace("\r\n", "\n").replace("\r", "\n")
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def task_metrics(content: str, task: str) -> dict:
    """calculation.py on one subtask file's content."""
    lines = _readlines(content)
    if len(lines) % 2:
        raise InputError(f"MME subtask {task}: {len(lines)} lines, not pairs (an answer with a newline, a missing "
                         "or duplicated answer); calculation.py aborts on this")
    correct = plus = other = 0
    for i in range(0, len(lines), 2):
        img_correct = 0
        for line in lines[i:i + 2]:
            fields = line.split("\t")
            if len(fields) != 4:
                raise InputError(f"MME subtask {task}: line {line!r} does not split into 4 tab-separated fields "
                                 "(an answer with a tab or a newline); calculation.py aborts on this")
            gt, pred = fields[2].lower(), parse_answer(fields[3].lower())
            if gt not in ("yes", "no"):
                raise InputError(f"MME subtask {task}: GT {fields[2]!r} is not yes/no")
            if pred == "other":
                other += 1
            if gt == pred:
                correct += 1
                img_correct += 1
        if img_correct == 2:
            plus += 1
    n, images = len(lines), len(lines) // 2
    acc, acc_plus = correct / n, plus / images
    return {"acc": 100 * acc, "acc_plus": 100 * acc_plus, "score": 100 * acc + 100 * acc_plus,
            "questions": n, "images": images, "other": other}


def score(data_dir, question_file, result_file, partial: bool = False, tool_dir=None) -> dict:
    answers, _ = read_jsonl(result_file, strict=True, what="result file")
    gt = read_gt(data_dir)
    questions = read_question_jsonl(question_file)
    # diagnostics against the question file: keys are (question_id, prompt) because an image has two questions
    qkeys = [(str(q["question_id"]), q["text"]) for q in questions]
    akeys = [(str(a.get("question_id")), a.get("prompt")) for a in answers]
    qset = set(qkeys)
    seen: dict = {}
    for k in akeys:
        seen[k] = seen.get(k, 0) + 1
    files = converter_lines(answers, gt)
    if tool_dir:
        out = Path(tool_dir)
        out.mkdir(parents=True, exist_ok=True)
        for cat, content in files.items():
            (out / f"{cat}.txt").write_text(content, encoding="utf-8")
    tasks, totals, left_out = {}, {}, []
    failed = 0
    for group, names in (("perception", PERCEPTION), ("cognition", COGNITION)):
        total = 0.0
        for task in names:
            if task not in files:
                if not partial:
                    raise InputError(f"MME subtask {task} has no answers (calculation.py aborts: no {task}.txt); "
                                     "run the full question file or pass --partial")
                left_out.append(task)
                continue
            m = task_metrics(files[task], task)
            failed += m["other"]
            tasks[task] = m
            total += m["score"]
        totals[group] = total
    counts = {"results": len(answers), "missing": sum(1 for k in qset if k not in seen), "unparsable": 0,
              "failed": failed, "duplicates": sum(n - 1 for n in seen.values()),
              "unknown_ids": sum(1 for k in seen if k not in qset),
              "in_question_order": [k for k in qkeys if k in seen] == list(dict.fromkeys(akeys)),
              "subtasks_left_out": left_out, "other_categories": sorted(set(files) - set(PERCEPTION + COGNITION))}
    return {"benchmark": NAME, "perception": totals["perception"], "cognition": totals["cognition"],
            "tasks": tasks, "complete": not left_out, "counts": counts, "handling": HANDLING,
            "scale": "points: subtask score = acc% + acc+% (max 200); perception max 2000, cognition max 800"}


def format_text(res: dict) -> str:
    out = []
    for group, names in (("Perception", PERCEPTION), ("Cognition", COGNITION)):
        out.append(f"=========== {group} ===========")
        out.append(f"total score: {res[group.lower()]} \n")
        for t in names:
            if t in res["tasks"]:
                out.append(f"\t {t}  score: {res['tasks'][t]['score']}")
        out.append("")
    return "\n".join(out)
