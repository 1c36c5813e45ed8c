"""Native C INT4 backend: agreement with reference across shapes, modes, dtypes, strides, threads and
code paths; the build/load fallbacks."""
import functools
import os
import shutil
import warnings

import pytest
import torch

from gracevlm import kernels
from gracevlm.formats.awq import dequantize_awq
from gracevlm.kernels import native, native_int8
from gracevlm.nn import Int4Linear
from int4_helpers import random_int4_layer

LIB = native.load_library()
# the automatic CPU choice: ``native``, or on the AVX2 path ``native`` with the integer prefill GEMM
AUTO = "native-igemm" if native_int8.igemm_preferred() else "native"
needs_lib = pytest.mark.skipif(LIB is None, reason="native INT4 library could not be built or loaded")

# relative L2 tolerance vs reference for each small-M mode (measured errors are in native.py)
MODES = {"f32": (native.MODE_F32, 2e-6), "i8x3": (native.MODE_I8X3, 2e-6), "i8x2": (native.MODE_I8X2, 1.5e-4)}
LAYERS = [  # in, out, group, bias, symmetric (GRACE zeros = 8)
    (128, 8, 32, True, False), (256, 40, 64, False, False), (384, 4104, 128, True, True),
    (1024, 48, 128, False, False), (512, 16, 512, True, False), (192, 24, 64, False, True),
    (2304, 24, 192, True, False),  # K blocks of 1920 + 384 inputs, groups of an odd number of chunks
    (2112, 16, 32, False, False), (4096, 8, 4096, False, True),  # K blocks 2048 + 64; one group > K block
    (2560, 24, 128, True, False),  # AVX-512: K blocks 2048 + 512, 20 groups = a full and a partial lane set
]
ROWS = [1, 2, 3, 7, 16, 33, 300]


@functools.lru_cache(maxsize=None)
def make_layer(in_f, out_f, g, bias, symmetric, seed=0):
    return random_int4_layer(in_f, out_f, g, bias, symmetric, torch.Generator().manual_seed(seed))


_DENSE_W: dict[int, tuple] = {}  # id(layer) -> (layer, weight); holding the layer keeps its id unique


def reference(layer, x):
    """What the ``reference`` backend computes, with the dequantized weight cached per layer (speed)."""
    if id(layer) not in _DENSE_W:
        w = dequantize_awq(layer.qweight, layer.qzeros, layer.scales, layer.group_size)
        _DENSE_W[id(layer)] = (layer, w)
    y = x.to(torch.float32) @ _DENSE_W[id(layer)][1]
    if layer.bias is not None:
        y = y + layer.bias.to(torch.float32)
    return y.to(x.dtype)


def test_reference_helper_is_the_reference_backend():
    layer = make_layer(256, 40, 64, True, False)
    x = torch.randn(5, 256)
    assert torch.equal(reference(layer, x), kernels.get_backend("reference").matmul(layer, x))


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def small_m(mode):
    """A native backend that runs gv_matmul in ``mode`` at every M (never dequantize + GEMM)."""
    backend = native.NativeBackend()
    backend.mode, backend.gemm_min_rows = mode, 1 << 30
    return backend


@needs_lib
@pytest.mark.parametrize("layer_args", LAYERS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("mode", sorted(MODES))
def test_small_m_kernel_matches_reference(layer_args, rows, mode):
    layer = make_layer(*layer_args)
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(rows))
    y = small_m(MODES[mode][0]).matmul(layer, x)
    assert y.shape == (rows, layer.out_features) and y.dtype == torch.float32
    assert rel_err(y, reference(layer, x)) <= MODES[mode][1]


@needs_lib
@pytest.mark.parametrize("layer_args", LAYERS)
@pytest.mark.parametrize("rows", [1, 16, 300])
def test_dequant_gemm_path_is_exact(layer_args, rows):
    layer = make_layer(*layer_args)
    backend = native.NativeBackend()
    backend.gemm_min_rows = 1
    x = torch.randn(rows, layer.in_features)
    assert rel_err(backend.matmul(layer, x), reference(layer, x)) <= 5e-6  # fp32 sums of up to 4096 products in another order


