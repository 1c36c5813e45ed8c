"""``eval run`` with the prefix cache: questions about one image generated together, answers written in
question order, each answer equal to a cold run of that question."""
import threading

import pytest
from PIL import Image

from gracevlm.eval.common import Item
from gracevlm.eval.runner import ModelGenerator, RunConfig, _generate_in_order, generation_order


def _items(paths, pattern):
    return [Item(i, f"q{i}", f"<image>\nIs there a thing number {i}?\nAnswer with one word.", paths[k])
            for i, k in enumerate(pattern)]


def test_generation_order_groups_images_within_a_window():
    items = _items(["a", "b", "c"], [0, 1, 0, 2, 1, 0, 2])
    assert generation_order(items) == [0, 2, 5, 1, 4, 3, 6]
    assert generation_order(items, window=3) == [0, 2, 1, 3, 4, 5, 6]
    assert generation_order([Item(1, "p", "m", None), Item(2, "p", "m", b"xy"), Item(3, "p", "m", None)]) == [0, 2, 1]


@pytest.mark.parametrize("concurrency", [1, 3])
def test_answers_come_in_question_order(concurrency):
    items = _items(["a", "b", "c"], [0, 1, 0, 2, 1, 0, 2, 1])
    calls, lock = [], threading.Lock()

    def gen(item):
        with lock:
            calls.append(item.question_id)
        return f"ans {item.question_id}"

    out = list(_generate_in_order(items, gen, concurrency))
    assert [it.question_id for it, _ in out] == list(range(8))
    assert [t for _, t in out] == [f"ans {i}" for i in range(8)]
    if concurrency == 1:
        assert calls == [0, 2, 5, 1, 4, 7, 3, 6]


def test_in_process_eval_hits_the_cache_and_equals_cold_runs(tiny_awq, tmp_path):
    paths = []
    for name, color in (("a.png", (250, 200, 10)), ("b.png", (5, 20, 210))):  # same size, different pictures
        Image.new("RGB", (40, 30), color).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    items = _items(paths, [0, 1, 0, 1])
    gen = ModelGenerator(RunConfig("pope", str(tmp_path / "ans.jsonl"), model=str(tiny_awq), device="cpu",
                                   max_new_tokens=4))
    vlm = gen.vlm
    vlm.set_prefix_cache(1.0, block_tokens=16)
    seen, generate = {}, vlm.generate

    def spy(message, **kw):  # record what the runner's generations computed (tokens and log-probabilities)
        g = generate(message, logprobs=2, **kw)
        seen[message] = g
        return g

    vlm.generate = spy
    answers = [text for _, text in _generate_in_order(items, gen, 1)]
    vlm.generate = generate
    cached = [seen[it.user_message].timings.cached_tokens for it in items]
    assert cached[0] == 0 and cached[1] < cached[2] and cached[1] < cached[3]  # 1: only the system text before b
    stats = vlm.prefix_cache.stats()
    assert stats["image_feature_hits"] == 2 and stats["image_feature_misses"] == 2  # each picture encoded once
    assert stats["prefix_cache_block_hits"] > 0
    for item, text in zip(items, answers):
        vlm.set_prefix_cache(1.0, block_tokens=16)
        cold = vlm.generate(item.user_message, images=[item.image], conv_mode=gen.conv_mode, max_new_tokens=4,
                            logprobs=2)
        warm = seen[item.user_message]
        assert cold.timings.cached_tokens == 0 and text == cold.text.strip()
        assert warm.token_ids == cold.token_ids and [e.logprob for e in warm.logprobs] == [e.logprob for e in cold.logprobs]
