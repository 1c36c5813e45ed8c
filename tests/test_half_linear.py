"""HalfLinear (fp16/bf16 weight kept as stored, fp32 compute): agreement with an fp32 nn.Linear holding the
same values, row independence, every code path, the GEMM path and bad input."""
import pytest
import torch

from gracevlm.kernels import native
from gracevlm.nn import HalfLinear

LIB = native.load_library()
needs_lib = pytest.mark.skipif(LIB is None, reason="native INT4 library could not be built or loaded")
PATHS = {0: "scalar", 2: "AVX2", 3: "AVX-512"}


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def fp32_reference(weight, x):
    return x.double() @ weight.double().t()  # each half value is exactly a double


@needs_lib
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_f,out_f", [(64, 8), (4096, 96), (200, 33), (7, 5), (1000, 1)])
@pytest.mark.parametrize("rows", [1, 3, 15, 16, 40])
def test_matches_fp32_reference(dtype, in_f, out_f, rows):
    gen = torch.Generator().manual_seed(in_f * 7 + out_f)
    w = (torch.randn(out_f, in_f, generator=gen) * 0.05).to(dtype)
    x = torch.randn(rows, in_f, generator=gen)
    y = HalfLinear(w)(x)
    assert y.dtype == torch.float32 and y.shape == (rows, out_f)
    assert rel_err(y, fp32_reference(w, x)) <= 2e-6


@needs_lib
@pytest.mark.parametrize("level", sorted(PATHS))
def test_every_code_path_and_row_independence(level):
    best = LIB.gv_set_isa(-1)
    if level > best:
        pytest.skip(f"this CPU has no {PATHS[level]} path")
    gen = torch.Generator().manual_seed(1)
    try:
        assert LIB.gv_set_isa(level) == level
        for dtype in (torch.float16, torch.bfloat16):
            head = HalfLinear((torch.randn(300, 4160, generator=gen) * 0.02).to(dtype))  # 4160 = 65*64: a tail
            x = torch.randn(9, 4160, generator=gen)
            y = head(x)
            assert head.rows_independent(9)
            for r in range(9):
                assert torch.equal(y[r], head(x[r:r + 1])[0])
            tol = 5e-6 if level == 0 else 2e-6  # the scalar path sums one long fp32 chain
            assert rel_err(y, fp32_reference(head.weight, x)) <= tol
    finally:
        assert LIB.gv_set_isa(-1) == best


@needs_lib
def test_strided_input_leading_dims_and_empty():
    head = HalfLinear(torch.randn(16, 128).half())
    x = torch.randn(2, 3, 256)[..., ::2]  # non-contiguous last dim
    y = head(x)
    assert y.shape == (2, 3, 16)
    assert rel_err(y.reshape(6, 16), fp32_reference(head.weight, x.reshape(6, 128))) <= 2e-6
    assert head(torch.randn(0, 128)).shape == (0, 16)


def test_gemm_path_without_library(monkeypatch):
    monkeypatch.setattr(native, "load_library", lambda: None)
    w = torch.randn(40, 64).bfloat16()
    head = HalfLinear(w)
    head.tile_elems = 64 * 16  # several tiles
    x = torch.randn(3, 64)
    assert not head.rows_independent(3)
    assert rel_err(head(x), fp32_reference(w, x)) <= 2e-6


def test_rejects_non_half_weights():
    with pytest.raises(ValueError, match="fp16/bf16"):
        HalfLinear(torch.randn(4, 4))
    with pytest.raises(ValueError, match="2-D"):
        HalfLinear(torch.randn(4).half())
