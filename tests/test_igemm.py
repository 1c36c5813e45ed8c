"""The integer prefill GEMM for INT4 layers (``native-igemm``, csrc/gv_igemm.c): agreement with reference
within its stated error, rows independent of the batch and the thread count, every code path."""
import functools

import pytest
import torch

from gracevlm import kernels
from gracevlm.formats.awq import dequantize_awq
from gracevlm.kernels import native, native_int8
from int4_helpers import random_int4_layer

LIB8 = native_int8.load_library()
needs_lib = pytest.mark.skipif(LIB8 is None or native.load_library() is None,
                               reason="native libraries could not be built or loaded")
LAYERS = [  # in, out, group, bias, symmetric
    (128, 8, 64, True, False), (256, 40, 64, False, False), (384, 4104, 128, True, True),
    (1024, 48, 128, False, False), (512, 16, 512, True, False), (4096, 8, 4096, False, True),
    (2560, 24, 128, True, False), (768, 200, 256, False, True),
]


@functools.lru_cache(maxsize=None)
def make_layer(*args):
    return random_int4_layer(*args, torch.Generator().manual_seed(0))


def exact(layer, x):
    w = dequantize_awq(layer.qweight, layer.qzeros, layer.scales, layer.group_size).double()
    y = x.double() @ w
    return y if layer.bias is None else y + layer.bias.double()


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def igemm_always():
    backend = native_int8.NativeIGemmBackend()
    backend.gemm_min_rows = 1
    return backend


@needs_lib
@pytest.mark.parametrize("layer_args", LAYERS)
@pytest.mark.parametrize("rows", [1, 5, 16, 67])
def test_igemm_matches_reference(layer_args, rows):
    layer = make_layer(*layer_args)
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(rows))
    y = igemm_always().matmul(layer, x)
    assert y.shape == (rows, layer.out_features) and y.dtype == torch.float32
    assert rel_err(y, exact(layer, x)) <= 6e-5  # 16-bit activations: ~2.5e-5 measured; the budget 1e-4


@needs_lib
def test_igemm_rows_independent_of_batch_and_threads(monkeypatch):
    layer = make_layer(1024, 48, 128, False, False)
    x = torch.randn(13, 1024)
    b = igemm_always()
    batch = b.matmul(layer, x)
    for m in (0, 5, 12):
        assert torch.equal(batch[m], b.matmul(layer, x[m:m + 1])[0])
    assert torch.equal(batch[2:9], b.matmul(layer, x[2:9]))
    monkeypatch.setenv("GRACEVLM_NUM_THREADS", "1")
    assert torch.equal(b.matmul(layer, x), batch)
    monkeypatch.setenv("GRACEVLM_NUM_THREADS", "3")
    assert torch.equal(b.matmul(layer, x), batch)


@needs_lib
def test_igemm_scalar_path_and_fallbacks():
    best = LIB8.gv8_set_isa(-1)
    layers = [make_layer(*args) for args in LAYERS[:2] + LAYERS[4:6]]
    try:
        xs = [torch.randn(6, lay.in_features) for lay in layers]
        fast = [igemm_always().matmul(lay, x) for lay, x in zip(layers, xs)]
        assert LIB8.gv8_set_isa(0) == 0
        for lay, x, f in zip(layers, xs, fast):
            y = igemm_always().matmul(lay, x)
            assert rel_err(y, exact(lay, x)) <= 6e-5 and torch.equal(y, f)  # same operations: same bits
    finally:
        assert LIB8.gv8_set_isa(-1) == best
    # below its crossover, and for groups of 32, it is ``native``
    layer = make_layer(256, 40, 64, False, False)
    x = torch.randn(2, 256)
    assert torch.equal(kernels.get_backend("native-igemm").matmul(layer, x), native.NativeBackend().matmul(layer, x))
    g32 = random_int4_layer(128, 8, 32, True, False, torch.Generator().manual_seed(1))
    x = torch.randn(40, 128)
    assert torch.equal(igemm_always().matmul(g32, x), native.NativeBackend().matmul(g32, x))
