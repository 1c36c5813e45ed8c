"""Paged KV memory: one byte budget (``KVPool``) for live requests and the prefix cache; memory follows the
tokens in use; admission queues what does not fit now and refuses what never can; outputs stay exact."""
import threading
import time

import pytest
from PIL import Image

from gracevlm.engine.kv_slots import KVBudgetExceeded
from gracevlm.engine.sampling import SamplingParams
from gracevlm.engine.scheduler import BatchScheduler
from gracevlm.engine.vlm import load
from gracevlm.models.kv_cache import KVPool, KVPoolFull

GIB = 1 << 30


@pytest.fixture(scope="module")
def vlm(tiny_awq):
    return load(tiny_awq, device="cpu")


@pytest.fixture(scope="module")
def per_pos(vlm):
    return vlm.model.new_cache(1, 1).bytes_per_position  # tiny LLaVA: 2 layers x 2 x kv heads x head_dim x 4


def _messages(text, imgs=()):
    return [{"role": "user", "content": [*({"type": "image", "image": i} for i in imgs),
                                         {"type": "text", "text": text}]}]


RED, GREEN = Image.new("RGB", (64, 40), (200, 30, 30)), Image.new("RGB", (30, 50), (20, 130, 30))
# (prompt, images, max_tokens): varied prompt and output lengths
LOAD = [("Hi", (), 12), ("Describe the image please", (RED,), 20), ("What is this?", (GREEN,), 5),
        ("Tell me a long story about the sea and the ships on it", (), 30), ("a", (), 3),
        ("Two images", (RED, GREEN), 16), ("Count the things", (RED,), 9), ("zzz qqq", (), 25),
        ("Hi", (), 7), ("one more question about nothing", (), 18), ("What colour?", (GREEN,), 11),
        ("short", (), 2)]


def _watch(sched, vlm, log):
    """Check the pool after every prefill and decode step of the scheduler's model thread: in use <= budget,
    and the ledger equals the bytes really held (slot storage + prefix cache)."""
    pool = sched.cache.pool

    def wrap(step):
        def checked():
            step()
            held = sched.cache.nbytes() + vlm.prefix_cache.nbytes
            log.append((pool.in_use, held, len(sched._pending), len(sched._running)))
        return checked

    sched._prefill_step = wrap(sched._prefill_step)
    sched._decode_step = wrap(sched._decode_step)


def test_pool_ledger_reclaims_and_never_exceeds():
    pool = KVPool(1000, block_tokens=4)
    freed = []
    pool.add_reclaimer(lambda n: (freed.append(n), pool.release(n) or n)[1] if pool.in_use >= n else 0)
    assert pool.reserve(600) and pool.in_use == 600
    assert pool.reserve(700) and freed == [300] and pool.in_use == 1000  # the reclaimer gave back 300
    assert not pool.reserve(2000)  # more than the budget: refused without asking anyone
    assert pool.peak_bytes == 1000
    with pytest.raises(RuntimeError, match="releasing"):
        pool.release(5000)


