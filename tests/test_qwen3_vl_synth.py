"""``gracevlm synth --preset qwen3-vl-tiny`` folders (bf16, QAT W4 + sidecar, AWQ W4): transformers reads them as
Qwen3-VL checkpoints and generates what we generate; ``gracevlm pack`` turns the QAT one into the AWQ one bit for
bit; ``gracevlm run`` and the OpenAI server answer an image request as the engine does."""
import base64
import io
import json
import subprocess
import sys
import time

import pytest
import torch

import gracevlm
from gracevlm.cli import main
from gracevlm.formats.checkpoint import TensorStore

pytest.importorskip("transformers")
from qwen3_vl_helpers import random_image, reference_processor  # noqa: E402


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3vl_synth")
    for fmt in ("bf16", "qat", "awq"):
        assert main(["synth", "--preset", "qwen3-vl-tiny", "--format", fmt, "--out", str(root / fmt)]) == 0
    return root


def _png(w=70, h=45, seed=3) -> bytes:
    buf = io.BytesIO()
    random_image(w, h, seed).save(buf, format="PNG")
    return buf.getvalue()


def test_transformers_reads_the_folder_and_generates_the_same(synth):
    from PIL import Image
    from transformers import Qwen3VLForConditionalGeneration

    folder = synth / "bf16"
    hf = Qwen3VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    proc = reference_processor(folder)
    proc.chat_template = (folder / "chat_template.jinja").read_text()
    vlm = gracevlm.load(folder)
    image = Image.open(io.BytesIO(_png()))
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown here?"}]}]
    text = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = proc(text=[text], images=[image], return_tensors="pt")
    stops = vlm.tokenizer.stop_ids
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=stops, pad_token_id=stops[-1],
                          suppress_tokens=list(range(vlm.tokenizer.vocab_size, hf.config.text_config.vocab_size)))
    ref = [t for t in out[0, inputs["input_ids"].shape[1]:].tolist() if t not in stops]
    messages[1]["content"][0]["image"] = image
    got = vlm.chat(messages, max_new_tokens=8)
    assert got.token_ids == ref
    assert got.timings.prefill_tokens == inputs["input_ids"].shape[1]


def test_pack_qat_is_the_awq_folder_bit_for_bit(synth, tmp_path):
    packed = tmp_path / "packed"
    assert main(["pack", "--qat", str(synth / "qat"), "--out", str(packed), "--json"]) == 0
    a, b = TensorStore(packed), TensorStore(synth / "awq")
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.keys():
        ta, tb = a.get(key), b.get(key)
        assert ta.dtype == tb.dtype and torch.equal(ta, tb), key
    assert json.loads((packed / "awq_quantized_modules.json").read_text()) == \
        json.loads((synth / "awq" / "awq_quantized_modules.json").read_text())
    assert (packed / "chat_template.jinja").is_file() and (packed / "preprocessor_config.json").is_file()
    assert json.loads((packed / "config.json").read_text())["awq_packing"]["group_size"] == 128
    image = _png()
    qat, awq = gracevlm.load(synth / "qat"), gracevlm.load(packed)
    ga = qat.generate("Describe it.", images=[image], max_new_tokens=6)
    gb = awq.generate("Describe it.", images=[image], max_new_tokens=6)
    assert ga.token_ids == gb.token_ids and ga.text == gb.text


def test_cli_run_json_equals_the_engine(synth, tmp_path, capsys):
    img = tmp_path / "img.png"
    img.write_bytes(_png())
    capsys.readouterr()
    assert main(["run", "--model", str(synth / "awq"), "--image", str(img), "--query", "What is this?",
                 "--max-new-tokens", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ref = gracevlm.load(synth / "awq").generate("What is this?", images=[str(img)], max_new_tokens=6)
    assert out["token_ids"] == ref.token_ids and out["text"] == ref.text


def test_server_answers_an_image_request_as_the_engine(synth, tmp_path):
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "gracevlm.server", "--model", str(synth / "awq"), "--port",
                             str(port), "--max-batch-size", "2", "--max-model-len", "1024", "--no-access-log",
                             "--device", "cpu", "--served-model-name", "qwen-tiny"],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.3)
        png = _png()
        url = "data:image/png;base64," + base64.b64encode(png).decode()
        body = {"model": "qwen-tiny", "max_tokens": 6, "temperature": 0,
                "messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": "What is this?"}]}]}
        r = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        answer = r.json()["choices"][0]["message"]["content"]
        vlm = gracevlm.load(synth / "awq")
        ref = vlm.chat([{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": [{"type": "image", "image": png},
                                                     {"type": "text", "text": "What is this?"}]}], max_new_tokens=6)
        assert answer == ref.text
        bad = dict(body, messages=[{"role": "user", "content": [{"type": "text", "text": "<|image_pad|> hi"}]}])
        r = httpx.post(base + "/v1/chat/completions", json=bad, timeout=60)
        assert r.status_code == 400 and "image" in r.text
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_cli_chat_two_turns_with_an_image(synth, tmp_path, monkeypatch, capsys):
    img = tmp_path / "img.png"
    img.write_bytes(_png(40, 64, seed=5))
    lines = iter([f"/image {img}", "What is this?", "And the colours?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    capsys.readouterr()
    assert main(["chat", "--model", str(synth / "qat"), "--max-new-tokens", "5"]) == 0
    answers = [ln[len("ASSISTANT: "):] for ln in capsys.readouterr().out.splitlines() if ln.startswith("ASSISTANT: ")]
    vlm = gracevlm.load(synth / "qat")
    messages = [{"role": "user", "content": [{"type": "image", "image": str(img)},
                                             {"type": "text", "text": "What is this?"}]}]
    first = vlm.chat(messages, max_new_tokens=5)
    messages += [{"role": "assistant", "content": first.text},
                 {"role": "user", "content": [{"type": "text", "text": "And the colours?"}]}]
    assert answers == [first.text, vlm.chat(messages, max_new_tokens=5).text]
