"""VQAv2 (eval-protocol.md 3.1): LLaVA's normalised submission, scored by the official VQA accuracy rule."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from .answers import read_json, read_jsonl
from .common import loader_items, read_question_jsonl
from .normalize import evalai_normalize, vqa_official_accuracy

NAME = "vqav2"
MAX_NEW_TOKENS = 128
HANDLING = {
    "unparsable": "skipped and counted (convert_vqav2_for_submission.py counts them as error_line)",
    "missing": "questions of the question file without a result get the answer \"\" (scored like any answer)",
    "duplicates": "the last line of a question_id wins (dict by question_id)",
    "unknown_ids": "results whose id is not in the question file are dropped from the submission",
    "coverage": "the official evaluator requires the submission to cover exactly the annotated questions; a "
                "mismatch aborts unless --partial, which scores the annotated questions that are in the question "
                "file",
    "normalisation": "predictions are EvalAI-normalised for the submission; the evaluator then applies steps 3-5 "
                     "again to prediction and GT only for questions whose 10 GT answers are not unanimous",
}


def load_items(question_file, image_folder=None):
    return loader_items(question_file, image_folder)


def build_submission(result_file, question_file) -> tuple[list[dict], dict]:
    """convert_vqav2_for_submission.py: one ``{question_id, answer}`` per question of ``question_file``."""
    results, bad = read_jsonl(result_file, strict=False, what="result file")
    by_id = {}
    for r in results:
        by_id[r.get("question_id")] = r.get("text", "")
    questions = read_question_jsonl(question_file)
    qids = [q["question_id"] for q in questions]
    qset = set(qids)
    submission = []
    missing = 0
    for qid in qids:
        if qid in by_id:
            submission.append({"question_id": qid, "answer": evalai_normalize(by_id[qid])})
        else:
            missing += 1
            submission.append({"question_id": qid, "answer": ""})
    ids = [r.get("question_id") for r in results]
    counts = {"results": len(results), "missing": missing, "unparsable": bad, "failed": 0,
              "duplicates": len(ids) - len(set(map(json.dumps, ids))),
              "unknown_ids": sum(1 for i in by_id if i not in qset)}
    return submission, counts


def evaluate(submission: list[dict], annotations: dict, vqa_questions: dict | None, partial: bool = False) -> dict:
    """The official VQA evaluator on a submission (list of {question_id, answer})."""
    anns = {a["question_id"]: a for a in annotations["annotations"]}
    if vqa_questions is not None:
        q_ids = {q["question_id"] for q in vqa_questions["questions"]}
        if set(anns) - q_ids:
            raise InputError(f"{len(set(anns) - q_ids)} annotated questions are not in --vqa-question-file; use "
                             "the questions file of the same split")
    res = {}
    for r in submission:
        res[r["question_id"]] = r["answer"]
    not_annotated = [q for q in res if q not in anns]
    unanswered = [q for q in anns if q not in res]
    if (not_annotated or unanswered) and not partial:
        raise InputError(f"results do not correspond to the annotation set ({len(unanswered)} annotated questions "
                         f"without an answer, {len(not_annotated)} answers not annotated); the official evaluator "
                         "asserts here. Use the question file of the annotated split, or --partial")
    qids = [q for q in anns if q in res]
    accs, per_type, per_qtype = [], {}, {}
    for qid in qids:
        ann = anns[qid]
        acc = vqa_official_accuracy(res[qid], [a["answer"] for a in ann["answers"]])
        accs.append(acc)
        per_type.setdefault(ann.get("answer_type"), []).append(acc)
        per_qtype.setdefault(ann.get("question_type"), []).append(acc)

    def mean100(v):
        return None if not v else round(100 * float(sum(v)) / len(v), 2)

    return {"overall": mean100(accs), "per_answer_type": {str(k): mean100(v) for k, v in per_type.items()},
            "per_question_type": {str(k): mean100(v) for k, v in per_qtype.items()}, "scored": len(qids),
            "annotated_not_scored": len(unanswered), "answers_not_annotated": len(not_annotated)}


def score(question_file, result_file, annotation_file, vqa_question_file, partial: bool = False) -> dict:
    submission, counts = build_submission(result_file, question_file)
    annotations = read_json(annotation_file, what="VQA annotation file")
    vqa_questions = read_json(vqa_question_file, what="VQA question file") if vqa_question_file else None
    ev = evaluate(submission, annotations, vqa_questions, partial)
    counts["annotated_not_scored"] = ev.pop("annotated_not_scored")
    counts["answers_not_annotated"] = ev.pop("answers_not_annotated")
    return {"benchmark": NAME, **ev, "complete": counts["annotated_not_scored"] == 0, "counts": counts,
            "handling": HANDLING, "scale": "percent, rounded to 2 decimals as the official evaluator"}


def submit(result_file, question_file, output) -> dict:
    """The EvalAI test-dev upload: every question of the full test file (``llava_vqav2_mscoco_test2015.jsonl``)."""
    submission, counts = build_submission(result_file, question_file)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(submission), encoding="utf-8")
    return {"benchmark": NAME, "output": str(out), "written": len(submission), "counts": counts}


def format_text(res: dict) -> str:
    lines = [f"Overall Accuracy is: {res['overall']:.2f}" if res["overall"] is not None else "Overall: n/a",
             "Per Answer Type Accuracy is the following:"]
    lines += [f"{k} : {v:.2f}" for k, v in res["per_answer_type"].items()]
    return "\n".join(lines)