def test_memory_follows_tokens(vlm, per_pos):
    """8 slots x the full context used to be allocated up front; now a short request holds only its blocks."""
    vlm.set_kv_cache(1.0)
    vlm.set_prefix_cache(0)
    try:
        with BatchScheduler(vlm, max_batch_size=8) as sched:
            assert sched.cache.nbytes() == 0 and sched.stats()["kv_pool_bytes"] == 0
            log = []
            _watch(sched, vlm, log)
            gen = sched.submit_chat(_messages("Hi"), SamplingParams(max_new_tokens=4)).result(30)
            positions = len(gen.prompt_token_ids) + 4
            full = 8 * sched.max_model_len * per_pos
            peak = max(used for used, *_ in log)
            assert peak == -(-positions // 16) * 16 * per_pos  # one request's blocks, rounded up to 16 positions
            assert peak * 100 < full
            assert sched.stats()["kv_pool_bytes"] == 0  # given back when it ended
    finally:
        vlm.set_kv_cache(None)
        vlm.set_prefix_cache(2.0)


def _alone(vlm, text, imgs, n):
    return vlm.chat(_messages(text, imgs), max_new_tokens=n)


def test_concurrent_load_never_exceeds_budget_and_batched_equals_alone(vlm, per_pos):
    """Twelve requests of varied lengths through the real BatchScheduler with room for about three at a time
    (eight slots): the pool is checked after every step, requests queue for memory, all finish, and every
    greedy answer is the one the request gets alone (prefix cache on, so its blocks share the pool)."""
    vlm.set_kv_cache(1.0)
    vlm.set_prefix_cache(1.0, block_tokens=16)
    refs = [_alone(vlm, t, i, n) for t, i, n in LOAD]
    budget = 3 * 96 * per_pos
    vlm.set_kv_cache(budget / GIB)
    try:
        with BatchScheduler(vlm, max_batch_size=8) as sched:
            log = []
            _watch(sched, vlm, log)
            handles = [sched.submit_chat(_messages(t, i), SamplingParams(max_new_tokens=n)) for t, i, n in LOAD]
            gens = [h.result(60) for h in handles]
            stats = sched.stats()
        assert all(used <= budget and used == held for used, held, *_ in log)
        assert max(active for *_, active in log) < 8  # memory, not slots, bounded the batch
        assert max(active for *_, active in log) >= 2  # and several requests still ran together
        assert stats["kv_pool_peak_bytes"] <= budget == stats["kv_pool_budget_bytes"]
        for ref, gen in zip(refs, gens):
            assert gen.token_ids == ref.token_ids and gen.text == ref.text
    finally:
        vlm.set_kv_cache(None)
        vlm.set_prefix_cache(2.0)


def test_waits_in_queue_until_space_frees(vlm, per_pos):
    vlm.set_prefix_cache(0)
    params = SamplingParams(max_new_tokens=50)
    ref = _alone(vlm, "keep going", (), 50)
    assert ref.timings.prefill_tokens + 50 <= 96
    vlm.set_kv_cache(96 * per_pos / GIB)  # one such request at a time
    try:
        with BatchScheduler(vlm, max_batch_size=4) as sched:
            log = []
            _watch(sched, vlm, log)
            first = sched.submit_chat(_messages("keep going"), params)
            second = sched.submit_chat(_messages("keep going"), params)
            a, b = first.result(30), second.result(30)
        assert (96 * per_pos, 96 * per_pos, 1, 1) in log  # one running, one queued although 3 slots were free
        assert max(running for *_, running in log) == 1
        assert a.token_ids == b.token_ids == ref.token_ids
        assert all(used <= 96 * per_pos for used, *_ in log)
    finally:
        vlm.set_kv_cache(None)
        vlm.set_prefix_cache(2.0)


def test_impossible_request_is_refused_with_the_numbers(vlm, per_pos):
    vlm.set_kv_cache(64 * per_pos / GIB)
    try:
        with BatchScheduler(vlm, max_batch_size=4) as sched:
            with pytest.raises(KVBudgetExceeded, match=r"needs [\d.]+ MiB of KV cache \(\d+ positions .* holds "
                                                       r"0\.1 MiB in all \(--kv-cache-gib\)"):
                sched.submit_chat(_messages("Hi"), SamplingParams(max_new_tokens=100))
            with pytest.raises(KVBudgetExceeded, match="3 choices x"):
                sched.submit_prepared_choices(_prepared(vlm, "Hi"), SamplingParams(max_new_tokens=20), 3)
            assert sched.submit_chat(_messages("Hi"), SamplingParams(max_new_tokens=8)).result(30).token_ids
        with pytest.raises(KVBudgetExceeded):
            vlm.generate("Hi", max_new_tokens=100)
        assert vlm.kv_pool.in_use == vlm.prefix_cache.nbytes  # nothing leaked by the refusals
    finally:
        vlm.set_kv_cache(None)


def _prepared(vlm, text):
    from gracevlm.engine.prepare import prepare_chat

    return prepare_chat(vlm, _messages(text))


def test_lone_generate_is_told_when_the_pool_is_held(vlm, per_pos):
    vlm.set_kv_cache(64 * per_pos / GIB)
    try:
        vlm.set_prefix_cache(0)
        held = vlm.model.new_cache(1, 64, pool=vlm.kv_pool)
        assert held.allocate(0, 64)
        with pytest.raises(KVPoolFull, match="in use"):
            vlm.generate("Hi", max_new_tokens=8)
        held.free(0)
        assert vlm.generate("Hi", max_new_tokens=8).token_ids and vlm.kv_pool.in_use == 0
    finally:
        vlm.set_kv_cache(None)
        vlm.set_prefix_cache(2.0)


def test_cached_blocks_are_evicted_under_pressure_and_hits_stay_exact(vlm, per_pos):
    """The prefix cache fills the pool; live requests evict its blocks (LRU) instead of waiting; a later hit
    on what is still cached, and a re-run of what was evicted, give the cold run's tokens."""
    long_a = "You are a careful assistant. " * 6 + "Describe the picture."
    long_b = "Answer every question briefly and truthfully. " * 5 + "What is it?"
    vlm.set_kv_cache(1.0)
    vlm.set_prefix_cache(1.0, block_tokens=16)
    cold_a = _alone(vlm, long_a, (RED,), 8)
    cold_b = _alone(vlm, long_b, (GREEN,), 8)
    vlm.set_kv_cache(256 * per_pos / GIB)  # room for ~2 requests; cached blocks compete for it
    try:
        with BatchScheduler(vlm, max_batch_size=4) as sched:
            log = []
            _watch(sched, vlm, log)
            first = sched.submit_chat(_messages(long_a, (RED,)), SamplingParams(max_new_tokens=8)).result(30)
            assert sched.stats()["prefix_cache_blocks"] > 0
            hit = sched.submit_chat(_messages(long_a, (RED,)), SamplingParams(max_new_tokens=8)).result(30)
            assert hit.timings.cached_tokens > 0
            others = [sched.submit_chat(_messages(long_b, (GREEN,)), SamplingParams(max_new_tokens=8)),
                      sched.submit_chat(_messages("Hi there", ()), SamplingParams(max_new_tokens=60))]
            b, _ = [h.result(30) for h in others]
            again = sched.submit_chat(_messages(long_a, (RED,)), SamplingParams(max_new_tokens=8)).result(30)
            stats = sched.stats()
        assert stats["prefix_cache_evictions"] > 0
        assert all(used <= vlm.kv_pool.budget_bytes and used == held for used, held, *_ in log)
        assert first.token_ids == hit.token_ids == again.token_ids == cold_a.token_ids
        assert b.token_ids == cold_b.token_ids
    finally:
        vlm.set_kv_cache(None)
        vlm.set_prefix_cache(2.0)


def test_server_concurrent_clients_stay_in_budget(vlm, per_pos):
    """A few concurrent HTTP clients against a small pool: every answer is 200 and equals the lone one, the
    pool never exceeds its budget, /metrics and /health report it, and the impossible request is a 400."""
    from starlette.testclient import TestClient

    from gracevlm.server.app import create_app
    from gracevlm.server.serving import ServerConfig

    vlm.set_prefix_cache(0)
    questions = [("Hi", 10), ("What is the weather like", 20), ("a", 5), ("Tell me more", 15), ("ok", 8)]
    refs = [_alone(vlm, q, (), n) for q, n in questions]
    budget = 2 * 64 * per_pos
    app = create_app(ServerConfig(model="m", kv_cache_gib=budget / GIB, max_batch_size=4),
                     loader=lambda c: load_with_pool(vlm, c))
    with TestClient(app, raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        results = [None] * len(questions)

        def ask(i, q, n):
            results[i] = client.post("/v1/chat/completions", json={
                "model": "m", "messages": [{"role": "user", "content": q}], "max_tokens": n})

        threads = [threading.Thread(target=ask, args=(i, q, n)) for i, (q, n) in enumerate(questions)]
        peak_seen = []
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak_seen.append(vlm.kv_pool.in_use)
            time.sleep(0.001)
        for t in threads:
            t.join()
        for r, ref in zip(results, refs):
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == ref.text
        too_big = client.post("/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 500})
        assert too_big.status_code == 400
        err = too_big.json()["error"]
        assert err["code"] == "kv_cache_exceeded" and "MiB" in err["message"] and "--kv-cache-gib" in err["message"]
        metrics = client.get("/metrics").text
        health = client.get("/health").json()
    assert max(peak_seen) <= budget and vlm.kv_pool.peak_bytes <= budget
    assert f"gracevlm_kv_pool_budget_bytes {budget}" in metrics and "gracevlm_kv_pool_bytes 0" in metrics
    assert health["kv"]["kv_pool_budget_bytes"] == budget and health["kv"]["kv_pool_bytes"] == 0
    vlm.set_kv_cache(None)
    vlm.set_prefix_cache(2.0)


def load_with_pool(vlm, config):
    """The server's loader for an already loaded model: the pool the config asks for."""
    vlm.set_kv_cache(config.kv_cache_gib)
    return vlm


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from gracevlm.synth.qwen3_vl import synthesize_qwen3_vl

    path = synthesize_qwen3_vl(tmp_path_factory.mktemp("qwen-kv") / "m", "qwen3-vl-tiny", "awq", seed=3,
                               progress=False)
    return load(path, device="cpu", prefix_cache_gib=0)


def test_qwen3_vl_concurrent_load_in_a_small_pool(qwen):
    per_pos = qwen.model.new_cache(1, 1).bytes_per_position
    load_ = [("Describe the image please", (RED,), 10), ("Hi", (), 14), ("What is this?", (GREEN,), 6),
             ("Tell me a story", (), 12), ("Two", (RED, GREEN), 8)]
    refs = [_alone(qwen, t, i, n) for t, i, n in load_]
    needs = sorted(-(-(r.timings.prefill_tokens + n) // 16) * 16 * per_pos for r, (_, _, n) in zip(refs, load_))
    budget = 2 * needs[-1]  # the largest request twice over: never all five at once
    fit = max(k for k in range(1, len(needs) + 1) if sum(needs[:k]) <= budget)
    qwen.set_kv_cache(budget / GIB)
    try:
        with BatchScheduler(qwen, max_batch_size=4, max_model_len=512) as sched:
            log = []
            _watch(sched, qwen, log)
            gens = [h.result(60) for h in
                    [sched.submit_chat(_messages(t, i), SamplingParams(max_new_tokens=n)) for t, i, n in load_]]
        assert all(used <= budget and used == held for used, held, *_ in log)
        assert 2 <= max(active for *_, active in log) <= fit < len(load_)
        for ref, gen in zip(refs, gens):
            assert gen.token_ids == ref.token_ids
        with pytest.raises(KVBudgetExceeded):
            qwen.generate("Hi", max_new_tokens=500)
    finally:
        qwen.set_kv_cache(None)
