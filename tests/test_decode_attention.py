"""The native decode attention (``kernels.attention``, csrc/gv_attn.c) against float64 softmax attention and
torch's SDPA: every KV dtype, grouped queries, head sizes on and off the vector path, thread invariance, NaN,
and a model's decode steps with the kernel on and off."""
import pytest
import torch

from gracevlm.kernels import attention, decode_layers, native_int8
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

    def counted(fn):
        def call(*args):
            out = fn(*args)
            taken.append(out is not None)
            return out
        return call

    monkeypatch.setattr(decode_layers._switch, "on", False)  # the layer-by-layer path (test_decode_stack: the one call)
    monkeypatch.setattr(llama, "decode_attention", counted(attention.decode_attention))
    monkeypatch.setattr(llama, "decode_block", counted(attention.decode_block))
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


def separate_steps(qkv, heads, kv_heads, qw, kw, eps, cos, sin, keys, values, span):
    """What the models run without ``decode_block``: QK-norm, rotary, cache writes, ``decode_attention``."""
    from gracevlm.kernels import norm_rope

    d = keys.shape[-1]
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q, k = q.reshape(1, 1, heads, d), k.reshape(1, 1, kv_heads, d)
    if qw is not None:
        q, k = norm_rope.rms_norm(q, qw, eps), norm_rope.rms_norm(k, kw, eps)
    q, k = norm_rope.rotary(q, cos, sin).transpose(1, 2), norm_rope.rotary(k, cos, sin).transpose(1, 2)
    keys[:, span - 1:span] = k[0].to(keys.dtype)
    values[:, span - 1:span] = v.reshape(1, 1, kv_heads, d).transpose(1, 2)[0].to(values.dtype)
    return attention.decode_attention(q.contiguous(), keys, values, span, heads // kv_heads).reshape(1, 1, -1)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("heads,kv_heads,d,span", [(16, 8, 128, 1), (16, 8, 128, 37), (4, 1, 32, 9), (6, 6, 24, 5)])
def test_decode_block_is_bitwise_the_separate_steps(kv_dtype, qk_norm, heads, kv_heads, d, span):
    gen = torch.Generator().manual_seed(span + d)
    qkv = torch.randn(1, 1, (heads + 2 * kv_heads) * d, generator=gen) * 2
    qw, kw = (torch.randn(d, generator=gen), torch.randn(d, generator=gen)) if qk_norm else (None, None)
    cos, sin = torch.randn(1, 1, d, generator=gen), torch.randn(1, 1, d, generator=gen)
    cache = torch.randn(2, kv_heads, span + 4, d, generator=gen).to(kv_dtype)
    ref_k, ref_v = cache[0].clone(), cache[1].clone()
    ref = separate_steps(qkv, heads, kv_heads, qw, kw, 1e-6, cos, sin, ref_k, ref_v, span)
    keys, values = cache[0], cache[1]  # views with the layout of a KV cache layer
    out = attention.decode_block(qkv, heads, kv_heads, qw, kw, 1e-6, cos, sin, keys, values, span)
    assert out is not None and out.shape == (1, 1, heads * d)
    assert torch.equal(out, ref)
    assert torch.equal(keys, ref_k) and torch.equal(values, ref_v)  # the new position written, nothing else


def test_decode_block_refuses_what_it_cannot_take():
    qkv, cs = torch.randn(1, 1, 4 * 16), torch.randn(1, 1, 16)
    keys = values = torch.zeros(1, 8, 16)
    args = (2, 1, None, None, 1e-6, cs, cs)
    assert attention.decode_block(qkv, *args, keys, values, 8) is not None
    assert attention.decode_block(qkv, *args, keys.half(), values.half(), 8) is None  # fp32 and bf16 caches only
    assert attention.decode_block(qkv.double(), *args, keys, values, 8) is None
    assert attention.decode_block(torch.randn(1, 1, 5 * 16), *args, keys, values, 8) is None  # sizes disagree
    assert attention.decode_block(qkv, *args, keys, values, 9) is None  # span beyond the capacity


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["qwen3-vl", "llava"])
def test_models_decode_the_same_bits_with_the_fused_block(tmp_path, monkeypatch, family, kv_dtype):
    """Decode steps of a tiny Qwen3-VL (QK-norm, GQA) and a tiny LLaVA give bitwise the same logits and KV cache
    with ``decode_block`` and with the separate steps it replaces."""
    import gracevlm
    from gracevlm.models import llama

    if family == "qwen3-vl":
        from gracevlm.synth.qwen3_vl import synthesize_qwen3_vl
        path = synthesize_qwen3_vl(tmp_path / "m", "qwen3-vl-tiny", fmt="awq", seed=0, progress=False)
    else:
        from gracevlm.synth.checkpoint import synthesize
        path = synthesize(tmp_path / "m", "tiny", fmt="awq", seed=0, progress=False)
    vlm = gracevlm.load(path, device="cpu")
    lm = vlm.model.language_model
    ids = torch.arange(3, 30).view(1, -1)
    used = []
    monkeypatch.setattr(decode_layers._switch, "on", False)  # the layer-by-layer path (test_decode_stack: the one call)

    def run():
        with torch.inference_mode():
            cache = vlm.model.new_cache(1, 64, kv_dtype)
            logits = [lm(lm.embed(ids, torch.float32), torch.arange(ids.shape[1])[None], cache)]
            for i in range(6):
                tok = logits[-1].argmax(-1, keepdim=True)
                logits.append(lm(lm.embed(tok, torch.float32), torch.tensor([[ids.shape[1] + i]]), cache))
            return torch.cat(logits), cache

    def block(*args):
        out = attention.decode_block(*args)
        used.append(out is not None)
        return out

    monkeypatch.setattr(llama, "decode_block", block)
    fused, fused_cache = run()
    assert used and all(used)
    monkeypatch.setattr(llama, "decode_block", lambda *args: None)
    separate, separate_cache = run()
    assert torch.equal(fused, separate)
    assert fused_cache.dtype == kv_dtype
    for layer in range(len(lm.layers) if hasattr(lm, "layers") else len(lm.model.layers)):
        for a, b in zip(fused_cache.layer_kv(layer, 0), separate_cache.layer_kv(layer, 0)):
            assert torch.equal(a, b)
