"""End to end on a tiny synthesized checkpoint: eval run + eval score for POPE and ScienceQA, then report.
Random weights: the scores mean nothing, only the plumbing is checked."""
import json

import pytest
from PIL import Image

from gracevlm.eval import cli
from gracevlm.eval.answers import read_jsonl
from gracevlm.eval.common import MC_INSTRUCTION, SHORT_ANSWER


@pytest.fixture(scope="module")
def tiny(tiny_awq):
    return tiny_awq


@pytest.mark.slow
def test_pope_and_scienceqa_end_to_end(tiny, tmp_path):
    # -- POPE fixture: 2 categories x 2 questions
    imgs = tmp_path / "val2014"
    imgs.mkdir()
    Image.new("RGB", (40, 30), (250, 200, 10)).save(imgs / "a.jpg")
    Image.new("RGB", (30, 30), (5, 20, 210)).save(imgs / "b.jpg")
    ann = tmp_path / "coco"
    ann.mkdir()
    questions = []
    for cat, start in (("adversarial", 1), ("random", 10000001)):
        rows = []
        for i, (img, lab) in enumerate((("a.jpg", "yes"), ("b.jpg", "no"))):
            rows.append({"question_id": i + 1, "image": img, "text": f"Is there a {cat} {i}?", "label": lab})
            questions.append({"question_id": start + i, "image": img, "text": f"Is there a {cat} {i}?\n{SHORT_ANSWER}",
                              "category": cat})
        (ann / f"coco_pope_{cat}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    qf = tmp_path / "llava_pope_test.jsonl"
    qf.write_text("".join(json.dumps(q) + "\n" for q in questions))
    run_dir = tmp_path / "runs" / "tiny"
    answers = run_dir / "pope.jsonl"
    rc = cli.main(["run", "pope", "--model", str(tiny), "--device", "cpu", "--question-file", str(qf),
                   "--image-folder", str(imgs), "--answers-file", str(answers), "--max-new-tokens", "3",
                   "--no-progress"])
    assert rc == 0
    recs, _ = read_jsonl(answers)
    assert [r["question_id"] for r in recs] == [1, 2, 10000001, 10000002]
    assert recs[0]["prompt"] == questions[0]["text"] and recs[0]["model_id"] == tiny.name
    manifest = json.loads((run_dir / "pope.manifest.json").read_text())
    assert manifest["conv_mode"] == "vicuna_v1" and manifest["decoding"]["max_new_tokens"] == 3
    rc = cli.main(["score", "pope", "--annotation-dir", str(ann), "--question-file", str(qf), "--result-file",
                   str(answers), "--json"])
    assert rc == 0
    pope_score = json.loads((run_dir / "pope.pope.score.json").read_text())
    assert set(pope_score["categories"]) == {"adversarial", "random"}
    assert pope_score["counts"]["results"] == 4

    # -- ScienceQA fixture: one image problem, one text-only problem
    base = tmp_path / "scienceqa"
    (base / "images" / "test" / "11").mkdir(parents=True)
    Image.new("RGB", (20, 20), (0, 200, 0)).save(base / "images" / "test" / "11" / "image.png")
    problems = {"11": {"question": "Which color?", "choices": ["green", "red"], "answer": 0, "hint": "",
                       "image": "image.png", "subject": "natural science", "grade": "grade2", "split": "test"},
                "12": {"question": "Which word?", "choices": ["a", "b", "c"], "answer": 2, "hint": "Read it.",
                       "image": None, "subject": "language science", "grade": "grade8", "split": "test"}}
    (base / "problems.json").write_text(json.dumps(problems))
    (base / "pid_splits.json").write_text(json.dumps({"test": ["11", "12"]}))
    sqa_q = tmp_path / "llava_test_CQM-A.json"
    sqa_q.write_text(json.dumps([
        {"id": "11", "image": "11/image.png", "conversations": [
            {"from": "human", "value": "<image>\nWhich color?\nA. green\nB. red"}, {"from": "gpt", "value": "A"}]},
        {"id": "12", "conversations": [
            {"from": "human", "value": "Context: Read it.\nWhich word?\nA. a\nB. b\nC. c"},
            {"from": "gpt", "value": "C"}]}]))
    sqa_answers = run_dir / "sqa.jsonl"
    rc = cli.main(["run", "scienceqa", "--model", str(tiny), "--device", "cpu", "--question-file", str(sqa_q),
                   "--image-folder", str(base / "images" / "test"), "--answers-file", str(sqa_answers),
                   "--max-new-tokens", "3", "--single-pred-prompt", "--no-progress"])
    assert rc == 0
    recs, _ = read_jsonl(sqa_answers)
    assert recs[0]["prompt"] == f"<image>\nWhich color?\nA. green\nB. red\n{MC_INSTRUCTION}"
    assert recs[1]["prompt"] == f"Context: Read it.\nWhich word?\nA. a\nB. b\nC. c\n{MC_INSTRUCTION}"
    rc = cli.main(["score", "scienceqa", "--base-dir", str(base), "--result-file", str(sqa_answers)])
    assert rc == 0
    sqa_score = json.loads((run_dir / "sqa.scienceqa.score.json").read_text())
    assert sqa_score["count"] == 2 and sqa_score["img_count"] == 1
    assert sqa_score["run"]["model"] == str(tiny)

    # -- report over the run folder
    out = tmp_path / "report"
    rc = cli.main(["report", str(tmp_path / "runs"), "--out", str(out)])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["runs"][0]["metrics"]) == {"SQA-IMG"} | ({"POPE (mean F1 %)"} if pope_score["mean_f1"] is not None
                                                            else set())
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "LLaVA-1.5-7B" in (out / "report.md").read_text()


def test_report_compares_runs_with_reference(tmp_path):
    for run, (f1, mme_p) in {"a": (0.8, 1400.0), "b": (0.86, 1500.5)}.items():
        d = tmp_path / run / "pope"
        d.mkdir(parents=True)
        (d / "merge.pope.score.json").write_text(json.dumps({"benchmark": "pope", "mean_f1": f1, "counts": {}}))
        (tmp_path / run / "merge.mme.score.json").write_text(
            json.dumps({"benchmark": "mme", "perception": mme_p, "complete": False}))
    out = tmp_path / "rep"
    rc = cli.main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--label", "base", "--label", "grace",
                   "--out", str(out)])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert [r["label"] for r in rep["runs"]] == ["base", "grace"]
    assert rep["runs"][1]["metrics"]["POPE (mean F1 %)"]["value"] == pytest.approx(86.0)
    assert rep["reference"]["MME-P"]["llava-1.5-7b"] == 1510.7
    md = (out / "report.md").read_text()
    assert "| POPE (mean F1 %) | 80.00 | 86.00 | 85.9 |" in md
    assert "| MME-P | 1400.00 (partial) | 1500.50 (partial) | 1510.7 |" in md
    assert (out / "report.png").stat().st_size > 1000