@needs_lib
def test_dequantized_weights_are_bit_exact():
    layer = make_layer(1024, 48, 128, False, False)
    state = native.NativeBackend()._prepare(layer, LIB)
    w = torch.empty(layer.out_features, layer.in_features)
    assert LIB.gv_dequant(state["packed"].data_ptr(), 1024, 48, 128, 2, 0, 48, w.data_ptr(), 1024, 2) == 0
    assert torch.equal(w.t(), dequantize_awq(layer.qweight, layer.qzeros, layer.scales, 128))


@needs_lib
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_auto_backend_bf16_and_leading_dims(rows):
    layer = make_layer(384, 4104, 128, True, True)
    x = torch.randn(2, rows, 384).to(torch.bfloat16)
    layer.backend = None
    assert kernels.select_backend(x.device, 2 * rows).name == AUTO
    y = layer(x)
    ref = reference(layer, x.reshape(-1, 384)).reshape(2, rows, -1)
    assert y.dtype == torch.bfloat16 and y.shape == (2, rows, 4104)
    assert rel_err(y, ref) <= 1e-2  # both rounded to bf16 on output


@needs_lib
@pytest.mark.parametrize("mode", sorted(MODES))
def test_strided_and_noncontiguous_inputs(mode):
    layer = make_layer(256, 40, 64, False, False)
    backend = small_m(MODES[mode][0])
    wide = torch.randn(7, 512)
    for x in (wide[:, :256], wide[:, ::2], torch.randn(256, 7).t(), wide[::2, 256:]):
        assert rel_err(backend.matmul(layer, x), reference(layer, x.contiguous())) <= MODES[mode][1]


@needs_lib
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("layer_args", [LAYERS[0], LAYERS[2], LAYERS[6]])
def test_rows_are_computed_alone(mode, layer_args):
    """Batching is invisible below the GEMM crossover: each row is bitwise the M=1 result."""
    layer = make_layer(*layer_args)
    x = torch.randn(11, layer.in_features)
    backend = small_m(MODES[mode][0])
    batched = backend.matmul(layer, x)
    for r in range(11):
        assert torch.equal(batched[r], backend.matmul(layer, x[r:r + 1])[0])
    assert torch.equal(batched[3:10], backend.matmul(layer, x[3:10]))


@needs_lib
@pytest.mark.parametrize("mode", sorted(MODES))
def test_thread_count_does_not_change_results(mode, monkeypatch):
    layer = make_layer(384, 4104, 128, True, True)
    x = torch.randn(9, 384)
    outs = []
    for nt in ("1", "2", "3"):
        monkeypatch.setenv("GRACEVLM_NUM_THREADS", nt)
        outs.append(small_m(MODES[mode][0]).matmul(layer, x))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])  # rows are split, never K


PATHS = {0: "scalar", 2: "AVX2", 3: "AVX-512 VNNI"}


@needs_lib
@pytest.mark.parametrize("level", sorted(PATHS))
@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_code_path_matches_reference(mode, level):
    """Each code path this CPU has (scalar always; AVX2; AVX-512 VNNI for g % 128 == 0) agrees with the
    reference, and keeps rows independent of their batch."""
    best = LIB.gv_set_isa(-1)
    if level > best:
        pytest.skip(f"this CPU has no {PATHS[level]} path")
    layers = [make_layer(*args) for args in LAYERS[:6]] + [make_layer(*LAYERS[8]), make_layer(*LAYERS[9])]
    try:
        assert LIB.gv_set_isa(level) == level
        for lay in layers:
            x = torch.randn(6, lay.in_features)
            y = small_m(MODES[mode][0]).matmul(lay, x)
            # the scalar path sums a group in one sequential fp32 accumulator (4e-6 for g = 4096)
            assert rel_err(y, reference(lay, x)) <= MODES[mode][1] * (5 if level == 0 else 1)
            assert torch.equal(y[4], small_m(MODES[mode][0]).matmul(lay, x[4:5])[0])
        gemm = native.NativeBackend()
        gemm.gemm_min_rows = 1
        x = torch.randn(3, layers[0].in_features)
        assert rel_err(gemm.matmul(layers[0], x), reference(layers[0], x)) <= 5e-6
    finally:
        assert LIB.gv_set_isa(-1) == best


