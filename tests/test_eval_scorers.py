"""Every scorer on small hand-made fixtures in the distributed formats; expected values worked out by hand from
the official rules (arithmetic in the comments)."""
import base64
import io
import json

import pytest
from PIL import Image

from gracevlm.errors import InputError
from gracevlm.eval import gqa, mmbench, mme, pope, scienceqa, seed, textvqa, vqav2
from gracevlm.eval.common import MC_INSTRUCTION, SHORT_ANSWER

SUFFIX = "\n" + SHORT_ANSWER


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def ans(qid, text, prompt=""):
    return {"question_id": qid, "prompt": prompt, "text": text, "answer_id": "x", "model_id": "m", "metadata": {}}


# -- POPE -----------------------------------------------------------------------------------------------------
def _pope_fixture(tmp_path, answers):
    cats = {"adversarial": (1, ["yes", "no", "yes", "no"]), "random": (10000001, ["yes", "yes", "no"]),
            "popular": (20000001, ["no", "yes"])}
    ann = tmp_path / "coco"
    ann.mkdir()
    questions = []
    for cat, (start, labels) in cats.items():
        rows = []
        for i, lab in enumerate(labels):
            img = f"COCO_val2014_{cat}_{i}.jpg"
            text = f"Is there a thing {i} in the image?"
            rows.append({"question_id": i + 1, "image": img, "text": text, "label": lab})
            questions.append({"question_id": start + i, "image": img, "text": text + SUFFIX, "category": cat})
        jsonl(ann / f"coco_pope_{cat}.json", rows)
    qf = jsonl(tmp_path / "llava_pope_test.jsonl", questions)
    rf = jsonl(tmp_path / "answers.jsonl", [ans(q, t) for q, t in answers])
    return ann, qf, rf


def test_pope_parse_rules():
    assert pope.parse_yes_no("Yes, there is.") == "yes"
    assert pope.parse_yes_no("No.") == "no"
    assert pope.parse_yes_no("not sure") == "no"
    assert pope.parse_yes_no("There is no dog. yes") == "no"     # first sentence only
    assert pope.parse_yes_no("Yes. There is no dog.") == "yes"
    assert pope.parse_yes_no("no,") == "no"                       # commas deleted before the split
    for text in ("NO", "Not", "none", "Nope", "", "no\nthing"):
        assert pope.parse_yes_no(text) == "yes", text


def test_pope_scores_positional(tmp_path):
    answers = [(1, "Yes, there is."), (2, "No."), (3, "not sure"), (4, "NO"),
               (10000001, "yes"), (10000002, "There is no dog. yes"), (10000003, ""),
               # popular in swapped order: positional zip pairs 20000002's "No" with label 0 ("no")
               (20000002, "No"), (20000001, "yes")]
    res = pope.score(*_pope_fixture(tmp_path, answers))
    adv = res["categories"]["adversarial"]
    # preds yes,no,no,yes vs labels yes,no,yes,no: TP1 TN1 FN1 FP1 -> acc 2/4, P 1/2, R 1/2, F1 .5, yes 2/4
    assert (adv["tp"], adv["tn"], adv["fn"], adv["fp"]) == (1, 1, 1, 1)
    assert adv["accuracy"] == 0.5 and adv["precision"] == 0.5 and adv["recall"] == 0.5 and adv["f1"] == 0.5
    assert adv["yes_ratio"] == 0.5
    rnd = res["categories"]["random"]
    # preds yes,no,yes vs labels yes,yes,no: TP1 FN1 FP1 TN0 -> acc 1/3, P 1/2, R 1/2, F1 .5, yes 2/3
    assert rnd["accuracy"] == pytest.approx(1 / 3) and rnd["f1"] == 0.5 and rnd["yes_ratio"] == pytest.approx(2 / 3)
    pop = res["categories"]["popular"]
    # positional: (no vs no) TN, (yes vs yes) TP -> everything 1.0 although both answers are wrong by id
    assert pop["accuracy"] == 1.0 and pop["f1"] == 1.0 and pop["yes_ratio"] == 0.5
    assert pop["misaligned"] == 2
    # mean F1 = (0.5 + 0.5 + 1.0) / 3
    assert res["mean_f1"] == pytest.approx(2 / 3)
    assert res["counts"]["misaligned"] == 2 and res["counts"]["missing"] == 0


