"""Bad arguments and full disks are one ``error:`` line and exit code 2, never a traceback (issue 19, items
7, 9, 10): ``serve`` on a bad or busy port (checked and bound before the model loads), unknown devices,
out-of-range seeds, and ENOSPC however deep it surfaces."""
import errno
import os
import socket
import subprocess
import sys

import pytest

from gracevlm import cli
from gracevlm.synth.checkpoint import synthesize


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("cli") / "tiny", "tiny", "awq", seed=0, progress=False)


def _one_error_line(text: str) -> str:
    """The single ``error:`` line of ``text`` (progress bars may share stderr), with no traceback."""
    lines = [l for l in text.replace("\r", "\n").splitlines() if "error" in l.lower()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def _serve(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "gracevlm.server", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_serve_bad_port_busy_port_and_device(ckpt, capsys):
    from gracevlm.server.cli import main as serve_main

    with socket.socket() as busy:  # a real process: it used to abort (rc 134) with the model loading
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = _serve("--model", str(ckpt), "--port", str(port))
    assert r.returncode == 2, r
    assert f"cannot listen on 127.0.0.1:{port}" in _one_error_line(r.stderr)  # before any model loading log
    for args, words in ((["--port", "99999"], "is not a TCP port"), (["--port", "0", "--device", "tpu"],
                                                                     "unknown device 'tpu'"),
                        (["--port", "0", "--image-fetch-timeout", "inf"], "--image-fetch-timeout")):
        assert serve_main(["--model", str(ckpt), *args]) == 2, args
        assert words in _one_error_line(capsys.readouterr().err), args


def test_run_bad_values_are_one_line(ckpt, capsys):
    base = ["run", "--model", str(ckpt), "--query", "hi", "--max-new-tokens", "2"]
    for extra, words in ((["--device", "tpu"], "unknown device"), (["--seed", str(2**70), "--temperature", "1"],
                                                                    "seed must be an integer"),
                         (["--temperature", "nan"], "temperature must be a finite number")):
        assert cli.main(base + extra) == 2, extra
        assert words in _one_error_line(capsys.readouterr().err), extra
    assert cli.main(base + ["--temperature", "5e-324"]) == 0
    assert cli.main(base + ["--temperature", "1", "--top-p", "1e-300", "--seed", str(2**64 - 1)]) == 0


def test_disk_full_while_writing_a_checkpoint(tmp_path, monkeypatch, capsys):
    import safetensors.torch

    def full(*args, **kwargs):  # what safetensors raises on ENOSPC
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "disk" / "ckpt"
    assert cli.main(["synth", "--preset", "tiny", "--format", "awq", "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("gracevlm: error: no space left on ") and line.split(" on ")[1].startswith(
        str(out.parent))
    assert os.listdir(out.parent) == []  # the temporary folder is gone too


def test_disk_full_while_appending_answers(tmp_path, monkeypatch, capsys):
    import json

    from PIL import Image

    from gracevlm.eval import answers, runner

    Image.new("RGB", (10, 8)).save(tmp_path / "img.png")
    qf = tmp_path / "q.jsonl"
    qf.write_text(json.dumps({"question_id": 1, "image": "img.png", "text": "Q?", "category": "random"}) + "\n")

    def full(self, record):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("while writing an answer") from exc  # chained, as it surfaces in practice

    monkeypatch.setattr(answers.AnswerWriter, "write", full)
    monkeypatch.setattr(runner, "EndpointGenerator", lambda cfg: (lambda item: "yes"))
    rc = cli.main(["eval", "run", "pope", "--endpoint", "http://127.0.0.1:1/v1", "--question-file", str(qf),
                   "--image-folder", str(tmp_path), "--answers-file", str(tmp_path / "out" / "a.jsonl"),
                   "--no-progress"])
    assert rc == 2
    assert _one_error_line(capsys.readouterr().err) == (f"gracevlm: error: no space left on {tmp_path / 'out'} "
                                                        "(free some space, or write elsewhere)")


def test_real_full_filesystem(tmp_path, ckpt):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a 300 KiB tmpfs (the ENOSPC tests above run everywhere)")
    try:
        for cmd in (["export", "--model", str(ckpt), "--format", "llava-hf", "--out", str(mnt / "e")],):
            r = subprocess.run([sys.executable, "-m", "gracevlm.cli", *cmd], capture_output=True, text=True,
                               timeout=300)
            err = [l for l in r.stderr.splitlines() if "error" in l]
            assert r.returncode == 2 and err == [f"gracevlm: error: no space left on {mnt} (free some space, "
                                                 "or write elsewhere)"], r.stderr
            assert "Traceback" not in r.stderr and os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
