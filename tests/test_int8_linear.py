"""INT8 (W8, symmetric int8 codes, fp32 group scales): Int8Linear's backends against an independent float64
product, the native kernels' row/thread invariance and code paths, exact code recovery from GRACE QAT W8
layers (and its refusals), the compressed-tensors 8-bit pack-quantized codec."""
import copy

import pytest
import torch

from gracevlm.errors import FormatError, InputError
from gracevlm.formats import w8
from gracevlm.kernels import native_int8
from gracevlm.nn import Int8Linear

LIB = native_int8.load_library()
needs_lib = pytest.mark.skipif(LIB is None, reason="native INT8 library could not be built or loaded")

LAYERS = [  # in, out, group, bias
    (128, 8, 128, True), (256, 40, 64, False), (384, 24, 128, True), (2048, 16, 2048, False),
    (640, 24, 32, True), (1024, 72, 256, False),
]
ROWS = [1, 3, 17, 64]


def random_layer(in_f, out_f, g, bias, seed=0, **kw) -> Int8Linear:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (out_f, in_f), dtype=torch.int8, generator=gen)
    s = torch.rand(out_f, in_f // g, generator=gen) * 0.02 + 1e-4
    b = torch.randn(out_f, generator=gen).to(torch.bfloat16) if bias else None
    return Int8Linear(q, s, b, g, **kw)


def exact(layer, x):
    """x @ (q * s)^T + b in float64, from the codes and scales (independent of the layer's code)."""
    g = layer.group_size
    w = layer.qweight.double() * layer.scales.double().repeat_interleave(g, dim=1)
    y = x.double() @ w.t()
    return y if layer.bias is None else y + layer.bias.double()


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def kernel_only():
    backend = copy.copy(native_int8.INT8_BACKENDS["native"])
    backend.gemm_min_rows = 1 << 30
    return backend


@pytest.mark.parametrize("layer_args", LAYERS)
def test_reference_and_dense_are_the_fp32_product(layer_args):
    layer = random_layer(*layer_args)
    x = torch.randn(5, layer.in_features)
    w = layer.dequantize()
    assert torch.equal(w, layer.qweight.float() * layer.scales.repeat_interleave(layer.group_size, 1))
    for name in ("reference", "dense"):
        assert rel_err(native_int8.INT8_BACKENDS[name].matmul(layer, x), exact(layer, x)) <= 1e-6


@needs_lib
@pytest.mark.parametrize("layer_args", LAYERS)
@pytest.mark.parametrize("rows", ROWS)
def test_native_matches_exact_product(layer_args, rows):
    layer = random_layer(*layer_args)
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(rows))
    ref = exact(layer, x)
    y = native_int8.INT8_BACKENDS["native"].matmul(layer, x)
    assert y.shape == (rows, layer.out_features) and y.dtype == torch.float32
    assert rel_err(y, ref) <= 2e-6
    assert rel_err(kernel_only().matmul(layer, x), ref) <= 2e-6  # the small-M kernel at every M
    assert rel_err(native_int8.INT8_BACKENDS["native-i16"].matmul(layer, x), ref) <= 8e-5  # approximate


@needs_lib
@pytest.mark.parametrize("layer_args", LAYERS[:3])
def test_rows_do_not_depend_on_batch_or_threads(layer_args, monkeypatch):
    layer = random_layer(*layer_args)
    x = torch.randn(9, layer.in_features)
    k = kernel_only()
    batch = k.matmul(layer, x)
    for m in (0, 4, 8):
        assert torch.equal(batch[m], k.matmul(layer, x[m:m + 1])[0])
    assert torch.equal(batch[3:6], k.matmul(layer, x[3:6]))
    monkeypatch.setenv("GRACEVLM_NUM_THREADS", "1")
    one = k.matmul(layer, x)
    monkeypatch.setenv("GRACEVLM_NUM_THREADS", "3")
    assert torch.equal(one, batch) and torch.equal(k.matmul(layer, x), batch)
    ig = native_int8.INT8_BACKENDS["native-i16"]  # the integer GEMM keeps rows independent too
    assert torch.equal(ig.matmul(layer, x)[5], ig.matmul(layer, x[5:6])[0])