def test_pope_missing_answers_and_undefined_metrics(tmp_path):
    # popular: only one answer ("No") -> zip keeps 1 pair (no vs no) -> TN1; P and R have 0 denominators -> null
    answers = [(1, "yes"), (2, "no"), (3, "yes"), (4, "no"), (10000001, "yes"), (10000002, "yes"),
               (10000003, "no"), (20000002, "No")]
    res = pope.score(*_pope_fixture(tmp_path, answers))
    pop = res["categories"]["popular"]
    assert pop["accuracy"] == 1.0 and pop["precision"] is None and pop["f1"] is None and pop["missing"] == 1
    assert res["mean_f1"] is None
    assert res["categories"]["adversarial"]["f1"] == 1.0


def test_pope_unknown_id_aborts(tmp_path):
    with pytest.raises(InputError, match="not in the question"):
        pope.score(*_pope_fixture(tmp_path, [(1, "yes"), (999, "no")]))


# -- MME ------------------------------------------------------------------------------------------------------
MME_ANSWERS = {  # task -> (answer to Q1 [GT Yes], answer to Q2 [GT No])
    "existence": ("Yes", "No"),           # 2 correct -> 100 + 100 = 200
    "count": ("yes", "yes"),              # 1 correct -> 50 + 0 = 50
    "position": ("Yesterday", "Nope"),    # "yest" has yes, "nope" has no -> 200
    "color": ("I think yes", "Not"),      # "i th" -> other (wrong); "not\n" has no -> 50 + 0 = 50
    "OCR": ("no", "no"),                  # 1 correct -> 50
    "code_reasoning": ("No", "Yes"),      # 0 -> 0
}


def _mme_fixture(tmp_path, skip=()):
    root = tmp_path / "MME_Benchmark_release_version"
    questions, answers = [], []
    for task in mme.PERCEPTION + mme.COGNITION:
        if task == "artwork":       # the images/ + questions_answers_YN/ layout, GT written with two spaces
            (root / task / "images").mkdir(parents=True)
            qa = root / task / "questions_answers_YN"
            qa.mkdir()
            sep, qid = "  ", f"{task}/images/0001.jpg"
        else:
            qa = root / task
            qa.mkdir(parents=True)
            sep, qid = " ", f"{task}/0001.png"
        q1, q2 = f"Is this {task} one?", f"Is this {task} two?"
        (qa / "0001.txt").write_text(f"{q1}{sep}Please answer yes or no.\tYes\n{q2}{sep}Please answer yes or no.\tNo\n")
        a1, a2 = MME_ANSWERS.get(task, ("Yes", "No"))
        for q, a in ((q1, a1), (q2, a2)):
            questions.append({"question_id": qid, "image": qid, "text": q + SUFFIX, "category": task})
            if task not in skip:
                answers.append(ans(qid, a, q + SUFFIX))
    qf = jsonl(tmp_path / "llava_mme.jsonl", questions)
    rf = jsonl(tmp_path / "mme_answers.jsonl", answers)
    return root, qf, rf


def test_mme_parse_rules():
    assert mme.parse_answer("yes") == "yes" and mme.parse_answer("no") == "no"
    assert mme.parse_answer("yes\n") == "yes" and mme.parse_answer("nope\n") == "no"
    assert mme.parse_answer("i don't know\n") == "other"
    assert mme.parse_answer("no, yes\n") == "no"        # only the first 4 characters "no, " are looked at
    assert mme.parse_answer("I say yes") == "other"      # "i sa"
    assert mme.parse_answer("the answer is yes") == "other"


