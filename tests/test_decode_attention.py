"""The native decode attention (``kernels.attention``, csrc/gv_attn.c) against float64 softmax attention and
torch's SDPA: every KV dtype, grouped queries, head sizes on and off the vector path, thread invariance, NaN,
and a model's decode steps with the kernel on and off."""
import pytest
import torch

from gracevlm.kernels import attention, native_int8
from gracevlm.models.llama import _attend

pytestmark = pytest.mark.skipif(native_int8.load_library() is None, reason="native library not built")


def exact_attention(q, keys, values, span, groups):
    """float64 softmax(q K^T / sqrt(d)) V over positions 0..span-1, head h reading KV head h // groups."""
    h, d = q.shape[1], q.shape[3]
    k = keys[:, :span].double().repeat_interleave(groups, 0)
    v = values[:, :span].double().repeat_interleave(groups, 0)
    s = (q.double().view(h, 1, d) @ k.transpose(1, 2)) / d ** 0.5
    return (torch.softmax(s, -1) @ v).view(1, h, 1, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,d", [(16, 8, 128), (8, 8, 64), (4, 1, 32), (6, 2, 24), (3, 3, 20)])
@pytest.mark.parametrize("span", [1, 5, 64, 301])
def test_matches_float64_as_closely_as_sdpa(dtype, heads, kv_heads, d, span):
    gen = torch.Generator().manual_seed(span * 7 + d)
    keys = torch.randn(kv_heads, span + 9, d, generator=gen).to(dtype)  # capacity beyond the span, as a cache
    values = torch.randn(kv_heads, span + 9, d, generator=gen).to(dtype)
    keys[:, span:] = float("nan")  # positions past the span must not be read
    q = torch.randn(1, heads, 1, d, generator=gen)
    groups = heads // kv_heads
    out = attention.decode_attention(q, keys, values, span, groups)
    assert out is not None and out.dtype == torch.float32 and out.shape == q.shape
    exact = exact_attention(q, keys, values, span, groups)
    sdpa = _attend(q, keys[:, :span].unsqueeze(0).float(), values[:, :span].unsqueeze(0).float(),
                   torch.ones(1, 1, 1, span, dtype=torch.bool), groups)
    ours_err = (out.double() - exact).abs().max().item()
    sdpa_err = (sdpa.double() - exact).abs().max().item()
    assert ours_err <= max(4 * sdpa_err, 1e-6), (ours_err, sdpa_err)


def test_scalar_path_agrees_and_threads_do_not_change_bits(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(8, 400, 128, generator=gen), torch.randn(8, 400, 128, generator=gen)
    q = torch.randn(1, 16, 1, 128, generator=gen)
    monkeypatch.setenv("GRACEVLM_NUM_THREADS", "1")
    one = attention.decode_attention(q, keys, values, 350, 2)
    monkeypatch.setenv("GRACEVLM_NUM_THREADS", "2")
    two = attention.decode_attention(q, keys, values, 350, 2)
    assert torch.equal(one, two)
    lib = native_int8.load_library()
    level = lib.gv8_get_isa()
    try:
        lib.gv8_set_isa(0)
        scalar = attention.decode_attention(q, keys, values, 350, 2)
    finally:
        lib.gv8_set_isa(level)
    assert (scalar - one).abs().max().item() < 1e-5


def test_nan_reaches_only_its_head():
    gen = torch.Generator().manual_seed(1)
    keys, values = torch.randn(4, 20, 64, generator=gen), torch.randn(4, 20, 64, generator=gen)
    q = torch.randn(1, 8, 1, 64, generator=gen)
    q[0, 3, 0, 5] = float("nan")
    out = attention.decode_attention(q, keys, values, 20, 2)
    assert out[0, 3].isnan().all()
    assert out[0, [0, 1, 2, 4, 5, 6, 7]].isfinite().all()


def test_refuses_what_it_cannot_take():
    keys = values = torch.randn(2, 10, 16)
    q = torch.randn(1, 4, 1, 16)
    assert attention.decode_attention(q.double(), keys, values, 10, 2) is None  # fp32 queries only
    assert attention.decode_attention(torch.randn(1, 4, 2, 16), keys, values, 10, 2) is None  # one position
    assert attention.decode_attention(q, keys.int(), values.int(), 10, 2) is None  # KV dtype
    assert attention.decode_attention(q, keys, values, 11, 2) is None  # span beyond the capacity
    assert attention.decode_attention(q, keys, values, 10, 3) is None  # heads != kv_heads * groups
    old = attention.set_enabled(False)
    try:
        assert attention.decode_attention(q, keys, values, 10, 2) is None
    finally:
        attention.set_enabled(old)


def test_decode_steps_with_and_without_the_kernel(tmp_path, monkeypatch):
    """A tiny Qwen3-VL (GQA) decodes the same greedy tokens with the kernel on and off, logits within 1e-5."""
    import gracevlm
    from gracevlm.models import llama

    taken = []

    def counted(*args):
        out = attention.decode_attention(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(llama, "decode_attention", counted)
    from gracevlm.synth.qwen3_vl import synthesize_qwen3_vl

    path = synthesize_qwen3_vl(tmp_path / "m", "qwen3-vl-tiny", fmt="awq", seed=0, progress=False)
    vlm = gracevlm.load(path, device="cpu")
    lm = vlm.model.language_model
    ids = torch.arange(3, 40).view(1, -1)

    def steps():
        with torch.inference_mode():
            cache = lm.new_cache(1, 64)
            logits = lm(lm.embed(ids, torch.float32), torch.arange(ids.shape[1])[None], cache)
            out = []
            for i in range(8):
                tok = logits.argmax(-1, keepdim=True)
                out.append(logits)
                logits = lm(lm.embed(tok, torch.float32), torch.tensor([[ids.shape[1] + i]]), cache)
            return torch.cat(out)

    on = steps()
    assert taken and all(taken)  # every decode step's attention went through the kernel
    old = attention.set_enabled(False)
    try:
        off = steps()
    finally:
        attention.set_enabled(old)
    assert torch.equal(on.argmax(-1), off.argmax(-1))
    assert (on - off).abs().max().item() < 1e-5
