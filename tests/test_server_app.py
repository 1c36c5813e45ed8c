"""The server app in process (starlette's TestClient): loading state, timeouts, bugs -> 500, and the media
policy on its own."""
import base64
import io
import json
import logging
import threading

import pytest
from PIL import Image
from starlette.testclient import TestClient

from gracevlm.engine.vlm import load
from gracevlm.server import serving
from gracevlm.server.app import create_app
from gracevlm.server.media import MediaError, MediaPolicy, decode_image, fetch_bytes
from gracevlm.server.serving import ServerConfig


@pytest.fixture(scope="module")
def vlm(tiny_awq):
    return load(tiny_awq,
                device="cpu")


def _client(app):
    return TestClient(app, raise_server_exceptions=False)


def _wait_ready(client, timeout=30):
    import time
    end = time.monotonic() + timeout
    while client.get("/health").status_code != 200:
        assert time.monotonic() < end
        time.sleep(0.02)


def test_health_is_503_until_loaded(vlm):
    release = threading.Event()

    def slow_loader(config):
        release.wait(30)
        return vlm

    app = create_app(ServerConfig(model="m"), loader=slow_loader)
    with _client(app) as client:
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready" and r.headers["retry-after"]
        assert client.get("/v1/models").json()["data"][0]["id"] == "m"
        release.set()
        _wait_ready(client)
        r = client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "Hi"}],
                                                      "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_load_failure_reported(vlm):
    def broken(config):
        raise RuntimeError("no weights here")

    failed = threading.Event()
    app = create_app(ServerConfig(model="m"), loader=broken)
    app.state.on_load_failure = failed.set
    with _client(app) as client:
        assert failed.wait(10)
        r = client.get("/health")
        assert r.status_code == 503 and "no weights here" in r.json()["error"]


def test_request_timeout(vlm):
    app = create_app(ServerConfig(model="m", request_timeout=0.3), loader=lambda c: vlm)
    body = {"model": "m", "prompt": "keep going", "max_tokens": 1000}
    with _client(app) as client:
        _wait_ready(client)
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 408 and r.json()["error"]["type"] == "timeout_error"
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line]
        assert r.status_code == 200 and lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["error"]["type"] == "timeout_error"
        assert "text_completion" in lines[0]
        metrics = client.get("/metrics").text
        assert 'gracevlm_requests_finished_total{reason="timeout"} 2' in metrics


def test_bug_is_a_500_without_details_and_the_server_goes_on(vlm, monkeypatch, caplog):
    app = create_app(ServerConfig(model="m"), loader=lambda c: vlm)
    with _client(app) as client:
        _wait_ready(client)
        real = serving.prepare_text

        def boom(*args, **kwargs):
            raise RuntimeError("secret internal detail")

        monkeypatch.setattr(serving, "prepare_text", boom)
        with caplog.at_level(logging.ERROR, logger="gracevlm.server"):
            r = client.post("/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 2},
                            headers={"X-Request-ID": "req-42"})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "secret internal detail" not in r.text and "Traceback" not in r.text and "req-42" in r.text
        assert r.headers["x-request-id"] == "req-42"
        assert any("req-42" in rec.getMessage() and rec.exc_info for rec in caplog.records)
        monkeypatch.setattr(serving, "prepare_text", real)
        r = client.post("/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200
        assert 'route="/v1/completions",code="500"} 1' in client.get("/metrics").text


def _png(size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_media_policy(tmp_path):
    png = _png()
    closed = MediaPolicy()
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    assert fetch_bytes(url, closed) == png
    assert fetch_bytes("data:image/png;name=x.png;base64," + base64.b64encode(png).decode(), closed) == png
    (tmp_path / "a.png").write_bytes(png)
    cases = [((tmp_path / "a.png").as_uri(), closed, 400, "local_files_disabled"),
             ("http://127.0.0.1:1/x.png", closed, 400, "remote_images_disabled"),
             ("data:text/plain;base64,aGk=", closed, 400, "invalid_image_url"),
             ("data:image/png,raw", closed, 400, "invalid_image_url"),
             ("/etc/passwd", closed, 400, "invalid_image_url"),
             ("file://otherhost/a.png", MediaPolicy(allowed_local_path=tmp_path), 400, "invalid_image_url"),
             (url, MediaPolicy(max_image_bytes=10), 413, "image_too_large"),
             ((tmp_path / "a.png").as_uri(), MediaPolicy(allowed_local_path=tmp_path, max_image_bytes=10), 413,
              "image_too_large"),
             ("http://127.0.0.1:1/x.png", MediaPolicy(allow_remote=True, fetch_timeout=2), 400, "image_fetch_failed")]
    for u, policy, status, code in cases:
        with pytest.raises(MediaError) as exc:
            fetch_bytes(u, policy)
        assert (exc.value.status, exc.value.code) == (status, code), u
    assert fetch_bytes((tmp_path / "a.png").as_uri(), MediaPolicy(allowed_local_path=tmp_path)) == png
    assert decode_image(png, 48).size == (8, 6)
    with pytest.raises(MediaError) as exc:
        decode_image(png, 47)
    assert exc.value.status == 413
    with pytest.raises(MediaError) as exc:
        decode_image(png[:40], 1000)
    assert exc.value.status == 422
