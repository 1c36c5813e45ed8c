"""``gracevlm eval`` on a Qwen3-VL model: the family's prompt style (GRACE's evaluation scripts for MMBench, SEED and
ScienceQA: ``Question:/Options:/(A) ...`` text, image first, no system message, 8 new tokens, first option letter
of the answer), checked against transformers' Qwen3-VL processor for the exact text those scripts build; the
short-answer benchmarks keep their own text; LLaVA's prompts and answers unchanged. Random weights: the scores
mean nothing, only the plumbing and the prompts are checked."""
import base64
import csv
import io
import json

import pytest
from PIL import Image

from gracevlm.cli import main as gracevlm_main
from gracevlm.engine.benchmark import BenchmarkPrompts, BenchmarkQuestion, ChoiceQuestion, prompt_style
from gracevlm.engine.vlm import VLM
from gracevlm.errors import InputError
from gracevlm.eval import cli, scienceqa, seed
from gracevlm.eval.answers import read_jsonl
from gracevlm.eval.common import MC_INSTRUCTION, SHORT_ANSWER, split_option_lines
from gracevlm.eval.prompting import max_new_tokens, recorded_answer, styled_item
from gracevlm.models.qwen3_vl.benchmark_prompts import first_option_letter, grace_choice_text
from gracevlm.models.registry import get_family

ONLY_LETTER = "Answer with only the option letter."


# -- letter extraction and prompt text, hand-worked ---------------------------------------------------------
@pytest.mark.parametrize("answer,letters,expected", [
    ("B", "ABCD", "B"),
    ("B.", "ABCD", "B"),
    ("(B) cat", "ABCD", "B"),
    (" b) dog\n", "ABCD", "B"),          # upper-cased first
    ("The answer is B", "ABCD", "A"),    # GRACE takes the first option letter anywhere: the A of "ANSWER"
    ("The answer is B", "B", "B"),
    ("cat", "ABCD", "C"),                # no matching of option texts: the C of "CAT"
    ("cat", "AB", "A"),
    ("Option E", "ABCD", ""),            # no option letter among O, P, T, I, O, N, E
    ("", "AB", ""),
])
def test_first_option_letter_as_grace_parse_choice(answer, letters, expected):
    assert first_option_letter(answer, letters) == expected


def test_grace_choice_text():
    with_hint = ChoiceQuestion(" Which animal? ", ("cat", "dog"), " A photo of a pet. ")
    assert grace_choice_text(with_hint) == ("Context: A photo of a pet.\nQuestion: Which animal?\nOptions:\n"
                                            f"(A) cat\n(B) dog\n{ONLY_LETTER}")
    for hint in (None, "", "  ", "nan", "NaN"):
        q = ChoiceQuestion("What colour is it?", ("red", "blue", "green"), hint)
        assert grace_choice_text(q) == ("Question: What colour is it?\nOptions:\n(A) red\n(B) blue\n(C) green\n"
                                        f"{ONLY_LETTER}")


def test_option_lines_read_back_from_llava_text():
    text = f"What is in it?\nA. a cat\nB. a dog\nC. a car\nD. a cup\n{MC_INSTRUCTION}"
    assert split_option_lines(text, (MC_INSTRUCTION,)) == (["What is in it?"], ["a cat", "a dog", "a car", "a cup"])
    assert split_option_lines("Is it?\nB. x\nC. y") == (["Is it?", "B. x", "C. y"], [])  # must start at A
    assert split_option_lines("Is it red?") == (["Is it red?"], [])
    assert scienceqa.choice_from_human("<image>\nContext: Read it.\nSecond line.\nWhich word?\nA. a\nB. b") == \
        ChoiceQuestion("Which word?", ("a", "b"), "Read it.\nSecond line.")
    assert scienceqa.choice_from_human("Which color?\nA. green\nB. red") == \
        ChoiceQuestion("Which color?", ("green", "red"), None)


