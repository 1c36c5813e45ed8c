"""The continuous-batching scheduler, in process: batch invariance, streaming, cancellation, queueing,
timeouts, and failures that stay inside one request."""
import threading
import time

import pytest
import torch
from PIL import Image

from gracevlm.engine.generate import PromptTooLong
from gracevlm.engine.sampling import SamplingParams
from gracevlm.engine.prepare import prepare_chat, prepare_text
from gracevlm.engine.scheduler import BatchScheduler, QueueFull, SchedulerClosed
from gracevlm.engine.vlm import load
from gracevlm.errors import InputError

N = 16


@pytest.fixture(scope="module")
def vlm(tiny_awq):
    return load(tiny_awq,
                device="cpu")


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (64, 40), (200, 30, 30)), Image.new("RGB", (30, 50), (20, 130, 30))]


PROMPTS = [("Hi", 0), ("Describe the image please", 1), ("What is this?", 2), ("Tell me a long story", 0),
           ("a", 0), ("Two images", 3), ("Count the things", 1), ("zzz qqq", 0)]


def _images_for(kind, images):
    return {0: [], 1: [images[0]], 2: [images[1]], 3: images}[kind]


def _messages(text, imgs):
    return [{"role": "user", "content": [*({"type": "image", "image": i} for i in imgs),
                                         {"type": "text", "text": text}]}]


def _collect(handle):
    deltas = list(handle)
    return deltas, handle.result(30)


@pytest.fixture(scope="module")
def refs(vlm, images):
    return [vlm.generate(t, images=_images_for(k, images), max_new_tokens=N) for t, k in PROMPTS]


def _submit_all(sched, images):
    return [sched.submit_chat(_messages(t, _images_for(k, images)), SamplingParams(max_new_tokens=N))
            for t, k in PROMPTS]


def test_concurrent_greedy_equals_sequential_and_generate(vlm, images, refs):
    with BatchScheduler(vlm, max_batch_size=8) as sched:
        batched = [_collect(h) for h in _submit_all(sched, images)]
        assert sched.stats()["decode_steps"] < len(PROMPTS) * N  # the requests shared decode steps
        sequential = [sched.submit_chat(_messages(t, _images_for(k, images)),
                                        SamplingParams(max_new_tokens=N)).result(30) for t, k in PROMPTS]
    for ref, (deltas, gen), seq in zip(refs, batched, sequential):
        assert gen.token_ids == seq.token_ids == ref.token_ids
        assert gen.text == seq.text == ref.text == "".join(deltas)
        assert gen.finish_reason == ref.finish_reason
        assert gen.prompt_token_ids == ref.prompt_token_ids


def test_chunked_prefill_batched(vlm, images, refs):
    """Chunks of 7 positions interleaved with decode steps; three slots for eight requests (``prefill_chunk``
    applies with the prefix cache off; with it on, chunks are its blocks)."""
    vlm.set_prefix_cache(0)
    try:
        with BatchScheduler(vlm, max_batch_size=3, prefill_chunk=7) as sched:
            batched = [_collect(h) for h in _submit_all(sched, images)]
            assert sched.stats()["prefill_chunks"] > len(PROMPTS)
    finally:
        vlm.set_prefix_cache()
    for ref, (deltas, gen) in zip(refs, batched):
        assert gen.token_ids == ref.token_ids and gen.text == "".join(deltas) == ref.text


def test_seeded_sampling_and_stop_strings_match_generate(vlm):
    base = vlm.generate("Tell me a story", max_new_tokens=20)
    stop = base.text[5:8]
    assert stop.strip()
    kwargs = [dict(max_new_tokens=20, temperature=0.9, top_p=0.9, seed=s) for s in (1, 2, 3)]
    kwargs.append(dict(max_new_tokens=20, stop=[stop]))
    refs = [vlm.generate("Tell me a story", **kw) for kw in kwargs]
    assert refs[-1].finish_reason == "stop" and stop not in refs[-1].text
    with BatchScheduler(vlm, max_batch_size=4) as sched:
        prep = prepare_chat(vlm, [{"role": "user", "content": "Tell me a story"}])
        handles = [sched.submit_prepared(prep, SamplingParams(**kw)) for kw in kwargs]
        for ref, h in zip(refs, handles):
            deltas, gen = _collect(h)
            assert (gen.token_ids, gen.text, gen.finish_reason) == (ref.token_ids, ref.text, ref.finish_reason)
            assert "".join(deltas) == gen.text
            assert h.prompt_tokens == len(ref.prompt_token_ids)  # text only: positions == ids
            assert h.completion_tokens == len(gen.token_ids)