@needs_lib
def test_scalar_code_path_matches():
    best = LIB.gv8_set_isa(-1)
    layers = [random_layer(*args) for args in LAYERS]
    try:
        assert LIB.gv8_set_isa(0) == 0
        for layer in layers:
            x = torch.randn(5, layer.in_features)
            y = kernel_only().matmul(layer, x)
            assert rel_err(y, exact(layer, x)) <= 2e-6
            assert torch.equal(y[2], kernel_only().matmul(layer, x[2:3])[0])
            if layer.group_size <= 256 and layer.group_size % 64 == 0:
                assert rel_err(native_int8.INT8_BACKENDS["native-i16"].matmul(layer, x), exact(layer, x)) <= 8e-5
        w = torch.empty(layers[1].out_features, layers[1].in_features)
        assert LIB.gv8_dequant(layers[1].qweight.data_ptr(), layers[1].scales.data_ptr(), 256, 40, 64, 0, 40,
                               w.data_ptr(), 256, 2) == 0
        assert torch.equal(w, layers[1].dequantize())
    finally:
        assert LIB.gv8_set_isa(-1) == best


@needs_lib
def test_dequantized_tiles_are_bit_exact():
    layer = random_layer(384, 24, 128, False)
    w = torch.full((10, 400), 7.0)
    assert LIB.gv8_dequant(layer.qweight.data_ptr(), layer.scales.data_ptr(), 384, 24, 128, 5, 15, w.data_ptr(),
                           400, 2) == 0
    assert torch.equal(w[:, :384], layer.dequantize(5, 15)) and (w[:, 384:] == 7).all()


@needs_lib
def test_special_values_and_unsupported_layouts():
    layer = random_layer(256, 16, 128, False)
    x = torch.randn(3, 256)
    x[0, :128] = 0.0  # an all-zero group
    x[1, 5] = float("nan")
    x[2, 200] = float("inf")
    y, ref = kernel_only().matmul(layer, x), exact(layer, x).float()
    assert rel_err(y[0], ref[0]) <= 2e-6
    assert torch.isnan(y[1]).all() and torch.isnan(ref[1]).all()
    assert torch.isnan(y[2]).all() and not torch.isfinite(ref[2]).any()  # inf in: NaN here, +-inf in fp32
    for in_f, g in ((96, 48), (64, 16)):  # groups the kernels do not take: the dense path, exact
        odd = random_layer(in_f, 8, g, True)
        xo = torch.randn(2, in_f)
        assert rel_err(odd(xo), exact(odd, xo)) <= 1e-6


def test_forward_dispatch_dtypes_and_autograd():
    layer = random_layer(256, 40, 64, True)
    x = torch.randn(2, 3, 256)
    y = layer(x)
    assert y.shape == (2, 3, 40) and rel_err(y.reshape(6, 40), exact(layer, x.reshape(6, 256))) <= 2e-6
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16
    xg = torch.randn(4, 256, requires_grad=True)
    layer(xg).sum().backward()
    assert torch.allclose(xg.grad, layer.dequantize().sum(0).expand(4, -1), rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="unknown INT8 backend"):
        random_layer(128, 8, 128, False, backend="nope")(torch.randn(1, 128))
    with pytest.raises(ValueError, match=r"expects input \[\.\.\., 256\]"):
        layer(torch.randn(2, 255))
    with pytest.raises(FormatError, match="scales"):
        Int8Linear(layer.qweight, layer.scales[:, :2], None, 64)
    state = layer.state_dict()
    assert set(state) == {"qweight", "scales", "bias"}
    wide = random_layer(128, 1024, 128, False)  # several dequantized tiles; gradients through each
    native_int8.MAX_TILE_ELEMS, saved = 128 * 256, native_int8.MAX_TILE_ELEMS
    try:
        xg = torch.randn(3, 128, requires_grad=True)
        (wide(xg) * torch.arange(1024.0)).sum().backward()
        assert torch.allclose(xg.grad, (torch.arange(1024.0) @ wide.dequantize()).expand(3, -1), rtol=1e-4, atol=1e-4)
    finally:
        native_int8.MAX_TILE_ELEMS = saved
    half = random_layer(256, 40, 64, True).to(torch.bfloat16)  # a model cast keeps the fp32 scales
    assert half.scales.dtype == torch.float32 and torch.equal(half.scales, random_layer(256, 40, 64, True).scales)


# ---- GRACE QAT W8 ---------------------------------------------------------------------------------------

