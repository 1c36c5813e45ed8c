"""kernels.norm_rope (csrc/gv_norm.c): rotary bitwise torch's formula, RMSNorm within fp32 rounding of the
float64 formula and row-invariant, same bits on every code path, fallbacks where it does not apply."""
import pytest
import torch
import torch.nn.functional as F

from gracevlm.kernels import native_int8, norm_rope
from gracevlm.models.llama import _rotate_half

LIB = native_int8.load_library()
needs_lib = pytest.mark.skipif(LIB is None, reason="native library could not be built or loaded")


@needs_lib
@pytest.mark.parametrize("shape", [(1, 1, 16, 128), (2, 5, 8, 64), (3, 7, 4, 6)])
def test_rotary_is_bitwise_the_torch_formula(shape):
    b, t, h, d = shape
    gen = torch.Generator().manual_seed(d)
    wide = torch.randn(b, t, 3 * h * d, generator=gen)
    x = wide[..., h * d: 2 * h * d].view(b, t, h, d)  # strided rows, as a fused qkv split gives
    c, s = torch.randn(b, t, d, generator=gen), torch.randn(b, t, d, generator=gen)
    ref = x * c.unsqueeze(2) + _rotate_half(x) * s.unsqueeze(2)
    assert torch.equal(norm_rope.rotary(x, c, s), ref)


@needs_lib
@pytest.mark.parametrize("d", [7, 128, 2048, 4096])
def test_rms_norm_close_to_float64_rows_independent_every_path(d):
    gen = torch.Generator().manual_seed(d)
    x, w = torch.randn(6, d, generator=gen) * 3, torch.randn(d, generator=gen)
    ref = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    y = norm_rope.rms_norm(x, w, 1e-6)
    assert float((y.double() - ref).norm() / ref.norm()) <= 2e-7
    assert torch.equal(y[4], norm_rope.rms_norm(x[4:5], w, 1e-6)[0])
    best = LIB.gv8_set_isa(-1)
    try:
        LIB.gv8_set_isa(0)
        assert torch.equal(norm_rope.rms_norm(x, w, 1e-6), y)
    finally:
        LIB.gv8_set_isa(-1)
    assert LIB.gv8_set_isa(-1) == best


def test_falls_back_where_it_does_not_apply():
    w = torch.randn(8, requires_grad=True)
    x = torch.randn(2, 8)
    assert norm_rope.rms_norm(x, w, 1e-6) is None  # gradients wanted
    assert norm_rope.rms_norm(x.double(), w.detach().double(), 1e-6) is None
    old = norm_rope.set_enabled(False)
    try:
        assert norm_rope.rms_norm(x, w.detach(), 1e-6) is None
    finally:
        norm_rope.set_enabled(old)
    if LIB is not None:  # where it applies it agrees with torch's own RMSNorm up to rounding
        assert torch.allclose(norm_rope.rms_norm(x, w.detach(), 1e-6), F.rms_norm(x, (8,), w.detach(), 1e-6))