def test_mme_scores(tmp_path):
    res = mme.score(*_mme_fixture(tmp_path))
    t = res["tasks"]
    assert t["existence"]["score"] == 200 and t["count"]["score"] == 50 and t["position"]["score"] == 200
    assert t["color"] == {"acc": 50.0, "acc_plus": 0.0, "score": 50.0, "questions": 2, "images": 1, "other": 1}
    assert t["OCR"]["score"] == 50 and t["artwork"]["score"] == 200   # artwork GT found via the two-space retry
    # perception = 200 (existence) + 50 + 200 + 50 + 200*5 (posters..artwork) + 50 (OCR) = 1550
    assert res["perception"] == 1550
    # cognition = 200 * 3 + 0 (code_reasoning)
    assert res["cognition"] == 600
    assert res["counts"]["failed"] == 1 and res["counts"]["missing"] == 0 and res["counts"]["in_question_order"]


def test_mme_incomplete_needs_partial(tmp_path):
    args = _mme_fixture(tmp_path, skip=("scene",))
    with pytest.raises(InputError, match="scene"):
        mme.score(*args)
    res = mme.score(*args, partial=True)
    assert res["perception"] == 1350 and res["complete"] is False
    assert res["counts"]["subtasks_left_out"] == ["scene"] and res["counts"]["missing"] == 2


def test_mme_pairing_is_by_line_position():
    def line(gt, a):
        return f"0001.txt\tq\t{gt}\t{a}\n"
    # image 1: both right; image 2: both wrong. In question order: acc 2/4, acc+ 1/2 -> 50 + 50 = 100
    ordered = line("Yes", "yes") + line("No", "no") + line("Yes", "no") + line("No", "yes")
    assert mme.task_metrics(ordered, "t")["score"] == 100
    # interleaved (img1 Q1, img2 Q1, img1 Q2, img2 Q2): no pair is fully right -> 50 + 0 = 50
    shuffled = line("Yes", "yes") + line("Yes", "no") + line("No", "no") + line("No", "yes")
    assert mme.task_metrics(shuffled, "t")["score"] == 50
    with pytest.raises(InputError, match="pairs"):
        mme.task_metrics(ordered + line("Yes", "yes"), "t")
    with pytest.raises(InputError, match="4 tab-separated"):   # an answer with a newline: 6 lines, one broken
        mme.task_metrics(ordered + line("Yes", "multi\nline"), "t")
    with pytest.raises(InputError, match="tab"):
        mme.task_metrics(line("Yes", "a\tb") + line("No", "no"), "t")


# -- ScienceQA ------------------------------------------------------------------------------------------------
def _sqa_fixture(tmp_path):
    problems = {}
    spec = {  # pid: (has image, answer index, n choices, prediction or None)
        "1": (True, 0, 3, "A"),                 # correct
        "2": (True, 1, 3, "B. dog"),            # correct ("B. " prefix)
        "3": (True, 0, 3, "A."),                # FAILED: "A." is not >= 3 chars with ". "
        "4": (True, 2, 3, "(C)"),               # FAILED
        "5": (False, 0, 2, "a"),                # FAILED: lower case
        "6": (False, 1, 2, "The answer is B."), # correct via the regex
        "7": (True, 0, 2, None),                # missing -> FAILED, prompt 'Unknown' (leaves the IMG denominator)
        "8": (False, 0, 2, "A"),                # val split: ignored
    }
    preds = []
    for pid, (img, answer, n, pred) in spec.items():
        problems[pid] = {"question": f"Question {pid}?", "choices": [f"c{i}" for i in range(n)], "answer": answer,
                         "hint": "A hint." if pid == "2" else "", "image": "image.png" if img else None,
                         "subject": "natural science" if int(pid) % 2 else "social science", "grade": "grade3",
                         "topic": "t", "split": "test" if pid != "8" else "val"}
        if pred is not None:
            prompt = ("<image>\n" if img else "") + f"Question {pid}?\nA. c0\nB. c1\n{MC_INSTRUCTION}"
            preds.append(ans(pid, pred, prompt))
    base = tmp_path / "scienceqa"
    base.mkdir()
    (base / "problems.json").write_text(json.dumps(problems))
    (base / "pid_splits.json").write_text(json.dumps({"test": [str(i) for i in range(1, 8)], "val": ["8"]}))
    return base, jsonl(tmp_path / "sqa.jsonl", preds)