def baked_qat_layer(out_f=24, in_f=256, g=128, seed=0, ls_dtype=torch.float32):
    """A QAT W8 layer as GRACE bakes it: W_q = bf16(q * exp(float32(log_scale))), with extreme codes present."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (out_f, in_f), dtype=torch.int8, generator=gen)
    q[0, :2] = torch.tensor([-128, 127], dtype=torch.int8)
    log_scale = (torch.rand(out_f * in_f // g, generator=gen) * 6 - 9).to(ls_dtype)
    s = torch.exp(log_scale.to(torch.float32)).reshape(out_f, in_f // g)
    w = (q.float() * s.repeat_interleave(g, 1)).to(torch.bfloat16)
    return q, log_scale, s, w


@pytest.mark.parametrize("ls_dtype", [torch.float32, torch.bfloat16])
def test_qat_codes_recovered_exactly_and_exported_back(ls_dtype):
    q, log_scale, s, w = baked_qat_layer(ls_dtype=ls_dtype)
    bias = torch.randn(24).to(torch.bfloat16)
    layer = Int8Linear.from_qat(w, log_scale, bias, 128, name="model.layers.0.mlp.up_proj")
    assert torch.equal(layer.qweight, q) and torch.equal(layer.scales, s)
    w_back, ls_back = layer.to_qat()
    assert w_back.dtype == torch.bfloat16 and torch.equal(w_back, w)
    assert ls_back.dtype == ls_dtype and torch.equal(ls_back, log_scale)
    codes = layer.to_codes()
    assert torch.equal(codes.qweight, q) and torch.equal(codes.bias, bias)
    # the layer computes q * s in fp32, not the baked bf16 weight
    assert torch.equal(layer.dequantize(), q.float() * s.repeat_interleave(128, 1))
    with pytest.raises(FormatError, match="no QAT form"):
        Int8Linear(q, s, None, 128).to_qat()


def test_qat_one_group_per_row_when_in_features_does_not_divide():
    q, log_scale, s, w = baked_qat_layer(out_f=8, in_f=192, g=192)
    layer = Int8Linear.from_qat(w, log_scale, group_size=128)
    assert layer.group_size == 192 and torch.equal(layer.qweight, q)


def test_qat_refuses_a_corrupted_layer_naming_the_element():
    q, log_scale, s, w = baked_qat_layer()
    bad = w.clone()
    bad[3, 77] = torch.nextafter(bad[3, 77].float(), torch.tensor(float("inf"))).to(torch.bfloat16)  # off the grid
    if torch.equal(bad, w):  # nextafter in fp32 can round back: step one bf16 ulp instead
        bad.view(torch.int16)[3, 77] += 1
    with pytest.raises(FormatError, match=r"model\.layers\.1\.mlp\.down_proj.*element \[3, 77\]"):
        Int8Linear.from_qat(bad, log_scale, name="model.layers.1.mlp.down_proj")
    big = w.clone()
    big[0, 5] = (torch.tensor(140.0) * s[0, 0]).to(torch.bfloat16)  # code 140: outside int8
    with pytest.raises(FormatError, match=r"element \[0, 5\].*outside \[-128, 127\]"):
        Int8Linear.from_qat(big, log_scale, name="q_proj")
    with pytest.raises(FormatError, match="scale entries"):
        Int8Linear.from_qat(w, log_scale[:-1], name="q_proj")
    with pytest.raises(FormatError, match="non-finite"):
        Int8Linear.from_qat(w, torch.full_like(log_scale, float("-inf")), name="q_proj")
    with pytest.raises(FormatError, match="2-D floating"):
        Int8Linear.from_qat(q, log_scale, name="q_proj")


# ---- compressed-tensors pack-quantized, 8 bits ------------------------------------------------------------

def test_pack_quantized_int8_layout_and_round_trip():
    q = torch.tensor([[-128, -1, 0, 127, 5, -6]], dtype=torch.int8)
    packed = w8.pack_quantized_int8(q)
    # u = q + 128 = [0, 127, 128, 255 | 133, 122, 0, 0]: element i in bits 8*(i % 4) of word i // 4
    expect = [0 | 127 << 8 | 128 << 16 | 255 << 24, 133 | 122 << 8]
    assert packed.dtype == torch.int32 and packed.tolist() == [[v - 2**32 if v >= 2**31 else v for v in expect]]
    assert torch.equal(w8.unpack_quantized_int8(packed, (1, 6)), q)
    layer = random_layer(384, 24, 128, True)
    codes = layer.to_codes()
    tensors = w8.to_compressed_tensors_w8(codes)
    assert tensors["weight_shape"].tolist() == [24, 384] and tensors["weight_packed"].shape == (24, 96)
    back = w8.from_compressed_tensors_w8(tensors, 128, bias=codes.bias)
    assert torch.equal(back.qweight, codes.qweight) and torch.equal(back.scales, codes.scales)
    x = torch.randn(2, 384)
    assert torch.equal(Int8Linear.from_codes(back)(x), layer(x))
    with pytest.raises(FormatError, match="weight_packed"):
        w8.unpack_quantized_int8(tensors["weight_packed"][:, :-1], tensors["weight_shape"])
    with pytest.raises(FormatError, match="lacks"):
        w8.from_compressed_tensors_w8({"weight_packed": tensors["weight_packed"]})


# ---- build and fallback -------------------------------------------------------------------------------------

def test_fallback_when_library_unavailable(monkeypatch):
    layer = random_layer(256, 40, 64, True)
    x = torch.randn(3, 256)
    monkeypatch.setattr(native_int8, "load_library", lambda: None)
    assert native_int8.select_int8_backend(torch.device("cpu")).name == "dense"
    for name in ("native", "native-i16"):
        assert rel_err(native_int8.INT8_BACKENDS[name].matmul(layer, x), exact(layer, x)) <= 1e-6
    assert not native_int8.igemm_preferred()


@needs_lib
def test_compile_on_first_use_and_stale_builds(tmp_path, monkeypatch):
    import shutil
    import os
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native_int8, "LIB_STEM", "_no_such_build")  # as in a source tree without a build
    lib = native_int8._load()
    assert lib.gv8_source_hash().decode() == native_int8.source_hash()
    built = list((tmp_path / "gracevlm").glob("gv_int8-*.so"))
    assert built and native_int8._try_load(built[0], "0" * 16) is None


def test_concat_is_the_parts_side_by_side():
    """``Int8Linear.concat`` (the loader's q/k/v and gate/up fusion): codes, scales, biases and log_scales
    concatenate along the outputs, and each output equals the part's own, bitwise."""
    parts = [random_layer(256, o, 64, True, seed=i) for i, o in enumerate((16, 8, 8))]
    for p in parts:
        p.register_buffer("log_scale", p.scales.log().reshape(-1))
    fused = Int8Linear.concat(parts)
    assert fused.out_features == 32 and torch.equal(fused.log_scale, torch.cat([p.log_scale for p in parts]))
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(5))
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))
    with pytest.raises(ValueError, match="bias"):
        Int8Linear.concat([parts[0], random_layer(256, 8, 64, False)])
    with pytest.raises(ValueError, match="in_features"):
        Int8Linear.concat([parts[0], random_layer(128, 8, 64, True)])


@needs_lib
@pytest.mark.parametrize("args", [(2048, 1001, 128, True), (4096, 66, 128, False), (6144, 40, 128, True),
                                  (640, 37, 32, False), (1024, 72, 256, True), (256, 9, 64, False)])
def test_avx512_path_gives_the_avx2_bits(args, monkeypatch):
    """With AVX-512 VNNI, M = 1 runs vpdpwssd over several weight rows at once: bitwise the AVX2 result,
    whatever the row count per task (1001 rows: tasks that are not a multiple of 4) and the threads."""
    best = LIB.gv8_set_isa(-1)
    if best != 3:
        pytest.skip("this CPU has no AVX-512 VNNI path")
    layer = random_layer(*args)
    x = torch.randn(1, layer.in_features)
    out = {}
    try:
        for level in (2, 3):
            assert LIB.gv8_set_isa(level) == level
            for threads in ("1", "2"):
                monkeypatch.setenv("GRACEVLM_NUM_THREADS", threads)
                out[level, threads] = kernel_only().matmul(layer, x)
    finally:
        assert LIB.gv8_set_isa(-1) == best
    assert all(torch.equal(out[2, "1"], y) for y in out.values())
    assert rel_err(out[3, "2"], exact(layer, x)) <= 2e-6
