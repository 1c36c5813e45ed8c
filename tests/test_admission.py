"""Admission checks in process: the scheduler measures a prompt before embedding it, the byte cap is a true
bound of the tokenizer, image positions match the tower, the sampler survives extreme values, the padded
canvas is bounded."""
import math

import pytest
import torch
from PIL import Image

from gracevlm.engine.admission import check_text_size, plan_chat, text_byte_cap
from gracevlm.engine.generate import PromptTooLong
from gracevlm.engine.sampling import Sampler, SamplingParams
from gracevlm.engine.scheduler import BatchScheduler
from gracevlm.engine.vlm import load
from gracevlm.errors import InputError
from gracevlm.models.llava.processing import ImageSpec, preprocess_image


@pytest.fixture(scope="module")
def vlm(tiny_awq):
    return load(tiny_awq, device="cpu")


def test_scheduler_checks_length_before_embedding(vlm, monkeypatch):
    sched = BatchScheduler(vlm, max_batch_size=1, max_model_len=64)
    try:
        calls = []
        real = vlm.model.embed_prompt
        monkeypatch.setattr(vlm.model, "embed_prompt", lambda ids, f: calls.append(len(ids)) or real(ids, f))
        with pytest.raises(PromptTooLong):
            sched.submit([1] + [5] * 100_000, None, SamplingParams(max_new_tokens=2))
        assert calls == []  # refused without building [100001, hidden] embeddings
        feats = torch.zeros(3, 16, vlm.model.language_model.spec.hidden_size)
        with pytest.raises(PromptTooLong):  # 3 images x 16 positions + text > 64
            sched.submit([1, -200, -200, -200] + [5] * 20, feats, SamplingParams(max_new_tokens=2))
        assert calls == []
        assert sched.submit([1, 5, 6], None, SamplingParams(max_new_tokens=2)).result(60).finish_reason
        assert calls == [3]
    finally:
        sched.shutdown()


def test_text_byte_cap_bounds_the_token_count(vlm):
    tok = vlm.tokenizer
    per = vlm.runtime.max_token_bytes()
    for text in ("hello world " * 50, "é" * 300, "<s></s>" * 40, "x" * 999, "\U0001F600" * 100):
        assert len(tok.encode(text, add_bos=False)) >= math.ceil(len(text.encode()) / per), text[:10]
    check_text_size("x" * text_byte_cap(vlm, 10), vlm, 10)  # at the cap: tokenized, not refused
    with pytest.raises(PromptTooLong):
        check_text_size("x" * (text_byte_cap(vlm, 10) + 1), vlm, 10)


def test_plan_counts_images_and_positions_without_decoding(vlm):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                         {"type": "image", "image": object()}, {"type": "image", "image": 7}]}]
    plan = plan_chat(vlm, msgs, None, 512, 2)
    feats, _ = vlm.encode_images([Image.new("RGB", (30, 20))])
    assert vlm.runtime.image_positions() == feats.shape[1]
    assert plan.positions == len(plan.prompt_ids) - 2 + 2 * feats.shape[1] and len(plan.images) == 2
    with pytest.raises(InputError, match="at most 1"):
        plan_chat(vlm, msgs, None, 512, 1)
    with pytest.raises(PromptTooLong):
        plan_chat(vlm, msgs, None, 20, 2)


def test_sampler_extremes_match_the_greedy_limit():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    top = int(logits.argmax())
    for kw in (dict(temperature=5e-324), dict(temperature=1e-300, top_p=0.5), dict(temperature=1.0, top_p=1e-300),
               dict(temperature=1e-30, top_k=4)):
        assert Sampler(SamplingParams(seed=1, **kw))(logits) == top, kw
    normal = SamplingParams(temperature=0.7, seed=5)
    assert Sampler(normal)(logits) == Sampler(SamplingParams(temperature=0.7, seed=5))(logits)
    for kw in (dict(seed=2**64), dict(seed=-(2**63) - 1), dict(temperature=float("nan")),
               dict(temperature=float("inf")), dict(seed=True)):
        with pytest.raises(InputError):
            SamplingParams(**kw)
    Sampler(SamplingParams(temperature=1.0, seed=2**64 - 1))(logits)
    Sampler(SamplingParams(temperature=1.0, seed=-(2**63)))(logits)


def test_padded_canvas_counts_against_max_pixels():
    spec = ImageSpec(max_pixels=10_000, size=14, crop_size=14)
    assert preprocess_image(Image.new("RGB", (100, 60)), spec).shape == (3, 14, 14)  # 100^2 fits
    with pytest.raises(InputError, match="padded to 101x101"):
        preprocess_image(Image.new("RGB", (101, 10)), spec)  # 1010 pixels, but a 101^2 canvas
