"""Engine side of issue 18: log-probabilities of the sampled distribution, ``n`` choices from one prefill
(Python API and scheduler agree, choice i = a lone request with ``choice_seed``), groups waiting for all
their slots and cancelled as one, prompt log-probabilities, system messages in the template."""
import math

import pytest
import torch

from gracevlm.engine.generate import Generation, stream_generate
from gracevlm.engine.sampling import MAX_LOGPROBS, Sampler, SamplingParams, choice_seed
from gracevlm.engine.prepare import prepare_text
from gracevlm.engine.scheduler import BatchScheduler
from gracevlm.engine.vlm import load
from gracevlm.errors import InputError
from gracevlm.models.llava.chat import SYSTEM_VICUNA_V1, render_prompt
from gracevlm.synth.checkpoint import synthesize


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models decode much faster on one thread than on contended ones (a shared CI or dev CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return load(synthesize(tmp_path_factory.mktemp("c18") / "tiny", "tiny", "awq", seed=0, progress=False),
                device="cpu")


def test_sampler_logprobs_match_the_filtered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 3.0])
    token, entry = Sampler(SamplingParams(temperature=0.0)).sample(logits, 2)
    ref = torch.log_softmax(logits, -1)
    assert token == 4 and math.isclose(entry.logprob, float(ref[4]), rel_tol=1e-6)
    assert [t for t, _ in entry.top] == [4, 0]
    params = SamplingParams(temperature=0.5, top_k=2, seed=1)
    token, entry = Sampler(params).sample(logits, 5)
    kept = torch.log_softmax(torch.tensor([3.0, 2.0]) / 0.5, -1)
    assert [t for t, _ in entry.top] == [4, 0]  # the 3 filtered tokens are not listed
    assert all(math.isclose(lp, float(k), rel_tol=1e-5) for (_, lp), k in zip(entry.top, kept))
    assert token in (4, 0) and Sampler(params)(logits) == token  # logprobs do not change the draw
    params = SamplingParams(temperature=1.0, top_p=0.5, seed=2)  # top-p keeps 4 alone here
    assert Sampler(params).sample(logits, 3)[1].top == [(4, 0.0)]
    for bad in (-1, MAX_LOGPROBS + 1, True, 2.0):
        with pytest.raises(InputError):
            SamplingParams(logprobs=bad)


def test_choice_seeds():
    assert choice_seed(7, 0) == 7 and choice_seed(None, 3) is None
    seeds = {choice_seed(s, i) for s in range(50) for i in range(1, 5)}
    assert len(seeds) == 200 and all(0 <= x < 2**63 for x in seeds)


def test_python_api_choices_equal_lone_generations(vlm):
    gens = vlm.generate("Tell me", n=3, max_new_tokens=6, temperature=1.0, seed=4, logprobs=1)
    assert isinstance(gens, list) and len(gens) == 3
    for i, g in enumerate(gens):
        alone = vlm.generate("Tell me", max_new_tokens=6, temperature=1.0, seed=choice_seed(4, i), logprobs=1)
        assert g.token_ids == alone.token_ids and g.text == alone.text
        assert [e.logprob for e in g.logprobs] == pytest.approx([e.logprob for e in alone.logprobs], abs=1e-5)
        assert g.prompt_token_ids == alone.prompt_token_ids and g.timings.cached_tokens == 0
    with pytest.raises(InputError):
        vlm.generate("x", n=0)


def test_scheduler_groups(vlm):
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=9, logprobs=0, prompt_logprobs=2)
    prepared = prepare_text(vlm, "The sea is")
    with BatchScheduler(vlm, max_batch_size=3) as sched:
        handles = sched.submit_prepared_choices(prepared, params, 3)
        gens = [h.result(120) for h in handles]
        for i, g in enumerate(gens):
            ref = Generation("", [], [], "length")
            p = SamplingParams(max_new_tokens=6, temperature=1.0, seed=choice_seed(9, i))
            list(stream_generate(vlm.model, vlm.tokenizer, prepared.prompt_ids, None, p, vlm.max_context, ref))
            assert g.token_ids == ref.token_ids and len(g.logprobs) == len(g.token_ids)
            assert g.prompt_logprobs[0] is None and len(g.prompt_logprobs) == len(prepared.prompt_ids)
            assert g.prompt_logprobs is gens[0].prompt_logprobs
        stats = sched.stats()
        assert stats["prefill_chunks"] == 1 and stats["prompt_tokens"] == len(prepared.prompt_ids)  # one prefill
        # a group needs all its slots: it waits behind a running request, and goes once the slots are free
        endless = prepare_text(vlm, "keep going")  # greedy, this model never samples EOS after it
        long = sched.submit_prepared(endless, SamplingParams(max_new_tokens=1000))
        group = sched.submit_prepared_choices(prepared, SamplingParams(max_new_tokens=2), 3)
        assert not any(h.done for h in group)
        long.cancel()
        assert [h.result(120).finish_reason for h in group] == ["length"] * 3
        # cancelled as one before its prefill: only when every choice is cancelled
        blocker = sched.submit_prepared(endless, SamplingParams(max_new_tokens=1000))
        group = sched.submit_prepared_choices(prepared, SamplingParams(max_new_tokens=2), 3)
        for h in group:
            h.cancel()
        assert [h.result(120).finish_reason for h in group] == ["cancelled"] * 3
        blocker.cancel()
        blocker.result(120)
        assert sched.stats()["active_slots"] == 0
        with pytest.raises(InputError, match="n must be"):
            sched.submit_prepared_choices(prepared, params, 4)
        with pytest.raises(InputError, match="text-only"):
            sched.submit([1, -200, 5], torch.zeros(1, 3, vlm.model.language_model.spec.hidden_size), params)


def test_system_message_in_the_template():
    user = [{"role": "user", "content": "Hi"}]
    assert render_prompt(user).startswith(SYSTEM_VICUNA_V1)
    assert render_prompt([{"role": "system", "content": "Be brief."}, *user]) == "Be brief. USER: Hi ASSISTANT:"
    with pytest.raises(InputError, match="no system slot"):
        render_prompt([{"role": "system", "content": "x"}, *user], "plain")
    with pytest.raises(InputError, match="must come first"):
        render_prompt([*user, {"role": "assistant", "content": "a"}, {"role": "system", "content": "x"}])
