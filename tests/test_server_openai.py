"""The OpenAI API as clients use it (issue 18), through the real server subprocess and the ``openai``
package: log-probabilities (checked against a softmax of the model's own logits computed here in one
full-sequence forward), ``n`` choices reproducible by seed, system messages, ``cached_tokens``,
completions with prompt lists / token ids / echo, strict types, refusals, the rejected counter and a
clean SIGTERM. One server for the module; the SIGTERM test runs last and ends it."""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from gracevlm.engine.json_grammar import accepts_prefix
from gracevlm.engine.sampling import choice_seed
from gracevlm.engine.vlm import load
from gracevlm.synth.checkpoint import synthesize
from gracevlm.server.choices import token_text

KEY = "k18"
NAME = "tiny"
SLOTS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models decode much faster on one thread than on contended ones (a shared CI or dev CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("server18")
    ckpt = synthesize(root / "tiny", "tiny", "awq", seed=0, progress=False)
    port = _free_port()
    log = open(root / "server.log", "w+")
    cmd = [sys.executable, "-m", "gracevlm.server", "--model", str(ckpt), "--port", str(port), "--api-key", KEY,
           "--served-model-name", NAME, "--max-batch-size", str(SLOTS), "--max-queue", "2", "--max-model-len", "1024",
           "--no-access-log", "--device", "cpu", "--shutdown-grace", "2"]
    # one thread: the decode of this tiny model is far faster without thread contention on a busy machine
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
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
        yield dict(base=base, proc=proc, vlm=load(ckpt, device="cpu"), log=Path(log.name),
                   client=openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120))
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