@needs_lib
def test_unsupported_layouts_fall_back_to_dense():
    for in_f, g in ((96, 32), (256, 16), (384, 96)):  # in % 64 != 0; groups of 16 and 96
        layer = make_layer(in_f, 16, g, True, False)
        x = torch.randn(3, in_f)
        assert rel_err(native.NativeBackend().matmul(layer, x), reference(layer, x)) <= 1e-5
        assert "native" not in layer.kernel_cache


@needs_lib
def test_originals_untouched_and_empty_input():
    layer = make_layer(256, 40, 64, True, False, seed=1)
    before = layer.to_awq()
    layer.backend = "native"
    layer(torch.randn(2, 256))
    assert layer.kernel_cache["native"]["packed"].dtype == torch.uint8
    after = layer.to_awq()
    for name in ("qweight", "qzeros", "scales", "bias"):
        assert torch.equal(getattr(before, name), getattr(after, name))
    assert layer(torch.randn(0, 256)).shape == (0, 40)


@needs_lib
@pytest.mark.parametrize("mode", sorted(MODES))
def test_special_activation_values(mode):
    layer = make_layer(256, 40, 64, True, False)
    backend = small_m(MODES[mode][0])
    x = torch.randn(3, 256)
    x[1, 70] = float("nan")  # NaN in one group of row 1 reaches every output of row 1, as in fp32
    x[2, :64] = 1e-35  # a group below the fixed-point range counts as zero: negligible next to the rest
    y, ref = backend.matmul(layer, x), reference(layer, x)
    assert torch.isnan(y[1]).all() and torch.isnan(ref[1]).all()
    assert rel_err(y[[0, 2]], ref[[0, 2]]) <= MODES[mode][1]
    zero = backend.matmul(layer, torch.zeros(2, 256))
    assert torch.equal(zero, layer.bias.float().expand(2, -1))


@needs_lib
def test_automatic_choice_on_cpu():
    cpu = torch.device("cpu")
    assert [kernels.select_backend(cpu, m).name for m in (1, 24, 512)] == [AUTO] * 3
    assert kernels.select_backend(cpu, 1, "native-i8x2").name == "native-i8x2"  # opt-in only


@needs_lib
@pytest.mark.parametrize("rows", [2, 40])  # small-M kernel and dequantize + GEMM
def test_inference_mode_and_autograd(rows, monkeypatch):
    """State made under inference_mode serves later normal calls; inputs that need a gradient go to
    ``dense`` (the C kernels have no backward)."""
    monkeypatch.setattr(native, "_scratch", type(native._scratch)())  # a fresh scratch buffer
    layer = make_layer(128, 40, 128, True, True, seed=3)
    layer.kernel_cache.clear()
    layer.backend = "native"
    x = torch.randn(rows, 128)
    with torch.inference_mode():
        inside = layer(x)
    assert torch.equal(layer(x), inside)
    xg = x.clone().requires_grad_()
    y = layer(xg)
    y.sum().backward()
    assert rel_err(y.detach(), reference(layer, x)) <= 1e-5 and xg.grad.shape == x.shape


@needs_lib
def test_fp32_and_bf16_scales():
    base = make_layer(256, 40, 64, True, False)
    for dtype in (torch.float32, torch.bfloat16):
        layer = Int4Linear.from_awq(base.qweight, base.qzeros, base.scales.to(dtype), base.bias, group_size=64)
        x = torch.randn(4, 256)
        assert rel_err(small_m(native.MODE_F32).matmul(layer, x), reference(layer, x)) <= MODES["f32"][1]
        assert layer.kernel_cache["native"]["ss"] == 4


def test_fallback_when_library_unavailable(monkeypatch):
    monkeypatch.setattr(native, "load_library", lambda: None)
    cpu = torch.device("cpu")
    assert not kernels.get_backend("native").available(cpu)
    assert kernels.select_backend(cpu, 1).name in ("int4pack", "dense")
    assert kernels.select_backend(cpu, 64).name == "dense"
    layer = make_layer(256, 40, 64, True, False, seed=2)
    x = torch.randn(3, 256)
    assert rel_err(native.NativeBackend().matmul(layer, x), reference(layer, x)) <= 1e-5
    layer.backend = None
    assert rel_err(layer(x), reference(layer, x)) <= 1e-5


