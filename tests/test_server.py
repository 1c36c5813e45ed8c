"""The OpenAI-compatible server as a real subprocess on a loopback port, driven by the official ``openai``
client (and ``httpx`` where status codes and headers matter). One server for the whole module."""
import base64
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from gracevlm.engine.generate import Generation, stream_generate
from gracevlm.engine.sampling import SamplingParams
from gracevlm.engine.vlm import load

KEY = "test-key-123"
NAME = "tiny-vlm"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(size=(64, 40), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


class _ImageHost(http.server.BaseHTTPRequestHandler):
    """A local stand-in for a remote image host."""

    routes: dict = {}

    def do_GET(self):  # noqa: N802
        status, headers, body = self.routes.get(self.path, (404, {}, b"missing"))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_awq):
    root = tmp_path_factory.mktemp("server")
    ckpt = tiny_awq
    media = root / "media"
    media.mkdir()
    (media / "red.png").write_bytes(_png())
    (root / "secret.png").write_bytes(_png(color=(0, 0, 255)))
    os.symlink(root / "secret.png", media / "link.png")

    _ImageHost.routes = {
        "/red.png": (200, {"Content-Type": "image/png"}, _png()),
        "/big.png": (200, {"Content-Type": "image/png"}, b"\0" * 300_000),
        "/to-red": (302, {"Location": "/red.png"}, b""),
        "/to-file": (302, {"Location": "file:///etc/passwd"}, b""),
    }
    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHost)
    threading.Thread(target=host.serve_forever, daemon=True).start()

    port = _free_port()
    log = open(root / "server.log", "w+")
    cmd = [sys.executable, "-m", "gracevlm.server", "--model", str(ckpt), "--port", str(port),
           "--api-key", KEY, "--served-model-name", NAME, "--max-batch-size", "2", "--max-queue", "1",
           "--max-model-len", "1024", "--allowed-local-media-path", str(media), "--allow-remote-images",
           "--allow-private-media-hosts", "--image-fetch-timeout", "3", "--max-body-bytes", "250000", "--max-image-bytes", "200000", "--max-image-pixels", "100000",
           "--no-access-log", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"server exited: {Path(log.name).read_text()}"
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"server not healthy: {Path(log.name).read_text()}"
            time.sleep(0.2)
        vlm = load(ckpt, device="cpu")
        yield dict(base=base, vlm=vlm, media=media, root=root, remote=f"http://127.0.0.1:{host.server_port}",
                   client=openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=60),
                   http=httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60),
                   log=Path(log.name))
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        host.shutdown()
        log.close()


def _chat_ref(vlm, text, images=(), **sampling):
    parts = [{"type": "image", "image": Image.open(io.BytesIO(i))} for i in images]
    return vlm.chat([{"role": "user", "content": [{"type": "text", "text": text}, *parts]}], **sampling)


def _image_msg(text, url):
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def test_models_and_api_key(env):
    models = env["client"].models.list()
    assert [m.id for m in models.data] == [NAME] and models.data[0].object == "model"
    bad = openai.OpenAI(base_url=env["base"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        bad.models.list()
    assert exc.value.status_code == 401 and exc.value.type == "authentication_error"
    assert httpx.get(env["base"] + "/health").status_code == 200  # health and metrics need no key


def test_chat_with_base64_image_matches_engine(env):
    ref = _chat_ref(env["vlm"], "What is in the picture?", [_png()], max_new_tokens=12)
    resp = env["client"].chat.completions.create(
        model=NAME, messages=_image_msg("What is in the picture?", _data_url(_png())), max_tokens=12, temperature=0)
    choice = resp.choices[0]
    assert resp.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content == ref.text and choice.finish_reason == ref.finish_reason
    n_patch = env["vlm"].encode_images([Image.open(io.BytesIO(_png()))])[0].shape[1]  # marker -> patches
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids) - 1 + n_patch
    assert resp.usage.completion_tokens == len(ref.token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_streaming_joins_to_non_streaming(env):
    client = env["client"]
    kwargs = dict(model=NAME, messages=[{"role": "user", "content": "Tell me about the sea"}], max_tokens=16,
                  temperature=0)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    # the raw stream ends with [DONE]
    with env["http"].stream("POST", "/v1/chat/completions", json={**kwargs, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert "usage" not in json.loads(lines[-2][6:])  # no usage unless asked


def test_completions_raw_prompt(env):
    vlm = env["vlm"]
    prompt = "The quick brown fox"
    ref = Generation("", [], [], "length")
    expected = "".join(stream_generate(vlm.model, vlm.tokenizer, vlm.tokenizer.encode(prompt), None,
                                       SamplingParams(max_new_tokens=10), vlm.max_context, ref))
    client = env["client"]
    resp = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0)
    assert resp.object == "text_completion" and resp.choices[0].text == expected == ref.text
    assert resp.usage.prompt_tokens == len(vlm.tokenizer.encode(prompt))
    stream = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=10, stream=True))
    assert "".join(c.choices[0].text for c in stream) == expected
    assert stream[-1].choices[0].finish_reason == resp.choices[0].finish_reason
    assert client.completions.create(model=NAME, prompt="Hi").usage.completion_tokens <= 16  # OpenAI's default


def test_local_and_remote_images(env):
    client, media, remote = env["client"], env["media"], env["remote"]
    ref = _chat_ref(env["vlm"], "Describe", [_png()], max_new_tokens=8).text
    for url in ((media / "red.png").as_uri(), remote + "/red.png", remote + "/to-red"):
        resp = client.chat.completions.create(model=NAME, messages=_image_msg("Describe", url), max_tokens=8)
        assert resp.choices[0].message.content == ref, url
    http = env["http"]
    cases = [((media / "link.png").as_uri(), 400, "local_file_not_allowed"),  # symlink out of the folder
             (media.as_uri() + "/../secret.png", 400, "local_file_not_allowed"),
             ((media / "nope.png").as_uri(), 400, "image_not_found"),
             (remote + "/to-file", 400, "image_fetch_failed"),
             (remote + "/missing", 400, "image_fetch_failed"),
             (remote + "/big.png", 413, "image_too_large"),
             ("ftp://example.com/x.png", 400, "invalid_image_url")]
    for url, status, code in cases:
        r = http.post("/v1/chat/completions", json={"model": NAME, "messages": _image_msg("x", url), "max_tokens": 2})
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), url
        assert str(env["root"]) not in r.text  # no server paths leak