def test_scienceqa_parser_failed_cases():
    for text, letter in [("A", "A"), ("B. cat", "B"), ("The answer is C.", "C"), ("The answer is Cx", "C"),
                         ("A.", "FAILED"), ("(A)", "FAILED"), ("a", "FAILED"), ("The answer is A", "FAILED"),
                         ("The answer is A\n", "FAILED"), ("The answer is A. The answer is B.", "FAILED"),
                         ("F", "FAILED"), ("E. x", "E")]:
        assert scienceqa.parse_letter(text) == letter, text
    assert scienceqa.letter_to_index("E", 3) == -1 and scienceqa.letter_to_index("B", 3) == 1
    assert scienceqa.letter_to_index("FAILED", 5) == -1


def test_scienceqa_scores_and_denominators(tmp_path):
    base, rf = _sqa_fixture(tmp_path)
    out_file, out_result = tmp_path / "analysis.json", tmp_path / "result.json"
    res = scienceqa.score(base, rf, "test", out_file, out_result)
    # correct: 1, 2, 6 of 7 test problems -> 3/7
    assert res["correct"] == 3 and res["count"] == 7
    assert res["accuracy"] == pytest.approx(300 / 7)
    # IMG by '<image>' in the prompt: 1, 2, 3, 4 (7 is missing -> prompt 'Unknown') -> 2/4
    assert res["img_count"] == 4 and res["img_accuracy"] == 50.0
    # official breakdown counts image problems from problems.json (7 included): 2/5
    assert res["categories"]["IMG"] == 40.0 and res["categories"]["Avg"] == pytest.approx(300 / 7)
    assert res["counts"]["missing"] == 1 and res["counts"]["failed"] == 3 and res["counts"]["unknown_ids"] == 1
    r = json.loads(out_result.read_text())
    assert r["results"]["3"] == -1 and r["results"]["6"] == 1 and r["outputs"]["7"] == "FAILED"
    a = json.loads(out_file.read_text())
    assert {x["question_id"] for x in a["correct"]} == {"1", "2", "6"}


def test_scienceqa_items_from_question_file_and_base_dir(tmp_path):
    qf = tmp_path / "llava_test_CQM-A.json"
    qf.write_text(json.dumps([
        {"id": "1", "image": "1/image.png", "conversations": [
            {"from": "human", "value": "<image>\nContext: A hint.\nWhat is it?\nA. x\nB. y"},
            {"from": "gpt", "value": "A"}]},
        {"id": "2", "conversations": [{"from": "human", "value": "Pick one.\nA. p\nB. q"},
                                      {"from": "gpt", "value": "B"}]}]))
    items = scienceqa.load_items(qf, "imgs")
    a, b = items[0][0], items[1][0]
    assert a.prompt == a.user_message == f"<image>\nContext: A hint.\nWhat is it?\nA. x\nB. y\n{MC_INSTRUCTION}"
    assert a.image == "imgs/1/image.png"
    assert b.prompt == f"Pick one.\nA. p\nB. q\n{MC_INSTRUCTION}" and b.image is None
    p = {"question": "What is it?", "choices": ["x", "y"], "hint": "A hint.", "image": "image.png"}
    assert scienceqa.human_text(p, True) == "<image>\nContext: A hint.\nWhat is it?\nA. x\nB. y"


