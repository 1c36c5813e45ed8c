"""AWQ GEMM packing: exact round trips, AutoAWQ byte layout, and specific errors on bad input."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from gracevlm.errors import FormatError
from gracevlm.formats.awq import GRACE_ZERO_WORD, dequantize_awq, is_symmetric_grace, pack_awq, unpack_awq


def autoawq_pack_reference(codes: np.ndarray) -> np.ndarray:
    """Independent loop implementation of AutoAWQ's GEMM packer (columns of a [rows, O] array)."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    rows, out_f = codes.shape
    packed = np.zeros((rows, out_f // 8), dtype=np.uint32)
    for col in range(out_f // 8):
        for i in range(8):
            packed[:, col] |= codes[:, col * 8 + order_map[i]].astype(np.uint32) << np.uint32(i * 4)
    return packed.view(np.int32)


def test_hand_made_word():
    # logical columns 0..7 hold values 0..7: nibble k stores column ORDER[k] = (0,2,4,6,1,3,5,7)
    codes = torch.arange(8, dtype=torch.uint8).unsqueeze(0)
    qweight, qzeros = pack_awq(codes, torch.full((1, 8), 8, dtype=torch.uint8))
    assert qweight.item() == 0x75316420
    assert qzeros.item() == GRACE_ZERO_WORD  # 0x88888888
    # a word whose top nibble is >= 8 is negative as int32
    codes = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 15]], dtype=torch.uint8)
    qweight, _ = pack_awq(codes, torch.zeros(1, 8, dtype=torch.uint8))
    assert qweight.item() == np.uint32(0xF0000000).view(np.int32)


@settings(max_examples=40, deadline=None)
@given(rows_g=st.integers(1, 4), g=st.sampled_from([1, 2, 8, 32]), words=st.integers(1, 9),
       seed=st.integers(0, 2**31 - 1))
def test_pack_matches_autoawq_and_round_trips(rows_g, g, words, seed):
    gen = np.random.default_rng(seed)
    in_f, out_f = rows_g * g, words * 8
    codes = gen.integers(0, 16, size=(in_f, out_f), dtype=np.uint8)
    zeros = gen.integers(0, 16, size=(rows_g, out_f), dtype=np.uint8)
    qweight, qzeros = pack_awq(torch.from_numpy(codes), torch.from_numpy(zeros))
    assert qweight.dtype == torch.int32 and qweight.shape == (in_f, out_f // 8)
    np.testing.assert_array_equal(qweight.numpy(), autoawq_pack_reference(codes))
    np.testing.assert_array_equal(qzeros.numpy(), autoawq_pack_reference(zeros))
    c2, z2 = unpack_awq(qweight, qzeros)
    assert c2.dtype == torch.uint8 and torch.equal(c2, torch.from_numpy(codes))
    assert torch.equal(z2, torch.from_numpy(zeros))


@settings(max_examples=25, deadline=None)
@given(words=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_unpack_pack_round_trip_of_arbitrary_words(words, seed):
    gen = np.random.default_rng(seed)
    qweight = torch.from_numpy(gen.integers(-2**31, 2**31, size=(4, words), dtype=np.int64).astype(np.int32))
    qzeros = torch.from_numpy(gen.integers(-2**31, 2**31, size=(2, words), dtype=np.int64).astype(np.int32))
    codes, zeros = unpack_awq(qweight, qzeros)
    q2, z2 = pack_awq(codes, zeros)
    assert torch.equal(q2, qweight) and torch.equal(z2, qzeros)


@pytest.mark.parametrize("out_f", [8, 40, 4104])
def test_dequantize_equals_definition(out_f, rng):
    in_f, g = 256, 64
    codes = torch.randint(0, 16, (in_f, out_f), dtype=torch.uint8, generator=rng)
    zeros = torch.randint(0, 16, (in_f // g, out_f), dtype=torch.uint8, generator=rng)
    scales = (torch.rand(in_f // g, out_f, generator=rng) * 0.1).half()
    qweight, qzeros = pack_awq(codes, zeros)
    w = dequantize_awq(qweight, qzeros, scales, g)
    expect = torch.empty(in_f, out_f)
    for i in range(0, in_f, g):  # loop over groups only: independent of the vectorized reshape
        expect[i:i + g] = (codes[i:i + g].float() - zeros[i // g].float()) * scales[i // g].float()
    assert w.dtype == torch.float32 and torch.equal(w, expect)
    assert dequantize_awq(qweight, qzeros, scales, g, dtype=torch.float16).dtype == torch.float16


def test_symmetric_check():
    _, qz = pack_awq(torch.zeros(4, 16, dtype=torch.uint8), torch.full((2, 16), 8, dtype=torch.uint8))
    assert is_symmetric_grace(qz)
    _, qz = pack_awq(torch.zeros(4, 16, dtype=torch.uint8), torch.full((2, 16), 7, dtype=torch.uint8))
    assert not is_symmetric_grace(qz)


def _triple(in_f=256, out_f=16, g=128):
    qweight, qzeros = pack_awq(torch.zeros(in_f, out_f, dtype=torch.uint8),
                               torch.full((in_f // g, out_f), 8, dtype=torch.uint8))
    return qweight, qzeros, torch.ones(in_f // g, out_f, dtype=torch.float16)


@pytest.mark.parametrize("mutate, message", [
    (lambda q, z, s: (q.float(), z, s, 128), "qweight must be int32"),
    (lambda q, z, s: (q, z.to(torch.int64), s, 128), "qzeros must be int32"),
    (lambda q, z, s: (q, z, s.to(torch.int32), 128), "scales must be a floating"),
    (lambda q, z, s: (q, z, s, 96), "does not divide in_features"),
    (lambda q, z, s: (q, z, s, 64), "scales has shape"),
    (lambda q, z, s: (q[:200], z, s, 128), "does not divide in_features=200"),
    (lambda q, z, s: (q, z[:1], s, 128), "qzeros has shape"),
    (lambda q, z, s: (q, z, s[:, :8], 128), "scales has shape"),
    (lambda q, z, s: (q.reshape(-1), z, s, 128), "must be 2-D"),
    (lambda q, z, s: (q, z, s, 0), "group_size must be a positive int"),
])
def test_dequantize_rejects_bad_input(mutate, message):
    with pytest.raises(FormatError, match=message):
        dequantize_awq(*mutate(*_triple()))


@pytest.mark.parametrize("codes, zeros, message", [
    (torch.full((4, 8), 16, dtype=torch.uint8), torch.zeros(1, 8, dtype=torch.uint8), r"\[16, 16\]"),
    (torch.full((4, 8), -1, dtype=torch.int16), torch.zeros(1, 8, dtype=torch.int16), r"\[-1, -1\]"),
    (torch.zeros(4, 8), torch.zeros(1, 8), "must be an integer tensor"),
    (torch.zeros(4, 12, dtype=torch.uint8), torch.zeros(1, 12, dtype=torch.uint8), "multiple of 8"),
    (torch.zeros(4, 8, dtype=torch.uint8), torch.zeros(3, 8, dtype=torch.uint8), "does not divide"),
    (torch.zeros(4, 8, dtype=torch.uint8), torch.zeros(1, 16, dtype=torch.uint8), "columns"),
])
def test_pack_rejects_bad_input(codes, zeros, message):
    with pytest.raises(FormatError, match=message):
        pack_awq(codes, zeros)


def test_unpack_rejects_mismatched_tensors():
    q, z, _ = _triple()
    with pytest.raises(FormatError, match="words per row"):
        unpack_awq(q, z[:, :1])
    with pytest.raises(FormatError, match="does not divide"):
        unpack_awq(q[:255], z)