def test_loader_warns_once_and_gives_up(monkeypatch):
    def broken():
        raise RuntimeError("no compiler")
    monkeypatch.setattr(native, "_load", broken)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert native.load_library() is None
        assert native.load_library() is None
    assert len(caught) == 1 and "no compiler" in str(caught[0].message)


@needs_lib
def test_stale_build_is_rejected(tmp_path):
    path = next(p for p in [*native._HERE.glob(native.LIB_STEM + "*.so"), *native.cache_dir().glob("*.so")]
                if native._try_load(p, native.source_hash()) is not None)
    assert native._try_load(path, "0" * 16) is None


@pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")
def test_compile_on_first_use(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native, "LIB_STEM", "_no_such_build")  # as in a source tree without a build
    lib = native._load()
    assert lib.gv_source_hash().decode() == native.source_hash()
    assert list((tmp_path / "gracevlm").glob("gv_int4-*.so"))


@needs_lib
def test_compiler_without_avx512_gets_the_avx2_build(tmp_path, monkeypatch):
    """A compiler that rejects the AVX-512 code still yields a working library (AVX2 and scalar paths)."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        pytest.skip("no C compiler")
    wrapper = tmp_path / "cc-without-avx512"
    wrapper.write_text(f'#!/bin/sh\ncase " $* " in *GV_NO_AVX512*) exec {cc} "$@";; esac\n'
                       'echo "error: unknown target attribute avx512vnni" >&2; exit 1\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    out = tmp_path / "lib.so"
    native.compile_library(out, native.source_hash())
    import ctypes
    lib = native._bind(ctypes.CDLL(str(out)))
    assert lib.gv_isa() in (0, 2)
    layer = make_layer(*LAYERS[2])
    info = (ctypes.c_int64 * 3)()
    assert lib.gv_layout(layer.in_features, layer.group_size, 2, info) == 0
    x = torch.randn(3, layer.in_features)
    state = native.NativeBackend._repack(layer, lib)
    y = torch.empty(3, layer.out_features)
    bias = state["bias"]
    assert lib.gv_matmul(state["packed"].data_ptr(), layer.in_features, layer.out_features, layer.group_size, 2,
                         x.data_ptr(), layer.in_features, 3, None if bias is None else bias.data_ptr(),
                         y.data_ptr(), native.MODE_I8X3, 2) == 0
    assert rel_err(y, reference(layer, x)) <= 2e-6


@needs_lib
@pytest.mark.parametrize("args", [LAYERS[2], LAYERS[5], (1024, 200, 128, False, False)])  # 200/8 = 25 words
def test_repack_is_the_same_on_every_code_path(args):
    """The vectorized repack writes the very bytes of the scalar one (padding included)."""
    layer = make_layer(*args)
    best = LIB.gv_set_isa(-1)
    try:
        packed = []
        for level in sorted({0, best}):
            LIB.gv_set_isa(level)
            packed.append(native.NativeBackend._repack(layer, LIB)["packed"])
    finally:
        LIB.gv_set_isa(-1)
    assert all(torch.equal(packed[0], p) for p in packed[1:])


@needs_lib
@pytest.mark.parametrize("args", [LAYERS[0], LAYERS[2], LAYERS[4], LAYERS[9]])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_released_awq_buffers_are_rebuilt_exactly(args, scale_dtype):
    """release_awq frees the AWQ tensors; every way of reading them gives the original bits back."""
    src = make_layer(*args)
    awq = src.to_awq()
    layer = Int4Linear.from_awq(awq.qweight, awq.qzeros, awq.scales.to(scale_dtype), awq.bias,
                                group_size=awq.group_size)
    original = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(5, layer.in_features)
    before = layer(x)
    nbytes = layer.nbytes()
    assert native.NativeBackend().release_awq(layer) and layer.awq_released
    assert "qweight" not in dict(layer.named_buffers())  # really freed
    assert torch.equal(layer(x), before)
    assert layer.nbytes() == nbytes and layer.device.type == "cpu"
    for name in ("qweight", "qzeros", "scales"):
        assert torch.equal(getattr(layer, name), original[name]) and getattr(layer, name).dtype == original[name].dtype
    got = layer.state_dict()
    assert set(got) == set(original) and all(torch.equal(got[k], original[k]) for k in original)
    back = layer.to_awq()
    assert torch.equal(back.qweight, original["qweight"]) and torch.equal(back.scales, original["scales"])
    assert torch.equal(kernels.get_backend("reference").matmul(layer, x), reference(layer, x))
    fused = Int4Linear.concat([layer, src])  # concat reads the released tensors
    assert torch.equal(fused.to_awq().qweight[:, :layer.out_features // 8], original["qweight"])
    layer.to("cpu")  # moving restores the buffers (and drops the kernel layouts)
    assert not layer.awq_released and torch.equal(layer.qweight, original["qweight"])
    assert torch.equal(layer(x), before)


@needs_lib
@pytest.mark.parametrize("layer_args", [LAYERS[2], LAYERS[9]])
def test_bf16_gemm_backend_is_documented_approximation(layer_args):
    """native-bf16: below its crossover exactly native; above, the bf16 GEMM within its stated error."""
    layer = make_layer(*layer_args)
    bf16, exact = native.NativeBF16Backend(), native.NativeBackend()
    small = torch.randn(3, layer.in_features)
    assert torch.equal(bf16.matmul(layer, small), exact.matmul(layer, small))
    big = torch.randn(bf16.min_gemm_rows(layer) + 5, layer.in_features)
    err = rel_err(bf16.matmul(layer, big), reference(layer, big))
    assert 1e-5 < err <= 6e-3  # really bf16, and no worse than documented (2.9e-3 measured)


@needs_lib
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_stream_read_probe_reads_every_word(threads):
    """The bandwidth probe of the benchmarks really reads the whole buffer (XOR of its 64-bit words)."""
    words = torch.randint(-2**62, 2**62, (64 * 1000 + 8 * 37,), dtype=torch.int64, generator=torch.Generator().manual_seed(1))
    n = words.numel() * 8 // 64 * 64
    expected = 0
    for w in words[: n // 8].tolist():
        expected ^= w & (2**64 - 1)
    assert LIB.gv_stream_read(words.data_ptr(), n, threads) == expected


@needs_lib
def test_backend_reading_awq_tensors_restores_a_released_layer_once():
    """A forced torch backend on a released layer brings the AWQ buffers back once (not a rebuild per call)."""
    src = make_layer(*LAYERS[2])
    layer = Int4Linear.from_awq(*src.awq_tensors(), src.bias, group_size=src.group_size)
    assert native.NativeBackend().release_awq(layer)
    layer.backend = "dense"
    x = torch.randn(2, layer.in_features)
    y = layer(x)
    assert not layer.awq_released and "qweight" in dict(layer.named_buffers())
    assert rel_err(y, reference(layer, x)) <= 1e-5


@needs_lib
@pytest.mark.parametrize("mode", ["i8x3", "i8x2"])
@pytest.mark.parametrize("args", [(1024, 1000, 128, True, False), (2048, 264, 128, False, True),
                                  (4096, 136, 128, True, False), (6144, 72, 128, False, True), (2560, 24, 128, True, False)])
def test_avx512_multi_row_path_gives_the_one_row_bits(args, mode, monkeypatch):
    """AVX-512, M = 1: the loops over several weight rows at once (2 or 4 adjacent rows, their prefetch chosen
    by row length; 4 rows from the 4 quarters of a task; tasks of rows that are not a multiple of 4) give
    bitwise what the one-row loop gives, on 1 and 2 threads."""
    if LIB.gv_isa() != 3:
        pytest.skip("this CPU has no AVX-512 VNNI path")
    layer = make_layer(*args)
    x = torch.randn(1, layer.in_features)
    out = {}
    try:
        for on in (0, 1, 2):
            assert LIB.gv_set_multi_row(on) in (0, 1, 2)
            for threads in ("1", "2"):
                monkeypatch.setenv("GRACEVLM_NUM_THREADS", threads)
                out[on, threads] = small_m(MODES[mode][0]).matmul(layer, x)
    finally:
        LIB.gv_set_multi_row(2)
    assert all(torch.equal(out[0, "1"], y) for y in out.values())
    assert rel_err(out[2, "2"], reference(layer, x)) <= MODES[mode][1]
    assert LIB.gv_set_multi_row(7) == 2 and LIB.gv_set_multi_row(-1) == 2  # other values change nothing
