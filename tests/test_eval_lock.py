"""One ``eval run`` per answers file (issue 19, item 11): a second run on the same file refuses at once,
so two runs can no longer both append the same answers."""
import json
import threading

import pytest
from PIL import Image

from gracevlm import cli
from gracevlm.errors import InputError
from gracevlm.eval import pope
from gracevlm.eval.answers import read_jsonl
from gracevlm.eval.common import SHORT_ANSWER
from gracevlm.eval.lock import answers_lock
from gracevlm.eval.runner import RunConfig, run


def _questions(tmp_path, n=6):
    Image.new("RGB", (10, 8), (0, 128, 255)).save(tmp_path / "img.png")
    qf = tmp_path / "q.jsonl"
    qf.write_text("".join(json.dumps({"question_id": i, "image": "img.png", "text": f"Q{i}?\n{SHORT_ANSWER}",
                                      "category": "random"}) + "\n" for i in range(n)))
    return qf, pope.load_items(str(qf), str(tmp_path))


class SlowGen:
    model_id, conv_mode = "fake", "vicuna_v1"

    def __init__(self, started: threading.Event, release: threading.Event):
        self.started, self.release = started, release

    def __call__(self, item):
        self.started.set()
        assert self.release.wait(60)
        return "yes"


def _cfg(tmp_path, qf, answers):
    return RunConfig(benchmark="pope", answers_file=str(answers), question_file=str(qf), progress=False,
                     options={"image_folder": str(tmp_path)})


def test_second_run_on_the_same_answers_file_refuses(tmp_path):
    qf, questions = _questions(tmp_path)
    answers = tmp_path / "a.jsonl"
    cfg = _cfg(tmp_path, qf, answers)
    started, release, result = threading.Event(), threading.Event(), {}
    first = threading.Thread(target=lambda: result.update(s=run(cfg, questions, SlowGen(started, release))))
    first.start()
    try:
        assert started.wait(60)
        with pytest.raises(InputError, match="another `eval run` is writing"):
            run(cfg, questions, SlowGen(threading.Event(), threading.Event()))
        rc = cli.main(["eval", "run", "pope", "--endpoint", "http://127.0.0.1:1/v1", "--question-file", str(qf),
                       "--image-folder", str(tmp_path), "--answers-file", str(answers), "--no-progress"])
        assert rc == 2
    finally:
        release.set()
        first.join(60)
    assert result["s"]["complete"] and result["s"]["generated"] == 6
    rows, bad = read_jsonl(answers)
    assert len(rows) == 6 and bad == 0
    assert run(cfg, questions, SlowGen(threading.Event(), release))["generated"] == 0  # lock released


def test_lock_leaves_no_empty_file_when_nothing_is_written(tmp_path):
    path = tmp_path / "sub" / "answers.jsonl"
    with answers_lock(path):
        assert path.exists()
    assert not path.exists()
    path.write_text("{}\n")
    with answers_lock(path):
        pass
    assert path.read_text() == "{}\n"