# -- SEED -----------------------------------------------------------------------------------------------------
def _seed_fixture(tmp_path, answers):
    data = {"question_type": {"Scene Understanding": 1, "Instance Identity": 2, "Action Recognition": 10},
            "questions": [
                {"question_id": "101", "question_type_id": 1, "data_type": "image", "answer": "A"},
                {"question_id": "102", "question_type_id": 1, "data_type": "image", "answer": "B"},
                {"question_id": "103", "question_type_id": 2, "data_type": "image", "answer": "C"},
                {"question_id": "104", "question_type_id": 2, "data_type": "image", "answer": "A"},
                {"question_id": "v1", "question_type_id": 10, "data_type": "video", "answer": "D"}]}
    af = tmp_path / "SEED-Bench.json"
    af.write_text(json.dumps(data))
    return af, jsonl(tmp_path / "seed.jsonl", [ans(q, t) for q, t in answers])


def test_seed_exact_equality(tmp_path):
    af, rf = _seed_fixture(tmp_path, [(101, "A"), (102, "B."), (103, "c"), ("v1", "D"), (999, "A")])
    res = seed.score(af, rf)
    # correct: 101 and v1 of 5 -> 40%; image: 1 of 4 -> 25%; video 1/1
    assert res["accuracy"] == 40.0 and res["image_accuracy"] == 25.0 and res["video_accuracy"] == 100.0
    assert res["per_type"] == {"Scene Understanding": 50.0, "Instance Identity": 0.0, "Action Recognition": 100.0}
    assert res["counts"]["missing"] == 1 and res["counts"]["unknown_ids"] == 1
    with pytest.raises(InputError, match="1 of 5 are missing"):
        seed.submit(af, rf, tmp_path / "up" / "upload.jsonl")


def test_seed_upload_complete(tmp_path):
    af, rf = _seed_fixture(tmp_path, [(101, "A"), (102, "B"), (103, "C"), (104, "D"), ("v1", "D")])
    out = tmp_path / "up" / "upload.jsonl"
    seed.submit(af, rf, out)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines[0] == {"question_id": "101", "prediction": "A"} and len(lines) == 5


# -- TextVQA --------------------------------------------------------------------------------------------------
def test_textvqa_prompt_recovery():
    assert textvqa.recover_question("What brand?\nReference OCR token: a, b\n" + SHORT_ANSWER) == "what brand?"
    assert textvqa.recover_question("Reference OCR token: a\nWho made it?\n" + SHORT_ANSWER) == "who made it?"
    assert textvqa.recover_question("What number?\n" + SHORT_ANSWER) == "what number?"
    assert textvqa.recover_question("OCR tokens: x y Question: What Is It? Short answer:") == "what is it?"
    with pytest.raises(InputError):
        textvqa.recover_question("a\nb\nc\nd")
    with pytest.raises(InputError):
        textvqa.recover_question("single line")


def test_textvqa_scores_mean_over_lines(tmp_path):
    data = {"data": [
        {"image_id": "img1", "question": "What brand is this?",
         "answers": ["coca cola"] * 2 + ["Coca-Cola"] * 2 + ["pepsi"] * 6},
        {"image_id": "img2", "question": "What number is on the jersey?", "answers": ["10"] * 2 + ["ten"] + ["11"] * 7},
        {"image_id": "img3", "question": "Who made it?", "answers": ["acme"] + ["ACME corp"] * 9},
        {"image_id": "img4", "question": "Unanswered?", "answers": ["x"] * 10}]}
    af = tmp_path / "TextVQA_0.5.1_val.json"
    af.write_text(json.dumps(data))
    rf = jsonl(tmp_path / "t.jsonl", [
        ans("img1", "Coca-Cola", "What brand is this?\nReference OCR token: Coca, Cola\n" + SHORT_ANSWER),  # 4 -> 1.0
        ans("img2", "Ten", "What number is on the jersey?\n" + SHORT_ANSWER),     # "10" x3 -> 0.9
        ans("img3", "acme", "Reference OCR token: ACME\nWho made it?\n" + SHORT_ANSWER),  # 1 -> 0.3
        ans("img1", "pepsi", "OCR tokens: Coca Cola Question: What brand is this? Short answer:")])  # 6 -> 1.0
    res = textvqa.score(af, rf)
    # (1.0 + 0.9 + 0.3 + 1.0) / 4 lines = 0.8
    assert res["accuracy"] == pytest.approx(80.0) and res["samples"] == 4
    # img4 unanswered (not counted); img1 answered twice (both lines count)
    assert res["counts"]["missing"] == 1 and res["counts"]["duplicates"] == 1