def test_styles_by_family_and_llava_unchanged():
    assert get_family("llava").benchmark_prompts().style == "llava-1.5"
    assert get_family("qwen3_vl").benchmark_prompts().style == "grace-qwen3-vl"
    llava = prompt_style("llava-1.5")
    q = BenchmarkQuestion("seed", "x?\nA. a\nB. b", True, ChoiceQuestion("x?", ("a", "b")))
    assert (llava.user_text(q), llava.max_new_tokens("seed"), llava.extract_answer(q, "B")) == (None, None, None)
    assert max_new_tokens("scienceqa", llava, None) == 1024 and max_new_tokens("seed", llava, None) == 128
    qwen = prompt_style("grace-qwen3-vl")
    assert max_new_tokens("mmbench", qwen, None) == 8 and max_new_tokens("pope", qwen, None) == 128
    assert max_new_tokens("mmbench", qwen, 3) == 3
    with pytest.raises(InputError, match="unknown prompt style"):
        prompt_style("vicuna")
    with pytest.raises(InputError, match="no options"):
        qwen.user_text(BenchmarkQuestion("seed", "What?", True, None))


def test_llava_items_and_answers_unchanged(tmp_path):
    """Under LLaVA's style every benchmark item is sent and recorded exactly as before (no raw_text field)."""
    qf = tmp_path / "seed.jsonl"
    qf.write_text(json.dumps({"question_id": 5, "image": "a.jpg", "text": f"What?\nA. x\nB. y\n{MC_INSTRUCTION}",
                              "category": "c"}) + "\n")
    (item,) = seed.load_items(qf, tmp_path)[0]
    llava = BenchmarkPrompts()
    assert styled_item("seed", item, llava) is item
    assert recorded_answer("seed", item, llava, "The answer is B") == ("The answer is B", None)
    rec = item.record("B", "id", "m")
    assert list(rec) == ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
    assert item.user_message == f"<image>\nWhat?\nA. x\nB. y\n{MC_INSTRUCTION}"


class ScriptedGen:
    """Answers in order from a list; records what it was sent (a stand-in for an endpoint serving Qwen3-VL)."""

    model_id = "scripted"
    conv_mode = None

    def __init__(self, answers):
        self.answers, self.sent = list(answers), []

    def __call__(self, item):
        self.sent.append(item.user_message)
        return self.answers.pop(0)


def test_named_style_run_manifest_and_resume(tmp_path):
    """``--prompt-style grace-qwen3-vl`` without a model (an endpoint run): GRACE's text sent, the letter
    recorded with the raw answer beside it, style and 8 new tokens in the manifest; a resume in another style
    is refused."""
    from gracevlm.eval.runner import RunConfig, run

    url = "http://127.0.0.1:9/v1"  # never contacted: the generator is given, then nothing is left to generate
    qf = tmp_path / "seed.jsonl"
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    qf.write_text("".join(json.dumps({"question_id": i, "image": "a.jpg", "category": "c",
                                      "text": f"Q{i}?\nA. x\nB. y\n{MC_INSTRUCTION}"}) + "\n" for i in range(3)))
    items = seed.load_items(qf, tmp_path)
    answers = tmp_path / "seed_answers.jsonl"
    cfg = RunConfig(benchmark="seed", answers_file=str(answers), question_file=str(qf), progress=False,
                    endpoint=url, prompt_style="grace-qwen3-vl", limit=2)
    gen = ScriptedGen(["(B) y", "I think so"])
    run(cfg, items, gen)
    assert gen.sent == [f"Question: Q{i}?\nOptions:\n(A) x\n(B) y\n{ONLY_LETTER}" for i in range(2)]
    recs, _ = read_jsonl(answers)
    assert [(r["text"], r["raw_text"]) for r in recs] == [("B", "(B) y"), ("", "I think so")]
    manifest = json.loads((tmp_path / "seed_answers.manifest.json").read_text())
    assert manifest["prompt_style"] == "grace-qwen3-vl" and manifest["decoding"]["max_new_tokens"] == 8
    with pytest.raises(InputError, match="prompt_style"):
        run(RunConfig(benchmark="seed", answers_file=str(answers), question_file=str(qf), progress=False,
                      endpoint=url, prompt_style="llava-1.5", max_new_tokens=8), items, ScriptedGen(["A"]))
    again = run(RunConfig(benchmark="seed", answers_file=str(answers), question_file=str(qf), progress=False,
                          endpoint=url, prompt_style="grace-qwen3-vl", limit=2), items)
    assert again["complete"] and again["generated"] == 0  # nothing left: no endpoint contacted