def _post(env, body, path="/v1/chat/completions"):
    return httpx.post(env["base"] + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def _model_logprobs(vlm, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at every position of ``ids`` (text only), one forward, no decode
    loop: row j is the distribution of token j + 1."""
    lm = vlm.model.language_model
    vocab = min(vlm.tokenizer.vocab_size, lm.lm_head.weight.shape[0])
    with torch.inference_mode():
        embeds = vlm.model.embed_prompt(ids, None)
        cache = vlm.model.new_cache(1, len(ids))
        logits = lm(embeds.unsqueeze(0), torch.arange(len(ids)).unsqueeze(0), cache, logits_for="all")[0]
    return torch.log_softmax(logits[:, :vocab].float(), dim=-1)


MSG = [{"role": "user", "content": "Tell me about the sea"}]


def test_greedy_chat_logprobs_are_the_models_softmax(env):
    vlm, client = env["vlm"], env["client"]
    ref = vlm.chat(MSG, max_new_tokens=6)
    resp = client.chat.completions.create(model=NAME, messages=MSG, max_tokens=6, temperature=0, logprobs=True,
                                          top_logprobs=4)
    choice = resp.choices[0]
    assert choice.message.content == ref.text
    content = choice.logprobs.content
    assert len(content) == len(ref.token_ids) == resp.usage.completion_tokens
    logp = _model_logprobs(vlm, ref.prompt_token_ids + ref.token_ids)
    p = len(ref.prompt_token_ids)
    for i, (entry, token) in enumerate(zip(content, ref.token_ids)):
        row = logp[p - 1 + i]
        text, raw = token_text(vlm.tokenizer, token)
        assert entry.token == text and entry.bytes == raw
        assert int(row.argmax()) == token  # greedy: the sampled token is the top-1
        assert math.isclose(entry.logprob, float(row[token]), abs_tol=1e-4)
        top = torch.topk(row, 4)
        assert [t.token for t in entry.top_logprobs][0] == entry.token and len(entry.top_logprobs) == 4
        for alt, value in zip(entry.top_logprobs, top.values.tolist()):
            assert math.isclose(alt.logprob, value, abs_tol=1e-4)
    # streaming chunks carry the same entries; without logprobs the field is null
    chunks = list(client.chat.completions.create(model=NAME, messages=MSG, max_tokens=6, temperature=0,
                                                 logprobs=True, top_logprobs=4, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = client.chat.completions.create(model=NAME, messages=MSG, max_tokens=2)
    assert plain.choices[0].logprobs is None
    usage = plain.usage  # the same prompt again: its full 64-position blocks but the last position are reused
    assert usage.prompt_tokens_details.cached_tokens == (usage.prompt_tokens - 1) // 64 * 64


def _data_url(img) -> str:
    import base64
    import io

    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_prefix_cache_hits_through_the_server_equal_cold_runs(env):
    """Same picture, new question: the server reuses the cached prefix (usage says how much) and answers
    with bitwise the tokens and log-probabilities of a cold in-process run (one thread, as the server)."""
    from PIL import Image

    vlm, client = env["vlm"], env["client"]
    img = Image.new("RGB", (37, 52), (90, 160, 20))
    PREAMBLE = ("Look at the picture carefully, take your time, think about the shapes, the colours, the light and "
                "what might be outside the frame before you answer the question that follows")  # > 64 positions shared

    def msgs(q):
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(img)}},
                                             {"type": "text", "text": PREAMBLE}, {"type": "text", "text": q}]}]

    first = client.chat.completions.create(model=NAME, messages=msgs("What is it?"), max_tokens=5, temperature=0)
    warm = client.chat.completions.create(model=NAME, messages=msgs("Which colour?"), max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        vlm.set_prefix_cache(1.0)  # empty: a cold run
        cold = vlm.chat([{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": PREAMBLE},
                                                      {"type": "text", "text": "Which colour?"}]}],
                        max_new_tokens=5, logprobs=2)
    finally:
        torch.set_num_threads(threads)
    assert cold.timings.cached_tokens == 0
    assert first.usage.prompt_tokens_details.cached_tokens == 0  # a new picture in the first block
    cached = warm.usage.prompt_tokens_details.cached_tokens
    assert cached >= 64 and cached % 64 == 0 and cached < warm.usage.prompt_tokens
    assert warm.usage.prompt_tokens == len(cold.prompt_token_ids) - 1 + vlm.runtime.image_positions()
    assert warm.choices[0].message.content == cold.text
    assert [e.logprob for e in warm.choices[0].logprobs.content] == [e.logprob for e in cold.logprobs]


def test_sampled_logprobs_are_of_the_filtered_distribution(env):
    vlm, client = env["vlm"], env["client"]
    temperature, k = 0.7, 3
    resp = client.chat.completions.create(model=NAME, messages=MSG, max_tokens=1, temperature=temperature,
                                          extra_body={"top_k": k}, seed=3, logprobs=True, top_logprobs=10)
    entry = resp.choices[0].logprobs.content[0]
    prompt_ids = vlm.chat(MSG, max_new_tokens=1).prompt_token_ids
    lm = vlm.model.language_model
    with torch.inference_mode():
        embeds = vlm.model.embed_prompt(prompt_ids, None)
        logits = lm(embeds.unsqueeze(0), torch.arange(len(prompt_ids)).unsqueeze(0),
                    vlm.model.new_cache(1, len(prompt_ids)))[0][:vlm.tokenizer.vocab_size].float()
    top = torch.topk(logits / temperature, k)
    expected = torch.log_softmax(top.values, dim=-1)  # only the top-k survive, renormalized
    assert len(entry.top_logprobs) == k  # filtered-out tokens are never listed
    assert [a.token for a in entry.top_logprobs] == [token_text(vlm.tokenizer, int(i))[0] for i in top.indices]
    for alt, value in zip(entry.top_logprobs, expected.tolist()):
        assert math.isclose(alt.logprob, value, abs_tol=1e-4)
    assert entry.token in [a.token for a in entry.top_logprobs]


def test_n_choices_share_a_prefill_and_are_reproducible_by_seed(env):
    vlm, client = env["vlm"], env["client"]
    kwargs = dict(model=NAME, messages=MSG, max_tokens=8, temperature=1.0, seed=11)
    resp = client.chat.completions.create(**kwargs, n=3)
    texts = [c.message.content for c in resp.choices]
    assert [c.index for c in resp.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert [c.message.content for c in client.chat.completions.create(**kwargs, n=3).choices] == texts
    singles = [client.chat.completions.create(**{**kwargs, "seed": choice_seed(11, i)}) for i in range(3)]
    assert [s.choices[0].message.content for s in singles] == texts  # choice i = a lone request, derived seed
    assert resp.usage.prompt_tokens == singles[0].usage.prompt_tokens  # the prompt counts once
    assert resp.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    python = vlm.chat(MSG, n=3, max_new_tokens=8, temperature=1.0, seed=11)  # the Python API agrees
    assert [g.text for g in python] == texts
    chunks = list(client.chat.completions.create(**kwargs, n=3, stream=True))
    joined = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
              for i in range(3)]
    assert joined == texts
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 3


def test_system_message_replaces_the_template_system_text(env):
    vlm, client, tok = env["vlm"], env["client"], env["vlm"].tokenizer
    system = "You are a pirate who answers in one word."
    for role in ("system", "developer"):
        msgs = [{"role": role, "content": system}, *MSG]
        ref = vlm.chat(msgs, max_new_tokens=6)
        sys_ids = tok.encode(system, add_bos=False)
        assert ref.prompt_token_ids[1:1 + len(sys_ids)] == sys_ids  # right after BOS
        default = vlm.chat(MSG, max_new_tokens=1).prompt_token_ids
        assert default[1:1 + len(sys_ids)] != sys_ids
        resp = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=6)
        assert resp.choices[0].message.content == ref.text
        assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert vlm.generate("Tell me about the sea", system=system, max_new_tokens=6).text == \
        vlm.chat([{"role": "system", "content": system}, *MSG], max_new_tokens=6).text
    for msgs, what in (([{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, *MSG], "at most one"),
                       ([*MSG, {"role": "system", "content": "a"}], "must come first")):
        r = _post(env, {"model": NAME, "messages": msgs, "max_tokens": 2})
        assert r.status_code == 400 and what in r.json()["error"]["message"]


def test_completions_lists_token_ids_and_echo(env):
    vlm, client, tok = env["vlm"], env["client"], env["vlm"].tokenizer
    prompts = ["The quick brown fox", "Once upon a time"]
    kw = dict(model=NAME, max_tokens=5, temperature=1.0, seed=5)
    batch = client.completions.create(prompt=prompts, n=2, **kw)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    for p, prompt in enumerate(prompts):
        for i in range(2):
            alone = client.completions.create(prompt=prompt, **{**kw, "seed": choice_seed(5, i)})
            assert batch.choices[p * 2 + i].text == alone.choices[0].text
    assert batch.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    # token ids are used as given: the text prompt's ids (with BOS) answer as the text does
    ids = tok.encode(prompts[0])
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=5)
    assert by_ids.choices[0].text == client.completions.create(model=NAME, prompt=prompts[0], max_tokens=5).choices[0].text
    two = client.completions.create(model=NAME, prompt=[ids, tok.encode(prompts[1])], max_tokens=5)
    assert [c.text for c in two.choices] == [client.completions.create(model=NAME, prompt=p, max_tokens=5).choices[0].text
                                             for p in prompts]
    # echo + logprobs: the prompt tokens' log-probabilities under the model (likelihood scoring)
    echo = client.completions.create(model=NAME, prompt=prompts[0], max_tokens=1, echo=True, logprobs=2, temperature=0)
    c = echo.choices[0]
    assert c.text.startswith(prompts[0]) and len(c.text) > len(prompts[0])
    lp = c.logprobs
    logp = _model_logprobs(vlm, ids)
    assert lp.tokens[:len(ids) - 1] == [token_text(tok, t)[0] for t in ids[1:]]  # our BOS is not echoed
    for j, t in enumerate(ids[1:]):
        assert math.isclose(lp.token_logprobs[j], float(logp[j, t]), abs_tol=1e-4)
        assert len(lp.top_logprobs[j]) == 2
    assert len(lp.tokens) == len(ids) - 1 + 1 and lp.text_offset[0] == 0
    echo_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=1, echo=True, logprobs=0)
    assert echo_ids.choices[0].logprobs.token_logprobs[0] is None  # the first given token has none
    assert echo_ids.choices[0].logprobs.token_logprobs[1:len(ids)] == lp.token_logprobs[:len(ids) - 1]
    stream = list(client.completions.create(model=NAME, prompt=prompts[0], max_tokens=1, echo=True, stream=True, temperature=0))
    assert "".join(ch.choices[0].text for ch in stream) == c.text


def test_strict_types_and_refusals(env):
    good = {"model": NAME, "messages": MSG, "max_tokens": 2}
    cases = [({**good, "max_tokens": "5"}, "max_tokens"), ({**good, "max_tokens": True}, "max_tokens"),
             ({**good, "stream": "yes"}, "stream"), ({**good, "n": "2"}, "n"), ({**good, "seed": 1.5}, "seed"),
             ({**good, "logprobs": "yes"}, "logprobs"), ({**good, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
             ({**good, "top_logprobs": 2}, "top_logprobs"),
             ({**good, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
             ({**good, "functions": [{"name": "f"}]}, "functions"), ({**good, "tool_choice": "auto"}, "tool_choice"),
             ({**good, "response_format": {"type": "xml"}}, "response_format"),
             ({**good, "response_format": {"type": "json_schema", "json_schema": {}}}, "response_format")]
    for body, param in cases:
        r = _post(env, body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param, (body, r.text)
    comp = {"model": NAME, "prompt": "hi", "max_tokens": 2}
    for body, param in (({**comp, "prompt": "word " * 1100}, "prompt"), ({**comp, "prompt": [5, 99999]}, "prompt"),
                        ({**comp, "prompt": []}, "prompt"), ({**comp, "logprobs": 21}, "logprobs"),
                        ({**comp, "echo": "yes"}, "echo")):
        r = _post(env, body, "/v1/completions")
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    r = _post(env, {**comp, "prompt": ["a", "b", "c"]}, "/v1/completions")  # more prompts than --max-queue
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert _post(env, {**good, "tool_choice": "none"}).status_code == 200  # "no tools" is what we do anyway


def test_json_object_response_format_always_parses(env):
    vlm, client = env["vlm"], env["client"]
    msgs = [{"role": "user", "content": "Describe the sea as a JSON object."}]
    stopped = 0
    for kw in (dict(temperature=0), dict(temperature=1.0, seed=1)):  # this model closes both (34, 74 tokens)
        resp = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=80,
                                              response_format={"type": "json_object"}, **kw)
        choice = resp.choices[0]
        ref = vlm.chat(msgs, max_new_tokens=80, response_format="json_object", **kw)
        assert choice.message.content == ref.text  # the same constrained decoding as the Python API
        if choice.finish_reason == "stop":
            stopped += 1
            assert isinstance(json.loads(choice.message.content), dict)
        else:
            assert accepts_prefix(choice.message.content)
    assert stopped >= 1
    assert "grammar" in _post(env, {"model": NAME, "messages": msgs, "response_format": {"type": "json_schema"}}) \
        .json()["error"]["message"]


def _metric(env, name):
    text = httpx.get(env["base"] + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def _wait(cond, timeout=60):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end
        time.sleep(0.05)


def _long_stream(env):
    cm = httpx.stream("POST", env["base"] + "/v1/completions", timeout=120, headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": NAME, "prompt": "keep going", "max_tokens": 1000, "stream": True})
    return cm, cm.__enter__()


def test_rejections_are_counted(env):
    before = _metric(env, "gracevlm_requests_rejected_total")
    streams = [_long_stream(env) for _ in range(SLOTS)]
    _wait(lambda: _metric(env, "gracevlm_active_slots") == SLOTS)
    waiting = {}
    t = threading.Thread(target=lambda: waiting.update(r=_post(env, {"model": NAME, "prompt": ["x", "y"],
                                                                     "max_tokens": 2}, "/v1/completions")))
    t.start()
    _wait(lambda: _metric(env, "gracevlm_queue_depth") == 2)  # a list of two prompts takes two places
    refused = [_post(env, {"model": NAME, "prompt": "x", "max_tokens": 2}, "/v1/completions") for _ in range(2)]
    refused.append(_post(env, {"model": NAME, "messages": MSG, "max_tokens": 2}))
    assert [r.status_code for r in refused] == [429, 429, 429]
    assert _metric(env, "gracevlm_requests_rejected_total") == before + 3
    for cm, _ in streams:
        cm.__exit__(None, None, None)
    t.join(120)
    assert waiting["r"].status_code == 200
    _wait(lambda: _metric(env, "gracevlm_active_slots") == 0)


def test_sigterm_ends_streams_with_an_error_event_and_done(env):
    """Runs last: SIGTERM while two long streams run; each ends with [DONE] (after a finish chunk, or an
    error event when the grace period ran out), never a cut connection; the server exits cleanly."""
    streams = [(cm, resp.iter_lines()) for cm, resp in (_long_stream(env) for _ in range(2))]
    for _, lines in streams:
        next(lines)  # generating
    env["proc"].send_signal(signal.SIGTERM)
    for cm, rest in streams:
        lines = [line for line in rest if line]
        cm.__exit__(None, None, None)
        assert lines[-1] == "data: [DONE]", lines[-3:]
        last = json.loads(lines[-2][6:])
        if "error" in last:
            assert last["error"]["code"] == "shutting_down" and last["error"]["type"] == "server_error"
        else:
            assert last["choices"][0]["finish_reason"] == "length"
    assert env["proc"].wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it is done
    assert "Traceback" not in env["log"].read_text()