# -- GQA ------------------------------------------------------------------------------------------------------
def _gqa_fixture(tmp_path, answers):
    qs = {"q1": {"answer": "yes", "isBalanced": True, "types": {"structural": "verify", "semantic": "attr"}},
          "q2": {"answer": "table", "isBalanced": True, "types": {"structural": "query", "semantic": "obj"}},
          "q3": {"answer": "left", "isBalanced": True, "types": {"structural": "choose", "semantic": "rel"}},
          "q4": {"answer": "no", "isBalanced": False, "types": {"structural": "verify", "semantic": "attr"}}}
    af = tmp_path / "testdev_balanced_questions.json"
    af.write_text(json.dumps(qs))
    return af, jsonl(tmp_path / "gqa.jsonl", [ans(q, t) for q, t in answers])


def test_gqa_exact_match(tmp_path):
    af, rf = _gqa_fixture(tmp_path, [("q1", "Yes."), ("q2", "Table.."), ("q3", "Left side")])
    res = gqa.score(af, rf)
    # "yes" == yes, "table" == table, "left side" != left -> 2/3 balanced; binary (q1, q3) 1/2; open (q2) 1/1
    assert res["accuracy"] == pytest.approx(200 / 3) and res["binary"] == 50.0 and res["open"] == 100.0
    out = tmp_path / "pred.json"
    gqa.submit(rf, out)
    assert json.loads(out.read_text())[1] == {"questionId": "q2", "prediction": "table"}


def test_gqa_missing_balanced_aborts_unless_partial(tmp_path):
    af, rf = _gqa_fixture(tmp_path, [("q1", "yes")])
    with pytest.raises(InputError, match="2 balanced"):
        gqa.score(af, rf)
    res = gqa.score(af, rf, partial=True)
    assert res["accuracy"] == pytest.approx(100 / 3) and res["counts"]["missing"] == 2


# -- VQAv2 ----------------------------------------------------------------------------------------------------
def _vqa_fixture(tmp_path):
    anns = {"annotations": [
        {"question_id": 1, "answer_type": "other", "question_type": "what", "answers": [
            {"answer": "t-shirt", "answer_id": i} for i in range(1, 11)]},
        {"question_id": 2, "answer_type": "number", "question_type": "how many", "answers": [
            {"answer": a, "answer_id": i + 1} for i, a in enumerate(["2"] * 3 + ["3"] * 7)]},
        {"question_id": 3, "answer_type": "yes/no", "question_type": "is", "answers": [
            {"answer": "yes", "answer_id": i} for i in range(1, 11)]},
        {"question_id": 4, "answer_type": "yes/no", "question_type": "is", "answers": [
            {"answer": "no", "answer_id": i} for i in range(1, 11)]}]}
    vq = {"questions": [{"question_id": i, "image_id": 0, "question": "?"} for i in range(1, 5)]}
    af, vf = tmp_path / "ann.json", tmp_path / "vq.json"
    af.write_text(json.dumps(anns))
    vf.write_text(json.dumps(vq))
    qf = jsonl(tmp_path / "q.jsonl", [{"question_id": i, "image": "x.jpg", "text": "?" + SUFFIX} for i in range(1, 5)])
    rf = tmp_path / "r.jsonl"
    rf.write_text(json.dumps(ans(1, "T-shirt")) + "\n" + "{broken\n" + json.dumps(ans(2, "Two")) + "\n" +
                  json.dumps(ans(3, "Yes")) + "\n" + json.dumps(ans(77, "extra")) + "\n")
    return qf, rf, af, vf


