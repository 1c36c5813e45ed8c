"""ScienceQA-IMG (eval-protocol.md 3.6): single-pred prompt, strict letter parsing, IMG denominator by prompt."""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..engine.benchmark import ChoiceQuestion
from ..errors import InputError
from .answers import read_json, read_jsonl, write_json_atomic
from .common import IMAGE_TOKEN, MC_INSTRUCTION, Item, pct, split_option_lines

NAME = "scienceqa"
MAX_NEW_TOKENS = 1024
OPTIONS = ("A", "B", "C", "D", "E")
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
HANDLING = {
    "missing": "a split problem without a prediction counts as FAILED (wrong) with prompt 'Unknown', so it stays "
               "in the accuracy denominator but leaves the IMG denominator (IMG is decided by '<image>' in the "
               "prompt), as eval_science_qa.py does",
    "failed": "texts that are not a lone option letter, not '<letter>. ...' and without exactly one "
              "'The answer is X.' match are FAILED (wrong); so is a letter beyond the problem's choices",
    "duplicates": "the last line of a question_id wins (dict by question_id)",
    "unknown_ids": "predictions whose id is not in the split are ignored",
    "unparsable": "the official script aborts on an unparsable line; so does this one",
}


def choice_from_human(human: str) -> ChoiceQuestion | None:
    """The parts of a llava_test_CQM-A.json human turn (``[Context: hint\\n]question\\nA. c\\nB. c ...``): the
    question is the line before the options, the hint whatever precedes it (``Context: `` removed)."""
    head, options = split_option_lines(human.replace(IMAGE_TOKEN, "").strip())
    if not options or not head:
        return None
    hint = "\n".join(head[:-1])
    if hint.startswith("Context: "):
        hint = hint[len("Context: "):]
    return ChoiceQuestion(head[-1], tuple(options), hint or None)


def _items_from_entries(entries: list, image_folder, source, choices=None) -> list[list[Item]]:
    """model_vqa_science --single-pred-prompt: drop ``<image>`` and strip, re-add ``<image>\\n`` in front for
    image problems, append the multiple-choice instruction. Prompt field and user message are the same text.
    ``choices``: each entry's question parts (else read back from its human turn)."""
    out = []
    for n, line in enumerate(entries):
        try:
            qid, human = line["id"], line["conversations"][0]["value"]
        except (KeyError, IndexError, TypeError):
            raise InputError(f"{source}: entry {n} lacks id / conversations[0].value") from None
        qs = human.replace(IMAGE_TOKEN, "").strip()
        image = None
        if "image" in line:
            image = os.path.join(image_folder, line["image"]) if image_folder else line["image"]
            qs = IMAGE_TOKEN + "\n" + qs
        qs = qs + "\n" + MC_INSTRUCTION
        choice = choices[n] if choices is not None else choice_from_human(human)
        out.append([Item(qid, qs, qs, image, choice=choice)])
    return out


def _items_from_question_file(question_file, image_folder) -> list[list[Item]]:
    data = read_json(question_file, what="ScienceQA question file")
    if not isinstance(data, list):
        raise InputError(f"{question_file}: expected a JSON list like llava_test_CQM-A.json")
    return _items_from_entries(data, image_folder, question_file)


def human_text(problem: dict, with_image: bool) -> str:
    """The human turn of llava_test_CQM-A.json built from a problems.json entry: ``<image>\\n`` (image problems),
    ``Context: <hint>\\n`` (non-empty hint), the question, then one ``X. choice`` line per choice."""
    lines = []
    if problem.get("hint"):
        lines.append(f"Context: {problem['hint']}")
    lines.append(problem["question"])
    lines.extend(f"{OPTIONS[i]}. {c}" for i, c in enumerate(problem["choices"]))
    return (IMAGE_TOKEN + "\n" if with_image else "") + "\n".join(lines)


def _items_from_base_dir(base_dir, split, image_folder) -> list[list[Item]]:
    base = Path(base_dir)
    problems = read_json(base / "problems.json", what="ScienceQA problems.json")
    splits = read_json(base / "pid_splits.json", what="ScienceQA pid_splits.json")
    if split not in splits:
        raise InputError(f"split {split!r} not in pid_splits.json (has {sorted(splits)})")
    entries, choices = [], []
    for pid in splits[split]:
        p = problems[pid]
        choices.append(ChoiceQuestion(p["question"], tuple(p["choices"]), p.get("hint") or None))
        entry = {"id": pid, "conversations": [{"from": "human", "value": human_text(p, bool(p.get("image")))},
                                              {"from": "gpt", "value": OPTIONS[p["answer"]]}]}
        if p.get("image"):
            entry["image"] = f"{pid}/{p['image']}"
        entries.append(entry)
    return _items_from_entries(entries, image_folder, base / "problems.json", choices)


