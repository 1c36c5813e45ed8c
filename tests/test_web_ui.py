"""The web chat page at ``GET /`` of ``gracevlm serve``.

In process: the page's routes, their headers, ``--no-ui``. End to end: a real server subprocess (tiny
synthesized checkpoint, ``--api-key``, a small ``--max-image-pixels``) driven through the page in headless
Chromium with Playwright: the key dialog, an image and a question, the answer streaming in and equal to
the API's answer for the same request, a second turn with the whole history, a 413 shown in the page,
client-side downscaling, Stop, and the server going away mid-answer.

The browser is Debian's ``chromium`` (``/usr/bin/chromium``, or ``$GRACEVLM_CHROMIUM``); Playwright's own
browser downloads are never used. Without a browser the end-to-end test is skipped with the reason, unless
``GRACEVLM_REQUIRE_BROWSER=1`` (CI), which turns the skip into a failure.
"""
import argparse
import base64
import importlib.resources
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw
from starlette.testclient import TestClient

from gracevlm.server.app import create_app
from gracevlm.server.cli import add_serve_args
from gracevlm.server.serving import ServerConfig

CHROMIUM = os.environ.get("GRACEVLM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--no-proxy-server"]
KEY = "web-test-key-7"
NAME = "tiny-vlm"
SCREENSHOT_COPY = Path("/tmp/gracevlm_webui.png")
AT_LEAST_2 = re.compile(r"^([2-9]|[1-9][0-9]+)$")  # a data-deltas count of 2 or more
WAIT_MS = 30_000  # generous: the first request warms up the model on a shared CPU


# -- in process: routes, headers, --no-ui -------------------------------------------------------------------

def _no_model(config):
    raise RuntimeError("no model in this test")


def test_page_routes_and_headers():
    with TestClient(create_app(ServerConfig(model="m"), loader=_no_model), raise_server_exceptions=False) as c:
        r = c.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert '<script src="/ui/app.js" defer></script>' in r.text and "/ui/style.css" in r.text
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        for path, kind in (("/ui/app.js", "text/javascript"), ("/ui/style.css", "text/css")):
            r = c.get(path)
            assert r.status_code == 200 and r.headers["content-type"].startswith(kind) and r.content, path
        for path in ("/ui/index.html", "/ui/../app.py", "/ui/%2e%2e/app.py", "/ui/", "/index.html"):
            r = c.get(path)
            assert r.status_code == 404 and r.json()["error"]["code"] == "route_not_found", path
        assert c.post("/").status_code == 405
        assert 'route="/",code="200"' in c.get("/metrics").text


def test_no_ui_turns_the_page_off():
    with TestClient(create_app(ServerConfig(model="m"), loader=_no_model, ui=False),
                    raise_server_exceptions=False) as c:
        for path in ("/", "/ui/app.js", "/ui/style.css"):
            r = c.get(path)
            assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error", path
        assert c.get("/v1/models").status_code == 200  # the API is unchanged
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    assert parser.parse_args(["--model", "x"]).ui is True
    assert parser.parse_args(["--model", "x", "--no-ui"]).ui is False


def test_static_files_are_in_the_package():
    static = importlib.resources.files("gracevlm.server").joinpath("static")
    for name in ("index.html", "app.js", "style.css"):
        text = static.joinpath(name).read_text(encoding="utf-8")
        assert text.strip(), name
        assert "http://" not in text and "https://" not in text, f"{name} must not load anything from elsewhere"


# -- end to end in Chromium ------------------------------------------------------------------------------------

