"""kernels.decode_layers (csrc/gv_layer.c) and models.decode_stack: SwiGLU within a few ulp of the exact value and
row-invariant; a whole decode step in one native call bitwise the layer-by-layer path (logits and KV), used
only where it applies and rebuilt or dropped when the layers change."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gracevlm import kernels
from gracevlm.kernels import decode_layers, native_int8
from gracevlm.models import decode_stack

pytestmark = pytest.mark.skipif(native_int8.load_library() is None, reason="native library unavailable")


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ia, ib = a.view(torch.int32).to(torch.int64), b.view(torch.int32).to(torch.int64)
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return (ia - ib).abs()


def test_silu_mul_is_within_a_few_ulp_of_exact():
    gen = torch.Generator().manual_seed(0)
    gate = torch.cat([torch.randn(5000, generator=gen) * s for s in (0.1, 1.0, 4.0, 20.0)]
                     + [torch.tensor([0.0, -0.0, 1e-30, -1e-30, 80.0, -80.0, 87.5, -87.5, 100.0, -100.0, 1e4, -1e4])])
    up = torch.ones_like(gate)
    got = decode_layers.silu_mul(gate, up)
    exact = (gate.double() * torch.sigmoid(gate.double())).float()
    ok = gate.abs() < 80  # beyond, e^-|x| is clamped at e^-87: the result is off by < 1e-35 in absolute terms
    assert ulp_distance(got[ok], exact[ok]).max() <= 3
    assert (got[~ok] - exact[~ok]).abs().max() < 1e-30
    assert torch.allclose(got, F.silu(gate), rtol=1e-6, atol=1e-30)
    up = torch.randn(gate.shape, generator=gen)
    assert torch.equal(decode_layers.silu_mul(gate, up), got * up)  # one more rounding: the product


def test_silu_mul_bits_depend_on_nothing_but_the_element():
    gen = torch.Generator().manual_seed(1)
    gu = torch.randn(3, 2 * 37, generator=gen) * 3
    gate, up = gu.chunk(2, dim=-1)  # strided halves, as a fused gate/up output
    whole = decode_layers.silu_mul(gate, up)
    rows = torch.cat([decode_layers.silu_mul(gate[r:r + 1], up[r:r + 1]) for r in range(3)])
    shifted = decode_layers.silu_mul(gate[:, 5:], up[:, 5:])  # elements at other places in the AVX2 lanes
    assert torch.equal(whole, rows) and torch.equal(whole[:, 5:], shifted)
    lib = native_int8.load_library()
    old = lib.gv8_get_isa()
    try:
        lib.gv8_set_isa(0)
        scalar = decode_layers.silu_mul(gate, up)
    finally:
        lib.gv8_set_isa(old)
    assert torch.equal(whole, scalar)


def test_silu_mul_refuses_what_it_cannot_take():
    x = torch.randn(4, 8)
    assert decode_layers.silu_mul(x.double(), x.double()) is None
    assert decode_layers.silu_mul(x, x[:, :4]) is None
    g = x.clone().requires_grad_()
    assert decode_layers.silu_mul(g, x) is None  # autograd keeps torch's op


def tiny_model(tmp_path, family: str):
    import gracevlm

    if family == "qwen3-vl":
        from gracevlm.synth.qwen3_vl import synthesize_qwen3_vl
        path = synthesize_qwen3_vl(tmp_path / "m", "qwen3-vl-tiny", fmt="awq", seed=0, progress=False)
    elif family == "qwen3-vl-w8":
        from gracevlm.synth.qwen3_vl import synthesize_qwen3_vl
        path = synthesize_qwen3_vl(tmp_path / "m", "qwen3-vl-tiny", fmt="qat", seed=0, progress=False, bits=8)
    else:
        from gracevlm.synth.checkpoint import synthesize
        path = synthesize(tmp_path / "m", "tiny", fmt="awq", seed=0, progress=False)
    return gracevlm.load(path, device="cpu")


def decoder_layers(lm):
    return lm.layers if hasattr(lm, "layers") else lm.model.layers


def decode(vlm, kv_dtype, steps=6):
    """Logits of a 27-token prompt and ``steps`` greedy decode steps, and the KV cache."""
    lm = vlm.model.language_model
    ids = torch.arange(3, 30).view(1, -1)
    with torch.inference_mode():
        cache = vlm.model.new_cache(1, 64, kv_dtype)
        logits = [lm(lm.embed(ids, torch.float32), torch.arange(ids.shape[1])[None], cache)]
        for i in range(steps):
            tok = logits[-1].argmax(-1, keepdim=True)
            logits.append(lm(lm.embed(tok, torch.float32), torch.tensor([[ids.shape[1] + i]]), cache))
    return torch.cat(logits), cache.slot_store(0).clone()


def count_stack_runs(monkeypatch) -> list:
    runs = []
    real = decode_layers.LayerStack.run

    def run(self, *args):
        runs.append(self.n)
        return real(self, *args)

    monkeypatch.setattr(decode_layers.LayerStack, "run", run)
    return runs


@pytest.mark.parametrize("family", ["qwen3-vl", "qwen3-vl-w8", "llava"])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_one_call_decode_is_bitwise_the_layer_by_layer_path(tmp_path, monkeypatch, family, kv_dtype):
    vlm = tiny_model(tmp_path, family)
    lm = vlm.model.language_model
    runs = count_stack_runs(monkeypatch)
    stacked, stacked_kv = decode(vlm, kv_dtype)
    assert runs == [len(decoder_layers(lm))] * 6  # every decode step, none of the prompt
    monkeypatch.setattr(decode_layers._switch, "on", False)
    layered, layered_kv = decode(vlm, kv_dtype)
    assert len(runs) == 6
    assert torch.equal(stacked, layered)
    assert stacked_kv.dtype == kv_dtype and torch.equal(stacked_kv, layered_kv)


def test_the_stack_follows_backend_changes_and_steps_aside_for_hooks(tmp_path, monkeypatch):
    vlm = tiny_model(tmp_path, "qwen3-vl")
    lm = vlm.model.language_model
    runs = count_stack_runs(monkeypatch)
    decode(vlm, torch.float32, steps=2)
    first = lm.__dict__[decode_stack._ATTR]
    assert len(runs) == 2 and first is not None
    # another INT4 kernel mode: the plans change, the stack is rebuilt on them and gives that backend's bits
    kernels.use_backend(lm, "native-i8x2")
    try:
        stacked, _ = decode(vlm, torch.float32, steps=2)
        assert len(runs) == 4 and lm.__dict__[decode_stack._ATTR] is not first
        monkeypatch.setattr(decode_layers._switch, "on", False)
        layered, _ = decode(vlm, torch.float32, steps=2)
        assert torch.equal(stacked, layered)
        monkeypatch.setattr(decode_layers._switch, "on", True)
    finally:
        kernels.use_backend(lm, None)
    # a forward hook on one linear must see its calls: the layer-by-layer path runs
    seen = []
    lin = decoder_layers(lm)[1].mlp.down_proj
    handle = lin.register_forward_hook(lambda *a: seen.append(1))
    try:
        n = len(runs)
        decode(vlm, torch.float32, steps=2)
        assert len(runs) == n and len(seen) == 3  # the prompt and both decode steps
    finally:
        handle.remove()
    decode(vlm, torch.float32, steps=1)
    assert len(runs) == n + 1


def test_batched_steps_and_copies_do_not_use_a_stale_stack(tmp_path, monkeypatch):
    import copy

    vlm = tiny_model(tmp_path, "llava")
    lm = vlm.model.language_model
    runs = count_stack_runs(monkeypatch)
    decode(vlm, torch.float32, steps=1)
    assert len(runs) == 1
    twin = copy.deepcopy(lm)
    assert twin.__dict__.get(decode_stack._ATTR) is None  # raw pointers don't travel with a copy
    with torch.inference_mode():  # two sequences in one step: not this path
        cache = vlm.model.new_cache(2, 32)
        ids = torch.arange(3, 9).view(1, -1)
        for slot in (0, 1):
            lm(lm.embed(ids, torch.float32), torch.arange(6)[None], cache, slots=torch.tensor([slot]))
        lm(lm.embed(torch.tensor([[4], [5]]), torch.float32), torch.tensor([[6], [6]]), cache,
           slots=torch.tensor([0, 1]), rows_alone=True)
    assert len(runs) == 1