def load_items(question_file=None, image_folder=None, base_dir=None, split="test") -> list[list[Item]]:
    if question_file:
        return _items_from_question_file(question_file, image_folder)
    if base_dir:
        return _items_from_base_dir(base_dir, split, image_folder)
    raise InputError("scienceqa needs --question-file (llava_test_CQM-A.json) or --base-dir (problems.json + "
                     "pid_splits.json)")


def parse_letter(text: str) -> str:
    """eval_science_qa.py's parser: the option letter or 'FAILED'."""
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    if len(found) == 1:
        return found[0]
    return "FAILED"


def letter_to_index(letter: str, n_choices: int) -> int:
    return OPTIONS.index(letter) if letter in OPTIONS[:n_choices] else -1


def _category_scores(problems: dict, pids: list[str], results: dict[str, int]) -> dict:
    """tools/evaluate_acc.py's breakdown over the scored problems (percentages; null for an empty group)."""
    def acc(pred) -> float | None:
        group = [pid for pid in pids if pred(problems[pid])]
        return pct(sum(1 for pid in group if results[pid] == problems[pid]["answer"]), len(group))

    g16 = {f"grade{i}" for i in range(1, 7)}
    g712 = {f"grade{i}" for i in range(7, 13)}
    return {
        "NAT": acc(lambda p: p.get("subject") == "natural science"),
        "SOC": acc(lambda p: p.get("subject") == "social science"),
        "LAN": acc(lambda p: p.get("subject") == "language science"),
        "TXT": acc(lambda p: bool(p.get("hint"))),
        "IMG": acc(lambda p: bool(p.get("image"))),
        "NO": acc(lambda p: not p.get("hint") and not p.get("image")),
        "G1-6": acc(lambda p: p.get("grade") in g16),
        "G7-12": acc(lambda p: p.get("grade") in g712),
        "Avg": acc(lambda p: True),
    }


def score(base_dir, result_file, split="test", output_file=None, output_result=None) -> dict:
    base = Path(base_dir)
    splits = read_json(base / "pid_splits.json", what="ScienceQA pid_splits.json")
    problems = read_json(base / "problems.json", what="ScienceQA problems.json")
    if split not in splits:
        raise InputError(f"split {split!r} not in pid_splits.json (has {sorted(splits)})")
    preds_list, _ = read_jsonl(result_file, strict=True, what="result file")
    preds = {str(p.get("question_id")): p for p in preds_list}
    split_ids = [str(i) for i in splits[split]]
    split_set = set(split_ids)
    analysis = {"correct": [], "incorrect": []}
    results, outputs = {}, {}
    missing = failed = 0
    for pid in split_ids:
        prob = problems[pid]
        if pid in preds:
            pred = preds[pid]
            text = pred.get("text", "")
        else:
            missing += 1
            pred = {"text": "FAILED", "prompt": "Unknown"}
            text = "FAILED"
        letter = parse_letter(text)
        idx = letter_to_index(letter, len(prob["choices"]))
        if idx == -1:
            failed += 1
        entry = {"question_id": pid, "parsed_ans": letter, "ground_truth": OPTIONS[prob["answer"]],
                 "question": pred.get("prompt", ""), "pred": text,
                 "is_multimodal": IMAGE_TOKEN in pred.get("prompt", "")}
        results[pid] = idx
        outputs[pid] = text
        analysis["correct" if idx == prob["answer"] else "incorrect"].append(entry)
    correct, total = len(analysis["correct"]), len(analysis["correct"]) + len(analysis["incorrect"])
    mm_correct = sum(1 for x in analysis["correct"] if x["is_multimodal"])
    mm_total = mm_correct + sum(1 for x in analysis["incorrect"] if x["is_multimodal"])
    accuracy = pct(correct, total)
    if output_file:
        write_json_atomic(output_file, analysis, indent=2)
    if output_result:
        write_json_atomic(output_result, {"acc": accuracy, "correct": correct, "count": total, "results": results,
                                          "outputs": outputs}, indent=2)
    pred_ids = [str(p.get("question_id")) for p in preds_list]
    counts = {"results": len(preds_list), "missing": missing, "unparsable": 0,
              "failed": failed - missing, "duplicates": len(pred_ids) - len(set(pred_ids)),
              "unknown_ids": sum(1 for i in set(pred_ids) if i not in split_set),
              "scored": total, "img_scored": mm_total}
    return {"benchmark": NAME, "split": split, "accuracy": accuracy, "img_accuracy": pct(mm_correct, mm_total),
            "correct": correct, "count": total, "img_correct": mm_correct, "img_count": mm_total,
            "categories": _category_scores(problems, split_ids, results), "counts": counts, "handling": HANDLING,
            "scale": "percent"}


def format_text(res: dict) -> str:
    def f(v):
        return "nan" if v is None else f"{v:.2f}"
    return (f"Total: {res['count']}, Correct: {res['correct']}, Accuracy: {f(res['accuracy'])}%, "
            f"IMG-Accuracy: {f(res['img_accuracy'])}%")