def _skip(reason: str):
    if os.environ.get("GRACEVLM_REQUIRE_BROWSER") == "1":
        pytest.fail(f"GRACEVLM_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        _skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set GRACEVLM_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _skip("the playwright package is not installed, so Chromium cannot be driven (pip install playwright)")
    pw = sync_playwright().start()
    try:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
    except Exception as exc:  # noqa: BLE001 - any launch failure means: no usable browser here
        pw.stop()
        _skip(f"Chromium at {CHROMIUM} could not be launched: {str(exc).splitlines()[0]}")
    yield browser
    browser.close()
    pw.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(tmp_path, tiny_awq):
    ckpt = tiny_awq
    port = _free_port()
    log = open(tmp_path / "server.log", "w+")
    cmd = [sys.executable, "-m", "gracevlm.server", "--model", str(ckpt), "--port", str(port), "--api-key", KEY,
           "--served-model-name", NAME, "--max-batch-size", "2", "--max-model-len", "1024",
           "--max-image-pixels", "100000", "--no-access-log", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"server exited: {Path(log.name).read_text()}"
            try:
                if httpx.get(base + "/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"server not healthy: {Path(log.name).read_text()}"
            time.sleep(0.2)
        yield dict(base=base, proc=proc, log=Path(log.name))
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


def _png(size, background=(240, 200, 60)) -> bytes:
    img = Image.new("RGB", size, background)
    w, h = size
    ImageDraw.Draw(img).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(30, 90, 200))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# Recorded in the page: after every rendered delta, the streaming answer's text length as the DOM has it.
TRACE = """
window.__trace = [];
window.__answers = [];
document.addEventListener("gracevlm:delta", () => {
  const li = document.querySelector('.msg-assistant[data-state="streaming"]');
  window.__trace.push({t: performance.now(), len: li ? li.querySelector(".msg-text").textContent.length : -1});
});
document.addEventListener("gracevlm:answer", (e) => window.__answers.push(e.detail));
"""

DROP = """([b64, name, type]) => {
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  const dt = new DataTransfer();
  dt.items.add(new File([bytes], name, {type}));
  return dt;
}"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_chat_page_end_to_end(browser, server, tmp_path):
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    console = []
    page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
    try:
        _drive(page, expect, server, tmp_path)
    except BaseException:
        _diagnose(page, console, server, tmp_path)  # shown by pytest with the failure
        raise
    finally:
        context.close()


def _diagnose(page, console, server, tmp_path) -> None:
    try:
        page.screenshot(path=str(tmp_path / "failure.png"))
        print("screenshot of the failure:", tmp_path / "failure.png")
        print("page state:", page.evaluate("""() => ({
          error: document.getElementById("error").hidden ? null : document.getElementById("error-text").textContent,
          status: document.getElementById("status").textContent,
          model: document.getElementById("model-name").textContent,
          question: document.getElementById("question").value,
          answers: [...document.querySelectorAll(".msg-assistant")].map((li) => [li.dataset.state, li.dataset.deltas,
            li.querySelector(".msg-meta").textContent]),
          answerEvents: window.__answers})"""))
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        print("page state unavailable:", exc)
    print("browser console:", *console[-30:], sep="\n  ")
    print("server log (end):", server["log"].read_text()[-4000:], sep="\n")


def _drive(page, expect, server, tmp_path) -> None:
    base, auth = server["base"], {"Authorization": f"Bearer {KEY}"}
    api = httpx.Client(base_url=base, headers=auth, timeout=60, trust_env=False)

    def api_answer(body: dict) -> dict:
        """The same request the page sent, without streaming, straight to the API."""
        r = api.post("/v1/chat/completions", json={**body, "stream": False})
        assert r.status_code == 200, r.text
        return r.json()

    page.add_init_script(TRACE)
    problems, sent = [], []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.on("request", lambda req: sent.append(req.post_data_json)
            if req.method == "POST" and req.url.endswith("/v1/chat/completions") else None)
    answers = page.locator(".msg-assistant")
    done = page.locator('.msg-assistant[data-state="done"]')
    streaming = page.locator('.msg-assistant[data-state="streaming"]')
    error = page.locator("#error")

    def settings(**values):
        page.click("#settings-toggle")
        for name, value in values.items():
            page.fill(f"#set-{name}", str(value))
        page.click("#settings-toggle")

    def reset_trace():
        page.evaluate("window.__trace = []; window.__answers = []")

    # -- the API key: GET /v1/models answers 401, so the page asks; a wrong key is asked for again -----------
    page.goto(base + "/")
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#key-reason")).to_contain_text("requires an API key")
    page.fill("#key-input", "not-the-key")
    page.click("#key-ok")
    expect(page.locator("#key-reason")).to_contain_text("did not accept")
    expect(dialog).to_be_visible()
    page.fill("#key-input", KEY)
    page.click("#key-ok")
    expect(dialog).to_be_hidden()
    expect(page.locator("#model-name")).to_have_text(NAME)
    expect(page.locator("#model-dot")).to_have_attribute("data-state", "ready")
    assert page.evaluate("sessionStorage.getItem('gracevlm.apiKey')") == KEY
    assert KEY not in page.evaluate("JSON.stringify(localStorage)")

    # -- turn 1: an image (small: sent as is) and a question; the answer streams in ---------------------------
    settings(**{"max-tokens": 24})
    small = _png((64, 40))
    page.set_input_files("#file", files=[{"name": "shapes.png", "mimeType": "image/png", "buffer": small}])
    expect(page.locator("#preview")).to_be_visible()
    expect(page.locator("#preview-info")).to_contain_text("shapes.png · 64×40")
    question = "What is in the picture?"
    page.fill("#question", question)
    reset_trace()
    page.click("#send")
    expect(done).to_have_count(1)
    text1 = answers.nth(0).locator(".msg-text").text_content()
    trace = page.evaluate("window.__trace")
    lengths = [step["len"] for step in trace]
    assert len(trace) >= 2, f"the answer did not stream (deltas rendered: {trace})"
    assert lengths == sorted(set(lengths)) and lengths[0] > 0, lengths  # it grew at every observation
    assert lengths[-1] == page.evaluate("document.querySelector('.msg-assistant .msg-text').textContent.length")
    assert int(answers.nth(0).get_attribute("data-deltas")) == len(trace)

    body1 = sent[-1]
    data_url = "data:image/png;base64," + base64.b64encode(small).decode()
    assert body1["model"] == NAME and body1["stream"] is True and body1["stream_options"] == {"include_usage": True}
    assert body1["max_tokens"] == 24 and body1["temperature"] == 0
    assert body1["messages"] == [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                                              {"type": "text", "text": question}]}]
    ref1 = api_answer(body1)
    assert text1 == ref1["choices"][0]["message"]["content"] and text1
    usage = ref1["usage"]
    meta = answers.nth(0).locator(".msg-meta").text_content()
    assert f"{usage['completion_tokens']} tokens" in meta and "tok/s" in meta and "first token" in meta, meta
    assert f"prompt {usage['prompt_tokens']} tokens" in meta, meta
    answer_event = page.evaluate("window.__answers")[-1]
    assert answer_event["state"] == "done" and answer_event["usage"] == usage

    # -- turn 2: the whole history goes with the follow-up (the image stays in its user turn) -----------------
    question2 = "What colour is the circle?"
    page.fill("#question", question2)
    page.press("#question", "Enter")
    expect(done).to_have_count(2)
    text2 = answers.nth(1).locator(".msg-text").text_content()
    body2 = sent[-1]
    assert body2["messages"] == [*body1["messages"], {"role": "assistant", "content": text1},
                                 {"role": "user", "content": question2}]
    assert text2 == api_answer(body2)["choices"][0]["message"]["content"]
    page.screenshot(path=str(tmp_path / "conversation.png"))

    # -- an image over the server's pixel cap, dropped on the page: the 413 is shown, the turn given back -----
    big = _png((600, 400))
    drop = page.evaluate_handle(DROP, [base64.b64encode(big).decode(), "big.png", "image/png"])
    page.dispatch_event("#chat", "dragenter", {"dataTransfer": drop})
    expect(page.locator("#drop-overlay")).to_be_visible()
    page.dispatch_event("#chat", "drop", {"dataTransfer": drop})
    expect(page.locator("#drop-overlay")).to_be_hidden()
    expect(page.locator("#preview-info")).to_contain_text("big.png · 600×400")  # under 1024 px: not scaled
    page.fill("#question", "And this one?")
    page.click("#send")
    expect(error).to_be_visible()
    expect(error).to_contain_text("Error 413")
    expect(error).to_contain_text("more than the server's limit of 100000")
    expect(page.locator("#question")).to_have_value("And this one?")  # nothing lost: fix and resend
    expect(page.locator("#preview")).to_be_visible()
    expect(page.locator(".msg-user")).to_have_count(2)
    expect(answers).to_have_count(2)
    shot = tmp_path / "error_413.png"
    page.screenshot(path=str(shot))
    try:
        shutil.copyfile(shot, SCREENSHOT_COPY)
    except OSError:
        pass

    # -- the same image scaled down in the page (Largest image side 256) goes through ---------------------------
    settings(**{"max-side": 256})
    page.click("#preview-remove")
    page.set_input_files("#file", files=[{"name": "big.png", "mimeType": "image/png", "buffer": big}])
    expect(page.locator("#preview-info")).to_contain_text("600×400 → 256×171 (scaled down)")
    page.click("#send")
    expect(error).to_be_hidden()
    expect(done).to_have_count(3)
    body3 = sent[-1]
    url = body3["messages"][-1]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (256, 171)
    assert answers.nth(2).locator(".msg-text").text_content() == \
        api_answer(body3)["choices"][0]["message"]["content"]

    # -- the key forgotten (Settings): the chat request's 401 brings the dialog back, then the turn goes on ---------
    page.click("#settings-toggle")
    page.click("#key-forget")
    page.click("#settings-toggle")
    assert page.evaluate("sessionStorage.getItem('gracevlm.apiKey')") is None
    page.fill("#question", "Once more?")
    page.click("#send")
    expect(dialog).to_be_visible()
    page.fill("#key-input", KEY)
    page.press("#key-input", "Enter")
    expect(done).to_have_count(4)
    expect(error).to_be_hidden()

    # -- Stop: a long answer is cut by the user, and its text is kept ------------------------------------------
    settings(**{"max-tokens": 900})
    page.fill("#question", "Tell me a long story.")
    page.click("#send")
    expect(page.locator("#stop")).to_be_visible()
    expect(streaming).to_have_attribute("data-deltas", AT_LEAST_2)
    page.click("#stop")
    stopped = page.locator('.msg-assistant[data-state="stopped"]')
    expect(stopped).to_have_count(1)
    expect(stopped.locator(".msg-meta")).to_contain_text("stopped")
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator("#send")).to_be_enabled()

    # -- token probabilities (Settings toggle): the answer's tokens, each with its probability on hover ----------
    assert "logprobs" not in body1  # off by default
    page.click("#settings-toggle")
    page.check("#set-probs")
    page.fill("#set-max-tokens", "12")
    page.click("#settings-toggle")
    page.fill("#question", "Name one colour.")
    page.click("#send")
    expect(done).to_have_count(5)
    body_p = sent[-1]
    assert body_p["logprobs"] is True and body_p["top_logprobs"] == 5
    entries = api_answer(body_p)["choices"][0]["logprobs"]["content"]
    tokens = answers.nth(5).locator(".msg-tokens .tok")
    expect(tokens).to_have_count(len(entries))
    shown = tokens.evaluate_all("els => els.map((e) => [e.textContent, Number(e.dataset.p)])")
    assert [t for t, _ in shown] == [e["token"] for e in entries]
    assert all(abs(p - math.exp(e["logprob"])) < 1e-9 for (_, p), e in zip(shown, entries))
    tokens.nth(0).hover()
    tip = page.locator("#tok-tip")
    expect(tip).to_be_visible()
    expect(tip).to_contain_text(json.dumps(entries[0]["token"]))
    expect(tip).to_contain_text("alternatives:")
    page.mouse.move(0, 0)
    expect(tip).to_be_hidden()
    page.click("#settings-toggle")
    page.uncheck("#set-probs")
    page.fill("#set-max-tokens", "900")
    page.click("#settings-toggle")
    page.click("#reset")  # a fresh context: the long answers below must not run out of positions early
    expect(page.locator(".msg")).to_have_count(0)

    # -- the server hangs mid-answer (SIGSTOP): the page gives up after its timeout instead of waiting forever --
    settings(timeout=5)
    page.fill("#question", "Keep talking.")
    page.click("#send")
    expect(streaming).to_have_attribute("data-deltas", AT_LEAST_2)
    os.kill(server["proc"].pid, signal.SIGSTOP)
    try:
        # text is on the page while the answer is unfinished (the server is frozen mid-stream): streaming,
        # whatever the timing of the deltas (a busy machine may deliver a short answer's deltas in one burst)
        expect(streaming.locator(".msg-text")).not_to_have_text("")
        expect(error).to_contain_text("The server sent nothing for 5 s", timeout=15_000)
        expect(page.locator("#send")).to_be_enabled()
    finally:
        os.kill(server["proc"].pid, signal.SIGCONT)
    settings(timeout=120)

    # -- the server goes away in the middle of an answer: a message, no hang; then it cannot be reached ----------
    expect(page.locator("#question")).to_have_value("Keep talking.")  # given back by the failed turn
    page.click("#send")
    expect(streaming).to_have_attribute("data-deltas", AT_LEAST_2)
    server["proc"].kill()
    server["proc"].wait(10)
    expect(error).to_contain_text("did the server stop?", timeout=15_000)
    expect(page.locator("#send")).to_be_enabled()
    expect(streaming).to_have_count(0)
    expect(page.locator("#model-dot")).to_have_attribute("data-state", "offline")
    expect(page.locator("#question")).to_have_value("Keep talking.")
    page.click("#send")
    expect(error).to_contain_text("Could not reach the server", timeout=15_000)
    expect(page.locator("#send")).to_be_enabled()

    # -- New chat empties the conversation ------------------------------------------------------------------------
    page.click("#reset")
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()
    expect(error).to_be_hidden()

    assert not problems, f"errors in the page: {problems}"
    api.close()