# -- end to end on a tiny Qwen3-VL folder -------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("qwen_eval") / "qwen3-vl-tiny"
    assert gracevlm_main(["synth", "--preset", "qwen3-vl-tiny", "--format", "bf16", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def reference(qwen_folder):
    """transformers' model (fp32) and processor of the folder, as GRACE's scripts load them."""
    import torch
    from qwen3_vl_helpers import reference_processor
    from transformers import Qwen3VLForConditionalGeneration

    proc = reference_processor(qwen_folder)
    proc.chat_template = (qwen_folder / "chat_template.jinja").read_text()
    hf = Qwen3VLForConditionalGeneration.from_pretrained(qwen_folder, dtype=torch.float32).eval()
    return hf, proc


@pytest.fixture
def calls(monkeypatch):
    """Every ``VLM.generate`` call of the run: (prompt, images, kwargs, result, vlm)."""
    seen = []
    real = VLM.generate

    def recording(self, prompt, images=None, **kwargs):
        res = real(self, prompt, images=images, **kwargs)
        seen.append((prompt, list(images or []), kwargs, res, self))
        return res

    monkeypatch.setattr(VLM, "generate", recording)
    return seen


def _png_bytes(colour, size=(50, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _check_ids(reference, call, expected_text, letters=None):
    """The ids the run used = the processor's apply_chat_template of GRACE's message (image part first, no system
    message) with the image as GRACE opens it (RGB), one pad per image in the engine's ids; the pixels = the
    processor's (smart_resize, no padding). With ``letters``: the recorded raw answer and letter = what GRACE's
    script gets from transformers' generate (greedy, 8 new tokens, decoded without special tokens, parse_choice)."""
    import torch

    hf, proc = reference
    prompt, images, kwargs, res, vlm = call
    assert prompt == expected_text and kwargs.get("system") is None and kwargs["temperature"] == 0.0
    pil = [Image.open(io.BytesIO(im) if isinstance(im, bytes) else im).convert("RGB") for im in images]
    content = [{"type": "image"}] * len(pil) + [{"type": "text", "text": expected_text}]
    text = proc.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                    add_generation_prompt=True)
    inputs = proc(text=[text], images=pil or None, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    collapsed = [t for i, t in enumerate(ids) if t != pad or i == 0 or ids[i - 1] != pad]
    assert res.prompt_token_ids == collapsed
    assert res.timings.prefill_tokens + res.timings.cached_tokens == len(ids)
    if pil:
        ours = vlm.runtime.preprocess(images)
        assert torch.equal(ours.grid_thw, inputs["image_grid_thw"])
        assert torch.allclose(ours.pixel_values, inputs["pixel_values"], atol=1e-6)
    if letters is None:
        return
    stops = vlm.tokenizer.stop_ids
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=stops[-1],
                          suppress_tokens=list(range(vlm.tokenizer.vocab_size, hf.config.text_config.vocab_size)))
    raw = proc.tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert res.text == raw.strip()
    return first_option_letter(raw, letters)


def _check_letters(records, letters):
    for rec, ls in zip(records, letters):
        assert rec["text"] == first_option_letter(rec["raw_text"], ls)


@pytest.mark.slow
def test_mmbench_and_seed_end_to_end(qwen_folder, reference, calls, tmp_path):
    # -- MMBench: a hint cell 'nan' (no Context line) and a hinted 2-option row
    tsv = tmp_path / "mmbench_dev.tsv"
    rows = [["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"],
            ["0", "What colour is it?", "nan", "red", "blue", "green", "nan", "A", "color", "attr",
             base64.b64encode(_png_bytes((200, 10, 10))).decode()],
            ["1", "Which animal?", "A photo of a pet. ", "cat", "dog", "", "", "B", "animal", "attr",
             base64.b64encode(_png_bytes((10, 200, 10), (33, 61))).decode()]]
    with open(tsv, "w", newline="") as fh:
        csv.writer(fh, delimiter="\t").writerows(rows)
    answers = tmp_path / "run" / "mmbench.jsonl"
    assert cli.main(["run", "mmbench", "--model", str(qwen_folder), "--question-file", str(tsv), "--answers-file",
                     str(answers), "--no-progress"]) == 0
    expected = [f"Question: What colour is it?\nOptions:\n(A) red\n(B) blue\n(C) green\n{ONLY_LETTER}",
                f"Context: A photo of a pet.\nQuestion: Which animal?\nOptions:\n(A) cat\n(B) dog\n{ONLY_LETTER}"]
    assert len(calls) == 2
    recs, _ = read_jsonl(answers)
    for call, text, rec, letters in zip(calls, expected, recs, ["ABC", "AB"]):
        assert _check_ids(reference, call, text, letters) == rec["text"]
        assert call[2]["max_new_tokens"] == 8
    assert [r["prompt"] for r in recs] == ["<image>\n" + t for t in expected]
    assert [r["option_char"] for r in recs] == [["A", "B", "C"], ["A", "B"]]
    assert [r["raw_text"] for r in recs] == [c[3].text.strip() for c in calls]
    _check_letters(recs, ["ABC", "AB"])
    manifest = json.loads((answers.parent / "mmbench.manifest.json").read_text())
    assert manifest["prompt_style"] == "grace-qwen3-vl" and manifest["decoding"]["max_new_tokens"] == 8
    assert cli.main(["score", "mmbench", "--question-file", str(tsv), "--result-file", str(answers)]) == 0
    score = json.loads((answers.parent / "mmbench.mmbench.score.json").read_text())
    right = sum(r["text"] == a for r, a in zip(recs, "AB"))
    assert score["accuracy"] == 100.0 * right / 2 and score["counts"]["results"] == 2

    # -- SEED: LLaVA's question file, read back into question + options
    calls.clear()
    imgs = tmp_path / "SEED-Bench-image"
    imgs.mkdir()
    Image.new("L", (45, 30), 90).save(imgs / "1.png")  # greyscale: converted to RGB as GRACE does
    qf = tmp_path / "llava-seed-bench.jsonl"
    qf.write_text(json.dumps({"question_id": 1, "image": "1.png", "category": "Scene Understanding",
                              "text": f"What is in it?\nA. a cat\nB. a dog\nC. a car\nD. a cup\n{MC_INSTRUCTION}"})
                  + "\n")
    ann = tmp_path / "SEED-Bench.json"
    ann.write_text(json.dumps({"question_type": {"Scene Understanding": 1}, "questions": [
        {"question_id": "1", "question_type_id": 1, "data_type": "image", "answer": "B"}]}))
    answers = tmp_path / "run" / "seed.jsonl"
    assert cli.main(["run", "seed", "--model", str(qwen_folder), "--question-file", str(qf), "--image-folder",
                     str(imgs), "--answers-file", str(answers), "--no-progress"]) == 0
    text = f"Question: What is in it?\nOptions:\n(A) a cat\n(B) a dog\n(C) a car\n(D) a cup\n{ONLY_LETTER}"
    recs, _ = read_jsonl(answers)
    assert _check_ids(reference, calls[0], text, "ABCD") == recs[0]["text"]
    _check_letters(recs, ["ABCD"])
    assert cli.main(["score", "seed", "--annotation-file", str(ann), "--result-file", str(answers)]) == 0
    score = json.loads((answers.parent / "seed.seed.score.json").read_text())
    assert score["accuracy"] == (100.0 if recs[0]["text"] == "B" else 0.0) and score["count"] == 1


@pytest.mark.slow
def test_scienceqa_and_pope_end_to_end(qwen_folder, reference, calls, tmp_path):
    # -- ScienceQA from problems.json: an image problem and a text-only one with a hint (sent without an image)
    base = tmp_path / "scienceqa"
    (base / "images" / "test" / "11").mkdir(parents=True)
    Image.new("RGBA", (20, 28), (0, 200, 0, 128)).save(base / "images" / "test" / "11" / "image.png")
    problems = {"11": {"question": "Which color?", "choices": ["green", "red"], "answer": 0, "hint": "",
                       "image": "image.png", "subject": "natural science", "grade": "grade2", "split": "test"},
                "12": {"question": "Which word?", "choices": ["a", "b", "c"], "answer": 2, "hint": "Read it.",
                       "image": None, "subject": "language science", "grade": "grade8", "split": "test"}}
    (base / "problems.json").write_text(json.dumps(problems))
    (base / "pid_splits.json").write_text(json.dumps({"test": ["11", "12"]}))
    answers = tmp_path / "run" / "sqa.jsonl"
    assert cli.main(["run", "scienceqa", "--model", str(qwen_folder), "--base-dir", str(base), "--image-folder",
                     str(base / "images" / "test"), "--answers-file", str(answers), "--no-progress"]) == 0
    expected = [f"Question: Which color?\nOptions:\n(A) green\n(B) red\n{ONLY_LETTER}",
                f"Context: Read it.\nQuestion: Which word?\nOptions:\n(A) a\n(B) b\n(C) c\n{ONLY_LETTER}"]
    assert len(calls[1][1]) == 0  # text-only problem: no image
    recs, _ = read_jsonl(answers)
    for call, text, rec, letters in zip(calls, expected, recs, ["AB", "ABC"]):
        assert _check_ids(reference, call, text, letters) == rec["text"]
    assert [r["prompt"] for r in recs] == ["<image>\n" + expected[0], expected[1]]
    _check_letters(recs, ["AB", "ABC"])
    assert cli.main(["score", "scienceqa", "--base-dir", str(base), "--result-file", str(answers)]) == 0
    score = json.loads((answers.parent / "sqa.scienceqa.score.json").read_text())
    assert score["count"] == 2 and score["img_count"] == 1
    assert score["correct"] == (recs[0]["text"] == "A") + (recs[1]["text"] == "C")

    # -- POPE (yes/no; GRACE has no Qwen3-VL protocol for it): the question file's text as it is, image first
    calls.clear()
    imgs = tmp_path / "val2014"
    imgs.mkdir()
    Image.new("RGB", (40, 30), (250, 200, 10)).save(imgs / "a.jpg")
    ann = tmp_path / "coco"
    ann.mkdir()
    questions, labels = [], []
    for i, lab in enumerate(("yes", "no")):
        labels.append({"question_id": i + 1, "image": "a.jpg", "text": f"Is there a cat {i}?", "label": lab})
        questions.append({"question_id": i + 1, "image": "a.jpg", "text": f"Is there a cat {i}?\n{SHORT_ANSWER}",
                          "category": "adversarial"})
    (ann / "coco_pope_adversarial.json").write_text("".join(json.dumps(r) + "\n" for r in labels))
    qf = tmp_path / "llava_pope_test.jsonl"
    qf.write_text("".join(json.dumps(q) + "\n" for q in questions))
    answers = tmp_path / "run" / "pope.jsonl"
    assert cli.main(["run", "pope", "--model", str(qwen_folder), "--question-file", str(qf), "--image-folder",
                     str(imgs), "--answers-file", str(answers), "--max-new-tokens", "4", "--no-progress"]) == 0
    for call, q in zip(calls, questions):
        _check_ids(reference, call, q["text"])
        assert call[2]["max_new_tokens"] == 4
    recs, _ = read_jsonl(answers)
    assert [r["prompt"] for r in recs] == [q["text"] for q in questions]
    assert all("raw_text" not in r for r in recs) and [r["text"] for r in recs] == [c[3].text.strip() for c in calls]
    assert cli.main(["score", "pope", "--annotation-dir", str(ann), "--question-file", str(qf), "--result-file",
                     str(answers)]) == 0
    score = json.loads((answers.parent / "pope.pope.score.json").read_text())
    assert score["categories"]["adversarial"]["answers"] == 2