def test_vqav2_official_accuracy_on_llava_submission(tmp_path):
    qf, rf, af, vf = _vqa_fixture(tmp_path)
    res = vqav2.score(qf, rf, af, vf)
    # q1: "T-shirt" -> submitted "t shirt"; GT unanimous "t-shirt" compared raw -> 0
    # q2: "Two" -> "2"; GT non-unanimous, 3 x "2" -> 0.9
    # q3: "Yes" -> "yes" == unanimous "yes" -> 1.0 ; q4: no prediction -> "" -> 0
    # overall = (0 + 0.9 + 1 + 0) / 4 = 0.475 -> 47.5
    assert res["overall"] == 47.5
    assert res["per_answer_type"] == {"other": 0.0, "number": 90.0, "yes/no": 50.0}
    c = res["counts"]
    assert c["unparsable"] == 1 and c["missing"] == 1 and c["unknown_ids"] == 1 and c["results"] == 4


def test_vqav2_submission_covers_full_test_file(tmp_path):
    qf, rf, af, vf = _vqa_fixture(tmp_path)
    full = jsonl(tmp_path / "test2015.jsonl", [{"question_id": i, "image": "x", "text": "?"} for i in range(1, 6)])
    out = tmp_path / "answers_upload" / "m.json"
    vqav2.submit(rf, full, out)
    sub = json.loads(out.read_text())
    assert [s["question_id"] for s in sub] == [1, 2, 3, 4, 5]
    assert sub[0]["answer"] == "t shirt" and sub[1]["answer"] == "2" and sub[3]["answer"] == "" == sub[4]["answer"]


def test_vqav2_coverage_mismatch_needs_partial(tmp_path):
    qf, rf, af, vf = _vqa_fixture(tmp_path)
    small = jsonl(tmp_path / "q2.jsonl", [{"question_id": i, "image": "x", "text": "?"} for i in (2, 3)])
    with pytest.raises(InputError, match="do not correspond"):
        vqav2.score(small, rf, af, vf)
    res = vqav2.score(small, rf, af, vf, partial=True)
    assert res["overall"] == 95.0 and res["counts"]["annotated_not_scored"] == 2   # (0.9 + 1) / 2


# -- MMBench --------------------------------------------------------------------------------------------------
def _png_b64():
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 10, 10)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _mmb_tsv(tmp_path):
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
              "l2-category", "comment", "split"]
    img = _png_b64()
    rows = [
        [0, "What color?", "nan", "red", "blue", "green", "", "A", "attr", img, "s", "perception", "", "dev"],
        [1000000, "What color?", "nan", "blue", "green", "red", "", "C", "attr", img, "s", "perception", "", "dev"],
        [1, "Which animal?", "A zoo photo.", "cat", "dog", "", "", "B", "obj", img, "s", "perception", "", "dev"],
        [2, "Which?", "", "w", "x", "y", "z", "D", "obj", img, "s", "reasoning", "", "dev"]]
    path = tmp_path / "mmbench_dev_20230712.tsv"
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))
    return path