def _post(env, body, path="/v1/chat/completions", headers=None, timeout=60):
    content = dict(json=body) if not isinstance(body, (bytes, str)) else dict(content=body)
    raw = {"Content-Type": "application/json"} if isinstance(body, (bytes, str)) else {}
    return httpx.post(env["base"] + path, headers={"Authorization": f"Bearer {KEY}", **raw, **(headers or {})},
                      timeout=timeout, **content)


def test_bad_input_matrix_then_good_request(env):
    msg = [{"role": "user", "content": "Hi"}]
    good = {"model": NAME, "messages": msg, "max_tokens": 4}
    cases = [
        ("malformed json", lambda: _post(env, b'{"model": "x", '), 400, "invalid_request_error"),
        ("body not an object", lambda: _post(env, b"[1, 2]"), 400, "invalid_request_error"),
        ("missing messages", lambda: _post(env, {"model": NAME}), 400, "invalid_request_error"),
        ("bad field type", lambda: _post(env, {**good, "max_tokens": "many"}), 400, "invalid_request_error"),
        ("negative temperature", lambda: _post(env, {**good, "temperature": -1}), 400, "invalid_request_error"),
        ("n > max batch size", lambda: _post(env, {**good, "n": 3}), 400, "invalid_request_error"),
        ("unknown part", lambda: _post(env, {**good, "messages": [{"role": "user", "content": [{"type": "audio"}]}]}),
         400, "invalid_request_error"),
        ("system message not first",
         lambda: _post(env, {**good, "messages": [*msg, {"role": "system", "content": "be nice"}]}),
         400, "invalid_request_error"),
        ("prompt too long", lambda: _post(env, {**good, "messages": [{"role": "user", "content": "word " * 1200}]}),
         400, "invalid_request_error"),
        ("bad base64", lambda: _post(env, {**good, "messages": _image_msg("x", "data:image/png;base64,@@@")}),
         400, "invalid_request_error"),
        ("missing key", lambda: httpx.post(env["base"] + "/v1/chat/completions", json=good), 401,
         "authentication_error"),
        ("wrong key", lambda: _post(env, good, headers={"Authorization": "Bearer nope"}), 401, "authentication_error"),
        ("unknown model", lambda: _post(env, {**good, "model": "gpt-5"}), 404, "not_found_error"),
        ("unknown route", lambda: _post(env, good, path="/v1/embeddings"), 404, "not_found_error"),
        ("body too large", lambda: _post(env, {**good, "pad": "x" * 300_000}), 413, "invalid_request_error"),
        ("image too many pixels",
         lambda: _post(env, {**good, "messages": _image_msg("x", _data_url(_png((400, 300))))}),
         413, "invalid_request_error"),
        ("undecodable image", lambda: _post(env, {**good, "messages": _image_msg("x", _data_url(b"not an image"))}),
         422, "invalid_request_error"),
    ]
    for name, call, status, type_ in cases:
        r = call()
        assert r.status_code == status, (name, r.status_code, r.text)
        err = r.json()["error"]
        assert err["type"] == type_ and err["message"] and set(err) == {"message", "type", "param", "code"}, name
        assert "Traceback" not in r.text and r.headers.get("x-request-id"), name
    r = _post(env, good)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