@pytest.mark.parametrize("backend", ["auto", "int4pack"])
def test_decode_forward_is_bitwise_a_lone_sequence(vlm, backend, request):
    """The batch-invariant decode step gives each row the logits the model computes for it alone (with the
    row-invariant CPU INT4 kernels: native below its GEMM crossover, int4pack)."""
    from gracevlm import kernels

    if backend == "auto" and kernels.select_backend(torch.device("cpu"), 4).name not in ("native", "native-igemm"):
        pytest.skip("the native kernels are not available here")
    kernels.use_backend(vlm.model, backend)
    request.addfinalizer(lambda: kernels.use_backend(vlm.model, None))
    lm, tok = vlm.model.language_model, vlm.tokenizer
    prompts = [tok.encode(p) for p in ("Hi there", "a much longer prompt with many words", "x", "medium one")]
    with torch.inference_mode():
        shared = vlm.model.new_cache(4, 64)  # four slots, as a scheduler's
        nxt, pos = [], []
        for slot, ids in enumerate(prompts):
            logits = lm(lm.embed(torch.tensor([ids]), torch.float32), torch.arange(len(ids)).unsqueeze(0),
                        shared, torch.tensor([slot]))
            nxt.append(int(logits[0].argmax()))
            pos.append(len(ids))
        batched = vlm.model.forward_decode(torch.tensor(nxt), torch.tensor(pos), torch.zeros(4, dtype=torch.long),
                                           shared, torch.arange(4), rows_alone=True)
        for r, ids in enumerate(prompts):
            cache = vlm.model.new_cache(1, 64)
            lm(lm.embed(torch.tensor([ids]), torch.float32), torch.arange(len(ids)).unsqueeze(0), cache)
            alone = lm(lm.embed(torch.tensor([[nxt[r]]]), torch.float32), torch.tensor([[pos[r]]]), cache)
            assert torch.equal(alone[0], batched[r])


def _busy(sched, vlm, n=1000):
    """A request that keeps its slot busy until cancelled."""
    return sched.submit(prepare_text(vlm, "keep going").prompt_ids, None, SamplingParams(max_new_tokens=n))


def _wait_for(cond, timeout=20.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.005)


def test_cancel_frees_the_slot_and_queue_full(vlm):
    with BatchScheduler(vlm, max_batch_size=1, max_queue=2, max_model_len=1024) as sched:
        busy = _busy(sched, vlm)
        _wait_for(lambda: sched.stats()["active_slots"] == 1)
        queued = [_busy(sched, vlm, 5) for _ in range(2)]
        assert sched.stats()["queue_depth"] == 2
        with pytest.raises(QueueFull):
            _busy(sched, vlm, 5)
        assert sched.stats()["rejected"] == 1
        queued[1].cancel()  # cancelled while waiting: never runs
        busy.cancel()
        assert busy.result(10).finish_reason == "cancelled"
        assert queued[1].result(10).finish_reason == "cancelled" and queued[1].completion_tokens == 0
        assert queued[0].result(10).finish_reason in ("length", "stop")
        _wait_for(lambda: sched.stats()["active_slots"] == 0)
        stats = sched.stats()
        assert stats["finished_cancelled"] == 2 and stats["queue_depth"] == 0


def test_timeout(vlm):
    with BatchScheduler(vlm, max_batch_size=2, max_model_len=1024, request_timeout=0.2) as sched:
        h = _busy(sched, vlm)
        gen = h.result(10)
        assert gen.finish_reason == "timeout" and 0 < len(gen.token_ids) < 1000
        assert "".join(h) == gen.text
        quick = sched.submit(prepare_text(vlm, "hi").prompt_ids, None, SamplingParams(max_new_tokens=3), timeout=30)
        assert quick.result(10).finish_reason in ("length", "stop")


def test_bad_requests_fail_alone(vlm, images):
    with BatchScheduler(vlm, max_batch_size=4, max_model_len=256) as sched:
        good = sched.submit_chat(_messages("Describe", [images[0]]), SamplingParams(max_new_tokens=30))
        prep = prepare_chat(vlm, _messages("Describe", [images[0]]))
        # refused at submit: wrong feature shape, wrong image count, prompt longer than max_model_len
        with pytest.raises(InputError, match="image features"):
            sched.submit(prep.prompt_ids, prep.image_features[..., :7], SamplingParams())
        with pytest.raises(InputError, match="image positions"):
            sched.submit(prep.prompt_ids, None, SamplingParams())
        with pytest.raises(PromptTooLong):
            sched.submit(vlm.tokenizer.encode("word " * 400), None, SamplingParams())
        # fails inside the model thread (NaN features -> NaN logits): only that request fails
        bad = sched.submit(prep.prompt_ids, torch.full_like(prep.image_features, float("nan")),
                           SamplingParams(max_new_tokens=30))
        with pytest.raises(FloatingPointError):
            bad.result(10)
        with pytest.raises(FloatingPointError):
            list(bad)
        ref = vlm.generate("Describe", images=[images[0]], max_new_tokens=30)
        assert good.result(10).token_ids == ref.token_ids
        assert sched.stats()["failed"] == 1 and sched.stats()["active_slots"] == 0
        after = sched.submit_prepared(prep, SamplingParams(max_new_tokens=30))
        assert after.result(10).token_ids == ref.token_ids


def test_drain_waker_and_shutdown(vlm):
    sched = BatchScheduler(vlm, max_batch_size=2, max_model_len=1024)
    woke = threading.Event()
    h = sched.submit(prepare_text(vlm, "hello").prompt_ids, None, SamplingParams(max_new_tokens=8), waker=woke.set)
    assert woke.wait(10)
    text, ended = "", False
    while not ended:
        deltas, ended = h.drain()
        text += "".join(deltas)
        time.sleep(0.001)
    assert text == h.result(1).text
    busy = _busy(sched, vlm)
    _wait_for(lambda: sched.stats()["active_slots"] == 1)
    sched.shutdown()
    with pytest.raises(SchedulerClosed):
        busy.result(10)
    with pytest.raises(SchedulerClosed):
        sched.submit([1, 2], None, SamplingParams())
    with pytest.raises(InputError):
        BatchScheduler(vlm, max_batch_size=0)
