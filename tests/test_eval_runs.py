"""Answer files: chunking, resume after a kill, merge checks, ordered concurrent runs, the endpoint client."""
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from gracevlm.errors import InputError
from gracevlm.eval import cli, pope
from gracevlm.eval.answers import (chunk_file_names, get_chunk, merge_files, occurrence_keys, read_jsonl,
                                   repair_tail, split_chunks)
from gracevlm.eval.common import SHORT_ANSWER
from gracevlm.eval.runner import RunConfig, model_name_from_path, run


def _questions(tmp_path, n=7, repeat_ids=False):
    img = tmp_path / "img.png"
    Image.new("RGB", (10, 8), (0, 128, 255)).save(img)
    rows = []
    for i in range(n):
        qid = f"task/{i // 2}.png" if repeat_ids else i + 1
        rows.append({"question_id": qid, "image": "img.png", "text": f"Q{i}?\n{SHORT_ANSWER}", "category": "random"})
    qf = tmp_path / "q.jsonl"
    qf.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return qf


class FakeGen:
    model_id = "fake"
    conv_mode = "vicuna_v1"

    def __init__(self, fail_at=None, jitter=False):
        self.calls, self.fail_at, self.jitter = [], fail_at, jitter
        self.lock = threading.Lock()

    def __call__(self, item):
        with self.lock:
            self.calls.append(item.prompt)
            n = len(self.calls)
        if self.jitter:
            time.sleep(random.random() * 0.02)
        if self.fail_at is not None and n == self.fail_at:
            raise KeyboardInterrupt  # a kill in the middle of the run
        return "ans " + item.prompt.split("?")[0]


def _cfg(tmp_path, qf, answers, **kw):
    return RunConfig(benchmark="pope", answers_file=str(answers), question_file=str(qf), progress=False,
                     options={"image_folder": str(tmp_path)}, **kw)


def test_chunks_like_llava():
    assert [len(c) for c in split_chunks(list(range(10)), 4)] == [3, 3, 3, 1]
    assert [len(c) for c in split_chunks(list(range(9)), 4)] == [3, 3, 3]   # ceil(9/4)=3 -> only 3 chunks
    assert get_chunk(list(range(9)), 4, 3) == []
    assert get_chunk(list(range(10)), 4, 1) == [3, 4, 5]
    with pytest.raises(InputError):
        get_chunk([1], 2, 2)


def test_occurrence_keys_for_repeated_ids():
    assert occurrence_keys(["a", "a", 1, "1", "b"]) == [("a", 0), ("a", 1), ("1", 0), ("1", 1), ("b", 0)]


def test_model_id_from_path():
    assert model_name_from_path("/x/llava-v1.5-7b/") == "llava-v1.5-7b"
    assert model_name_from_path("/x/run/checkpoint-500") == "run_checkpoint-500"


def test_resume_after_kill_truncated_mid_line(tmp_path):
    qf = _questions(tmp_path)
    items = pope.load_items(qf, tmp_path)
    full = tmp_path / "full.jsonl"
    s = run(_cfg(tmp_path, qf, full), items, FakeGen())
    assert s["complete"] and s["generated"] == 7
    # a killed run: the file ends in the middle of line 4
    part = tmp_path / "part.jsonl"
    data = full.read_bytes()
    cut_at = data.index(b"\n", data.index(b"\n", data.index(b"\n") + 1) + 1) + 20
    part.write_bytes(data[:cut_at])
    gen = FakeGen()
    s = run(_cfg(tmp_path, qf, part), items, gen)
    assert s["already_answered"] == 3 and s["generated"] == 4 and s["partial_line_bytes_cut"] == 19  # bytes after the 3rd newline
    assert gen.calls == [f"Q{i}?\n{SHORT_ANSWER}" for i in range(3, 7)]
    a, _ = read_jsonl(full)
    b, _ = read_jsonl(part)
    strip = [{k: v for k, v in r.items() if k != "answer_id"} for r in a]
    assert strip == [{k: v for k, v in r.items() if k != "answer_id"} for r in b]
    assert s["answers_in_question_order"]
    assert list(b[0]) == ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
    assert b[0]["prompt"] == f"Q0?\n{SHORT_ANSWER}" and b[0]["text"] == "ans Q0" and b[0]["model_id"] == "fake"
    # a complete file: nothing to do
    assert run(_cfg(tmp_path, qf, part), items, FakeGen())["generated"] == 0


def test_kill_during_generation_keeps_written_answers(tmp_path):
    qf = _questions(tmp_path, repeat_ids=True)          # MME-style: two questions per id
    items = pope.load_items(qf, tmp_path)
    out = tmp_path / "a.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(tmp_path, qf, out), items, FakeGen(fail_at=4))
    assert len(out.read_text().splitlines()) == 3
    manifest = json.loads((tmp_path / "a.manifest.json").read_text())
    assert manifest["complete"] is False and manifest["answered"] == 3
    s = run(_cfg(tmp_path, qf, out), items, FakeGen())
    assert s["generated"] == 4 and s["complete"]
    recs, _ = read_jsonl(out)
    assert [r["prompt"] for r in recs] == [it.prompt for q in items for it in q]