def _metric(env, name):
    text = httpx.get(env["base"] + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ") or
               line.startswith(name + "{"))


def _wait(cond, timeout=30):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end
        time.sleep(0.05)


def test_queue_full_then_disconnect_frees_slots(env):
    long = {"model": NAME, "prompt": "keep going", "max_tokens": 1000, "stream": True}
    finished_before = _metric(env, "gracevlm_requests_finished_total")
    cancelled_before = _cancelled(env)
    streams = []
    for _ in range(2):  # fill both slots
        cm = httpx.stream("POST", env["base"] + "/v1/completions", json=long, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"})
        streams.append((cm, cm.__enter__()))
    _wait(lambda: _metric(env, "gracevlm_active_slots") == 2)
    waiting = {}
    t = threading.Thread(target=lambda: waiting.update(r=_post(env, {**long, "stream": False, "max_tokens": 3},
                                                              path="/v1/completions")))
    t.start()
    _wait(lambda: _metric(env, "gracevlm_queue_depth") == 1)
    r = _post(env, {**long, "stream": False}, path="/v1/completions")
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    assert r.headers["retry-after"]
    with pytest.raises(openai.RateLimitError):
        env["client"].completions.create(model=NAME, prompt="x", max_tokens=2)
    for cm, resp in streams:  # the clients go away: their requests are cancelled, slots freed
        next(resp.iter_lines())
        cm.__exit__(None, None, None)
    t.join(60)
    assert waiting["r"].status_code == 200
    _wait(lambda: _metric(env, "gracevlm_active_slots") == 0)
    assert _cancelled(env) == cancelled_before + 2
    assert _metric(env, "gracevlm_requests_finished_total") == finished_before + 3


def _cancelled(env):
    text = httpx.get(env["base"] + "/metrics").text
    return float(text.split('gracevlm_requests_finished_total{reason="cancelled"} ')[1].split()[0])


def test_non_streaming_client_disconnect_cancels(env):
    before = _cancelled(env)
    with pytest.raises(httpx.ReadTimeout):
        _post(env, {"model": NAME, "prompt": "keep going", "max_tokens": 1000}, path="/v1/completions",
              timeout=httpx.Timeout(10, read=0.3))
    _wait(lambda: _cancelled(env) == before + 1)
    _wait(lambda: _metric(env, "gracevlm_active_slots") == 0)


def test_metrics_exposition(env):
    env["client"].chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    r = httpx.get(env["base"] + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for family in ("gracevlm_http_requests_total", "gracevlm_prompt_tokens_total", "gracevlm_generation_tokens_total",
                   "gracevlm_queue_depth", "gracevlm_active_slots", "gracevlm_time_to_first_token_seconds",
                   "gracevlm_time_per_output_token_seconds"):
        assert f"# TYPE {family} " in text, family
    assert 'gracevlm_http_requests_total{route="/v1/chat/completions",code="200"}' in text
    assert _metric(env, "gracevlm_time_to_first_token_seconds_count") >= 1
    assert _metric(env, "gracevlm_prompt_tokens_total") > 0 and _metric(env, "gracevlm_generation_tokens_total") > 0
    for line in text.splitlines():  # every sample line is "name{labels} number"
        if line and not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


def _trickle_server(head: bytes):
    """A loopback host that sends ``head`` and then one byte every 0.3 s (at most 100 bytes): a worker held
    for minutes without a total deadline."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def serve():
        for _ in range(4):
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                try:
                    conn.sendall(head)
                    for _ in range(100):
                        conn.sendall(b"\0")
                        time.sleep(0.3)
                except OSError:  # the fetcher hung up: what the deadline does
                    pass

    threading.Thread(target=serve, daemon=True).start()
    return srv


def test_remote_fetch_has_a_total_deadline(env):
    body = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
    for head in (body, b"HTTP/1.1 200 OK\r\nX-Slow: "):  # a trickled body, trickled headers
        srv = _trickle_server(head)
        try:
            url = f"http://127.0.0.1:{srv.getsockname()[1]}/slow.png"
            r = _post(env, {"model": NAME, "messages": _image_msg("x", url), "max_tokens": 2}, timeout=30)
        finally:
            srv.close()
        assert (r.status_code, r.json()["error"]["code"]) == (400, "image_fetch_failed"), r.text
