"""GRACE QAT sidecar -> AWQ: codes recovered exactly, safe loading, specific errors."""
import pickle

import pytest
import torch
from hypothesis import given, settings, strategies as st

from gracevlm.errors import FormatError
from gracevlm.formats.awq import GRACE_ZERO_WORD, dequantize_awq, unpack_awq
from gracevlm.formats.qat import qat_to_awq, read_qat_sidecar


def fake_quant(out_f, in_f, g, dtype, gen):
    """A GRACE-style fake-quantized weight: codes q in [-8, 7], learned log-scales, W = q*s in dtype."""
    q = torch.randint(-8, 8, (out_f, in_f), generator=gen)
    log_scale = torch.log(torch.rand(out_f * in_f // g, generator=gen) * 0.05 + 1e-3)
    s = torch.exp(log_scale).view(out_f, in_f // g).repeat_interleave(g, dim=1)
    return q, log_scale, (q * s).to(dtype)


@settings(max_examples=30, deadline=None)
@given(out_w=st.integers(1, 5), groups=st.integers(1, 3), g=st.sampled_from([8, 32, 128]),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), seed=st.integers(0, 10**6))
def test_codes_recovered_exactly(out_w, groups, g, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    out_f, in_f = out_w * 8, groups * g
    q, log_scale, w = fake_quant(out_f, in_f, g, dtype, gen)
    packed = qat_to_awq(w, log_scale, group_size=g)
    assert packed.max_code_error == 0
    codes, zeros = unpack_awq(packed.qweight, packed.qzeros)
    assert torch.equal(codes.t().to(torch.int64) - 8, q)
    assert (packed.qzeros == GRACE_ZERO_WORD).all() and (zeros == 8).all()
    s16 = torch.exp(log_scale).half().view(out_f, groups)
    assert torch.equal(packed.scales, s16.t())
    # dequantize == q * s exactly (with the fp16 scale)
    expect = (q.float() * s16.float().repeat_interleave(g, dim=1)).t()
    assert torch.equal(dequantize_awq(packed.qweight, packed.qzeros, packed.scales, g), expect)


def test_hand_made_layer():
    # 8 outputs x 4 inputs, g = 2: the weight is exactly q * s
    q = torch.tensor([[-8, 7, 0, 1]] * 8)
    s = torch.tensor([0.5, 0.25])
    log_scale = torch.log(s).repeat(8)
    w = (q * s.repeat_interleave(2)).to(torch.bfloat16)
    packed = qat_to_awq(w, log_scale, group_size=2, bias=torch.arange(8.0))
    codes, _ = unpack_awq(packed.qweight, packed.qzeros)
    assert codes[:, 0].tolist() == [0, 15, 8, 9]
    assert packed.bias.dtype == torch.float16 and packed.bias.tolist() == list(range(8))
    assert packed.scales.shape == (2, 8) and packed.group_size == 2


def test_group_falls_back_to_whole_row_like_grace():
    gen = torch.Generator().manual_seed(3)
    q, log_scale, w = fake_quant(16, 96, 96, torch.bfloat16, gen)  # 96 % 128 != 0 -> one group per row
    packed = qat_to_awq(w, log_scale, group_size=128)
    assert packed.group_size == 96 and packed.scales.shape == (1, 16)


def test_off_grid_weight_is_refused_unless_opted_out():
    gen = torch.Generator().manual_seed(4)
    q, log_scale, w = fake_quant(8, 32, 32, torch.float32, gen)
    w = w + 0.3 * torch.exp(log_scale).repeat_interleave(32).view(8, 32)
    with pytest.raises(FormatError, match="away from the integer grid"):
        qat_to_awq(w, log_scale, group_size=32)
    packed = qat_to_awq(w, log_scale, group_size=32, check=False)
    assert packed.max_grid_residual == pytest.approx(0.3, abs=1e-3)


def test_out_of_range_codes_are_refused():
    w = torch.full((8, 32), 9.0)  # scale 1 -> code 9 > 7
    with pytest.raises(FormatError, match="exceed"):
        qat_to_awq(w, torch.zeros(8), group_size=32)
    assert qat_to_awq(w, torch.zeros(8), group_size=32, check=False).max_code_error == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(weight=torch.zeros(8, 32), log_scale=torch.zeros(5)), "log_scale has 5 entries"),
    (dict(weight=torch.zeros(8, 32), log_scale=torch.zeros(16)), "implies group size 16"),
    (dict(weight=torch.zeros(12, 32), log_scale=torch.zeros(12)), "multiple of 8"),
    (dict(weight=torch.zeros(8, 32, dtype=torch.int32), log_scale=torch.zeros(8)), "floating"),
    (dict(weight=torch.zeros(8, 32), log_scale=torch.zeros(8), bits=8), "bits=8"),
    (dict(weight=torch.zeros(8, 32), log_scale=torch.full((8,), -float("inf"))), "not finite"),
])
def test_bad_qat_input(kwargs, message):
    with pytest.raises(FormatError, match=message):
        qat_to_awq(group_size=32, **kwargs)


def test_sidecar_reading(tmp_path):
    gen = torch.Generator().manual_seed(5)
    q, log_scale, w = fake_quant(16, 64, 32, torch.bfloat16, gen)
    path = tmp_path / "qat_quantized_weights.bin"
    torch.save({"model.layers.0.mlp.up_proj.weight": w, "model.layers.0.mlp.up_proj.log_scale": log_scale,
                "model.layers.0.mlp.up_proj.bias": torch.ones(16), "unrelated.weight": torch.ones(2)}, path)
    layers = read_qat_sidecar(path)
    assert list(layers) == ["model.layers.0.mlp.up_proj"]
    layer = layers["model.layers.0.mlp.up_proj"]
    assert torch.equal(layer.weight, w) and layer.bias is not None


def test_sidecar_refuses_pickled_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed!",))
    path = tmp_path / "qat_quantized_weights.bin"
    with open(path, "wb") as f:
        pickle.dump({"x.log_scale": Evil()}, f)
    with pytest.raises(FormatError, match="no pickled objects"):
        read_qat_sidecar(path)


def test_sidecar_errors(tmp_path):
    with pytest.raises(FormatError, match="not found"):
        read_qat_sidecar(tmp_path / "missing.bin")
    torch.save({"a.log_scale": torch.zeros(1)}, tmp_path / "a.bin")
    with pytest.raises(FormatError, match="no matching a.weight"):
        read_qat_sidecar(tmp_path / "a.bin")
    torch.save({"a.weight": torch.zeros(1)}, tmp_path / "b.bin")
    with pytest.raises(FormatError, match="no '\\*.log_scale' entries"):
        read_qat_sidecar(tmp_path / "b.bin")
    torch.save([torch.zeros(1)], tmp_path / "c.bin")
    with pytest.raises(FormatError, match="expected a dict"):
        read_qat_sidecar(tmp_path / "c.bin")
    (tmp_path / "d.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(FormatError, match="cannot read"):
        read_qat_sidecar(tmp_path / "d.bin")