def test_mmbench_prompts_and_rounds(tmp_path):
    tsv = _mmb_tsv(tmp_path)
    items = mmbench.load_items(tsv)
    first = items[0][0]
    assert first.prompt == "What color?\nA. red\nB. blue\nC. green"          # hint "nan" skipped, D empty
    assert first.user_message == "<image>\n" + first.prompt + "\n" + MC_INSTRUCTION
    assert isinstance(first.image, bytes) and first.image.startswith(b"\x89PNG")
    assert items[2][0].prompt == "A zoo photo.\nWhich animal?\nA. cat\nB. dog"
    rec = first.record("A", "id", "m")
    assert list(rec) == ["question_id", "round_id", "prompt", "text", "options", "option_char", "answer_id",
                         "model_id", "metadata"]
    rounds = mmbench.load_items(tsv, all_rounds=True, lang="cn")[0]
    assert len(rounds) == 3
    assert rounds[1].prompt == "What color?\nA. blue\nB. green\nC. red"
    assert rounds[1].after_text == {"options": ["blue", "green", "red"], "option_char": ["B", "C", "A"]}
    assert rounds[1].user_message.endswith("\n请直接回答选项字母。")


def test_mmbench_matching():
    opts = ["red", "blue", "green"]
    assert mmbench.match_option("A", opts) == "A"
    for text in ("B.", "(B)", "B)", "B: blue", "The answer is (B)."):
        assert mmbench.match_option(text, opts) == "B", text
    assert mmbench.match_option("green", opts) == "C"
    assert mmbench.match_option("A or B", opts) is None
    assert mmbench.match_option("D", opts) is None          # not an option of this row
    assert mmbench.match_option("purple", opts) is None


def test_mmbench_circular_score_and_xlsx(tmp_path):
    tsv = _mmb_tsv(tmp_path)
    rf = jsonl(tmp_path / "mmb.jsonl", [
        {**ans(0, "A"), "round_id": 0},                                 # correct
        {**ans(1000000, "The answer is (C)."), "round_id": 0},           # C == answer C -> base 0 correct
        {**ans(1, "dog"), "round_id": 0}])                              # text match -> B correct; row 2 missing
    res = mmbench.score(tsv, rf)
    # bases 0 (both rows right), 1 (right), 2 (missing -> wrong): 2/3
    assert res["accuracy"] == pytest.approx(200 / 3)
    assert res["per_category"] == {"attr": 100.0, "obj": 50.0}
    assert res["counts"]["missing"] == 1
    # a wrong circular copy sinks the base question
    rf2 = jsonl(tmp_path / "mmb2.jsonl", [{**ans(0, "A"), "round_id": 0}, {**ans(1000000, "A"), "round_id": 0},
                                          {**ans(1, "B"), "round_id": 0}, {**ans(2, "D"), "round_id": 0}])
    assert mmbench.score(tsv, rf2)["accuracy"] == pytest.approx(200 / 3)
    # --all-rounds answers map the shown letter back through option_char: round 1 shows red as C
    rf3 = jsonl(tmp_path / "mmb3.jsonl", [
        {**ans(0, "A"), "round_id": 0, "options": ["red", "blue", "green"], "option_char": ["A", "B", "C"]},
        {**ans(0, "C"), "round_id": 1, "options": ["blue", "green", "red"], "option_char": ["B", "C", "A"]},
        {**ans(1000000, "C"), "round_id": 0}, {**ans(1, "B"), "round_id": 0}, {**ans(2, "D"), "round_id": 0}])
    assert mmbench.score(tsv, rf3)["accuracy"] == 100.0


def test_mmbench_submission_xlsx(tmp_path):
    openpyxl = pytest.importorskip("openpyxl")
    tsv = _mmb_tsv(tmp_path)
    rf = jsonl(tmp_path / "mmb.jsonl", [{**ans(0, "A"), "round_id": 0}, {**ans(1, "dog"), "round_id": 0}])
    out = tmp_path / "up" / "m.xlsx"
    mmbench.submit(tsv, rf, out)
    load_workbook = openpyxl.load_workbook

    ws = load_workbook(out).active
    rows = [[c.value for c in r] for r in ws.iter_rows()]
    assert rows[0] == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert rows[1] == [0, "What color?", "red", "blue", "green", None, "A", "A", "dev"]
    assert rows[4][6] is None        # no prediction for index 2