def test_manifest_records_settings_and_refuses_mixing(tmp_path):
    qf = _questions(tmp_path, n=3)
    items = pope.load_items(qf, tmp_path)
    out = tmp_path / "a.jsonl"
    run(_cfg(tmp_path, qf, out, limit=2, max_new_tokens=128), items, FakeGen())
    m = json.loads((tmp_path / "a.manifest.json").read_text())
    assert m["decoding"] == {"temperature": 0.0, "max_new_tokens": 128, "num_beams": 1, "do_sample": False}
    assert len(m["question_file_sha256"]) == 64 and m["gracevlm_version"] and m["conv_mode"] == "vicuna_v1"
    with pytest.raises(InputError, match="other settings"):
        run(_cfg(tmp_path, qf, out, max_new_tokens=64), items, FakeGen())


def test_chunks_then_merge_with_checks(tmp_path):
    qf = _questions(tmp_path, n=7)
    items = pope.load_items(qf, tmp_path)
    d = tmp_path / "chunks"
    for i in range(3):
        run(_cfg(tmp_path, qf, d / f"3_{i}.jsonl", num_chunks=3, chunk_idx=i), items, FakeGen())
    assert [len((d / f"3_{i}.jsonl").read_text().splitlines()) for i in range(3)] == [3, 3, 1]
    rc = cli.main(["merge", "pope", "--question-file", str(qf), "--chunks-dir", str(d), "--num-chunks", "3",
                   "--output", str(tmp_path / "merge.jsonl")])
    assert rc == 0
    merged, _ = read_jsonl(tmp_path / "merge.jsonl")
    assert [r["question_id"] for r in merged] == list(range(1, 8))
    expected = occurrence_keys(range(1, 8))
    files = chunk_file_names(d, 3)
    # duplicate: chunk 1 appended again
    dup = tmp_path / "dup.jsonl"
    dup.write_text(files[1].read_text())
    with pytest.raises(InputError, match="duplicates"):
        merge_files([files[0], files[1], dup, files[2]], tmp_path / "m2.jsonl", expected)
    # gap: a chunk missing
    with pytest.raises(InputError, match="gaps"):
        merge_files([files[0], files[2]], tmp_path / "m3.jsonl", expected)
    # wrong order
    with pytest.raises(InputError, match="order"):
        merge_files([files[1], files[0], files[2]], tmp_path / "m4.jsonl", expected)
    rep = merge_files([files[0], files[2]], tmp_path / "m5.jsonl", expected, force=True)
    assert rep["gaps"] == 3 and rep["written"] == 4 and rep["first_gaps"][0] == ["4", 0]


def test_repair_tail(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n{"b": 2}\n{"c"')
    assert repair_tail(p) == 4 and p.read_text() == '{"a": 1}\n{"b": 2}\n'
    p.write_text('{"a": 1}\n{"b": \n')
    assert repair_tail(p) == 7 and p.read_text() == '{"a": 1}\n'


def test_concurrent_generation_writes_in_question_order(tmp_path):
    qf = _questions(tmp_path, n=12)
    items = pope.load_items(qf, tmp_path)
    out = tmp_path / "c.jsonl"
    run(_cfg(tmp_path, qf, out, concurrency=4), items, FakeGen(jitter=True))
    recs, _ = read_jsonl(out)
    assert [r["question_id"] for r in recs] == list(range(1, 13))


# -- endpoint ------------------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    requests: list = []

    def log_message(self, *a):
        pass

    def _send(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send({"object": "list", "data": [{"id": "served-llava", "object": "model"}]})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        req["_auth"] = self.headers.get("Authorization")
        type(self).requests.append(req)
        parts = req["messages"][0]["content"]
        text = next(p["text"] for p in parts if p["type"] == "text")
        self._send({"choices": [{"message": {"role": "assistant", "content": " No, " + text.split("?")[0] + " \n"}}]})


@pytest.fixture
def server():
    _Handler.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_endpoint_run_then_score(tmp_path, server):
    qf = _questions(tmp_path, n=4)
    out = tmp_path / "ep.jsonl"
    rc = cli.main(["run", "pope", "--question-file", str(qf), "--image-folder", str(tmp_path), "--answers-file",
                   str(out), "--endpoint", server, "--api-key", "k123", "--concurrency", "2", "--no-progress"])
    assert rc == 0
    recs, _ = read_jsonl(out)
    assert [r["text"] for r in recs] == [f"No, Q{i}" for i in range(4)]
    assert recs[0]["model_id"] == "served-llava"
    req = _Handler.requests[0]
    assert req["temperature"] == 0 and req["max_tokens"] == 128 and req["model"] == "served-llava"
    assert req["_auth"] == "Bearer k123"
    img, txt = req["messages"][0]["content"]
    assert img["image_url"]["url"].startswith("data:image/png;base64,")
    assert txt["text"].startswith("Q") and "<image>" not in txt["text"]
    # score it (labels all "no": every answer says "No," -> all correct)
    ann = tmp_path / "coco"
    ann.mkdir()
    (ann / "coco_pope_random.json").write_text("".join(
        json.dumps({"question_id": i + 1, "image": "img.png", "text": f"Q{i}?", "label": "no"}) + "\n"
        for i in range(4)))
    rc = cli.main(["score", "pope", "--annotation-dir", str(ann), "--question-file", str(qf), "--result-file",
                   str(out), "--json"])
    assert rc == 0
    score = json.loads((tmp_path / "ep.pope.score.json").read_text())
    assert score["categories"]["random"]["accuracy"] == 1.0 and score["categories"]["random"]["yes_ratio"] == 0.0
    assert score["run"]["endpoint"] == server


def test_cli_errors_are_reported(tmp_path, capsys):
    rc = cli.main(["score", "gqa", "--annotation-file", str(tmp_path / "nope.json"), "--result-file", "x"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
