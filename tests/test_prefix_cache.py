"""Exact prefix caching: hits give bitwise the logits and tokens of a cold run (Python API, scheduler),
content keys for images, LRU eviction under a budget."""
import io

import pytest
import torch
from PIL import Image

from gracevlm.engine.prefix_cache import PrefixCache, PrefixPlan, block_keys, image_key, prefill_chunks
from gracevlm.models.llava.model import EmbeddedPrompt
from gracevlm.engine.prepare import prepare_prompt
from gracevlm.engine.sampling import SamplingParams
from gracevlm.engine.scheduler import BatchScheduler
from gracevlm.engine.vlm import load
from gracevlm.errors import InputError

N = 8


@pytest.fixture(scope="module")
def vlm(tiny_awq):
    return load(tiny_awq, device="cpu")


def _img(color, size=(48, 40)):
    return Image.new("RGB", size, color)


def _png(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _bmp(img):
    buf = io.BytesIO()
    img.save(buf, "BMP")
    return buf.getvalue()


def _fresh(vlm, gib=1.0, block=16):
    vlm.set_prefix_cache(gib, block_tokens=block)
    return vlm.prefix_cache


def test_block_keys_chain_and_image_positions():
    a, b = b"A" * 16, b"B" * 16
    k1 = block_keys([1, 2, -200, 3, 4], [a], 10, 4)  # 14 positions -> 3 full blocks
    assert len(k1) == 3 and len(set(k1)) == 3
    assert block_keys([1, 2, -200, 3, 4], [a], 10, 4) == k1
    k2 = block_keys([1, 2, -200, 3, 4], [b], 10, 4)
    assert k2[0] != k1[0]  # the image starts inside block 0
    k3 = block_keys([1, 2, -200, 3, 5], [a], 10, 4)
    assert k3[:3] == k1[:3]  # a change in the partial tail leaves full blocks alone
    assert block_keys([9, 2, -200, 3, 4], [a], 10, 4)[2] != k1[2]  # the chain carries the first block
    with pytest.raises(ValueError):
        block_keys([1, -200], [], 10, 4)


def test_image_key_is_content_not_encoding(vlm):
    red, green = _img((200, 30, 30)), _img((20, 130, 30))
    keys = [image_key(p) for p in vlm.runtime.preprocess([red, _png(red), _bmp(red), green])]
    assert keys[0] == keys[1] == keys[2] != keys[3]


def test_generate_hits_are_bitwise_cold_runs(vlm):
    """Same image, new question: the cached prefix is reused, tokens and logprobs equal a cold run's."""
    img = _img((200, 30, 30))
    kw = dict(max_new_tokens=N, logprobs=3)
    _fresh(vlm)
    first = vlm.generate("Describe the image", images=[img], **kw)
    assert first.timings.cached_tokens == 0
    warm = vlm.generate("What colour is it?", images=[_png(img)], **kw)
    _fresh(vlm)
    cold = vlm.generate("What colour is it?", images=[img], **kw)
    length = len(cold.prompt_token_ids) - 1 + vlm.runtime.image_positions()
    assert warm.timings.cached_tokens > 0 and cold.timings.cached_tokens == 0
    assert warm.timings.cached_tokens % vlm.prefix_cache.block_tokens == 0
    assert warm.timings.prefill_tokens == length - warm.timings.cached_tokens
    assert cold.timings.prefill_tokens == length
    assert warm.token_ids == cold.token_ids and warm.text == cold.text
    assert [(e.token_id, e.logprob, e.top) for e in warm.logprobs] == [(e.token_id, e.logprob, e.top) for e in cold.logprobs]
    again = vlm.generate("What colour is it?", images=[img], **kw)  # whole prompt cached but its last position
    assert again.timings.prefill_tokens >= 1 and again.token_ids == cold.token_ids
    stats = vlm.prefix_cache.stats()
    assert stats["image_feature_hits"] >= 1 and stats["prefix_cache_block_hits"] >= 1


def test_chunked_prefill_logits_bitwise(vlm):
    """At the model: the logits after a partial hit are bitwise those of the cold (empty cache) prefill."""
    lm = vlm.model.language_model
    torch.manual_seed(3)
    embeds = torch.randn(150, lm.spec.hidden_size)
    ids = list(range(1, 151))
    cache = PrefixCache(1 << 30, 32)
    with torch.inference_mode():
        cold_kv = vlm.model.new_cache(1, 160)
        cold = prefill_chunks(vlm.model, EmbeddedPrompt(embeds), cold_kv, 0,
                              PrefixPlan(cache, block_keys(ids, None, 0, 32), 150))
        assert len(cache.stats()) and cache.stats()["prefix_cache_blocks"] == 4
        warm_kv = vlm.model.new_cache(1, 160)
        plan = PrefixPlan(cache, block_keys(ids, None, 0, 32), 150)
        assert plan.cached == 128
        warm = prefill_chunks(vlm.model, EmbeddedPrompt(embeds), warm_kv, 0, plan)
    assert torch.equal(cold, warm)
    assert torch.equal(cold_kv.read_block(0, 0, 150), warm_kv.read_block(0, 0, 150))


def test_chunks_without_logits_fill_the_same_cache(vlm):
    """``logits_for="none"`` (what ``prefill_chunks`` asks of every chunk but the last) skips the final norm
    and lm_head and returns None; the cache it fills is bitwise that of a chunk asked for its logits."""
    lm = vlm.model.language_model
    torch.manual_seed(4)
    prompt = EmbeddedPrompt(torch.randn(40, lm.spec.hidden_size))
    with torch.inference_mode():
        kv_last, kv_none = vlm.model.new_cache(1, 48), vlm.model.new_cache(1, 48)
        for kv, mode in ((kv_last, "last"), (kv_none, "none")):
            out = vlm.model.forward_prompt(prompt, kv, 0, 0, 32, logits_for=mode)
            assert (out is None) == (mode == "none")
            tail = vlm.model.forward_prompt(prompt, kv, 0, 32, 40)
            if mode == "last":
                ref_tail = tail
    assert torch.equal(tail, ref_tail)
    assert torch.equal(kv_last.read_block(0, 0, 40), kv_none.read_block(0, 0, 40))


def test_two_images_same_size_never_collide(vlm):
    red, green = _img((200, 30, 30)), _img((20, 130, 30))
    kw = dict(max_new_tokens=N, logprobs=2)
    _fresh(vlm)
    vlm.generate("What is this?", images=[red], **kw)
    warm_green = vlm.generate("What is this?", images=[green], **kw)
    before = warm_green.prompt_token_ids.index(-200)  # only the full blocks of text before the image can hit
    assert warm_green.timings.cached_tokens == before // 16 * 16
    _fresh(vlm)
    cold_green = vlm.generate("What is this?", images=[green], **kw)
    assert warm_green.token_ids == cold_green.token_ids
    assert [e.logprob for e in warm_green.logprobs] == [e.logprob for e in cold_green.logprobs]


def test_eviction_under_a_tiny_budget(vlm):
    lm = vlm.model.language_model
    s = lm.spec
    block_bytes = s.num_layers * 2 * s.num_kv_heads * 16 * s.head_dim * 4
    cache = _fresh(vlm, gib=3.5 * block_bytes / (1 << 30), block=16)
    texts = ["one two three four five six seven eight nine ten eleven twelve",
             "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"]
    kw = dict(max_new_tokens=4, logprobs=1)
    cold = []
    for t in texts:
        cold.append(vlm.generate(t, **kw))
        assert cache.nbytes <= cache.budget_bytes
    assert cache.stats()["prefix_cache_evictions"] > 0
    for t, ref in zip(texts, cold):
        g = vlm.generate(t, **kw)
        assert cache.nbytes <= cache.budget_bytes
        assert g.token_ids == ref.token_ids and [e.logprob for e in g.logprobs] == [e.logprob for e in ref.logprobs]
    _fresh(vlm)


def test_disabled_cache_is_the_one_shot_prefill(vlm):
    _fresh(vlm, gib=0)
    g = vlm.generate("Hello there", max_new_tokens=3)
    assert g.timings.cached_tokens == 0 and g.timings.prefill_tokens == len(g.prompt_token_ids)
    with pytest.raises(InputError):
        vlm.set_prefix_cache(-1)
    _fresh(vlm)


def test_scheduler_shares_the_cache_and_is_exact(vlm):
    """Across requests and slots: hits report cached_tokens, answers equal ``VLM.generate`` cold runs."""
    img = _img((40, 40, 200))
    questions = ["What is this?", "Describe the colours", "Is there a cat?", "Count the objects"]
    params = SamplingParams(max_new_tokens=N, logprobs=2)
    refs = []
    for q in questions:
        _fresh(vlm)
        refs.append(vlm.generate(q, images=[img], max_new_tokens=N, logprobs=2))
    _fresh(vlm)
    with BatchScheduler(vlm, max_batch_size=3) as sched:
        first = sched.submit_prepared(prepare_prompt(vlm, questions[0], [img]), params).result(60)
        handles = [sched.submit_prepared(prepare_prompt(vlm, q, [_png(img)]), params) for q in questions[1:]]
        gens = [first] + [h.result(60) for h in handles]
        stats = sched.stats()
    assert first.timings.cached_tokens == 0
    assert all(g.timings.cached_tokens > 0 for g in gens[1:])
    for g, ref in zip(gens, refs):
        assert g.token_ids == ref.token_ids
        assert [e.logprob for e in g.logprobs] == [e.logprob for e in ref.logprobs]
    assert stats["prefix_cache_block_hits"] > 0 and stats["prefix_cache_bytes"] <= stats["prefix_cache_budget_bytes"]


def test_kv_dtype_half_stores_half_and_stays_close(vlm):
    """``kv_dtype``: caches in half dtypes take half the bytes, the logits stay close to fp32 K/V, and
    prefix hits stay exact in that dtype."""
    img = _img((120, 60, 200))
    kw = dict(max_new_tokens=4, logprobs=1)
    vlm.set_kv_dtype(None)
    ref = vlm.generate("Which colour?", images=[img], **kw)
    assert vlm.model.new_cache(1, 8).nbytes() == 2 * (vlm.set_kv_dtype("bfloat16") or vlm.model.new_cache(1, 8).nbytes())
    try:
        for name in ("float16", "bfloat16"):
            vlm.set_kv_dtype(name)
            assert vlm.model.new_cache(1, 8).dtype == getattr(torch, name)
            _fresh(vlm)
            cold = vlm.generate("Which colour?", images=[img], **kw)
            warm = vlm.generate("Which colour?", images=[img], **kw)
            assert warm.timings.cached_tokens > 0
            assert warm.token_ids == cold.token_ids and [e.logprob for e in warm.logprobs] == [e.logprob for e in cold.logprobs]
            assert abs(cold.logprobs[0].logprob - ref.logprobs[0].logprob) < 0.05
        with pytest.raises(InputError):
            vlm.set_kv_dtype("int8")
    finally:
        vlm.set_kv_dtype(None)
        _fresh(vlm)
