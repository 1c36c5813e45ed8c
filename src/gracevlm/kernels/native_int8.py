"""Native kernels of the second C library (``csrc/gv_int8.c``, ``csrc/gv_igemm.c``, ``csrc/gv_attn.c``) and the INT8
backends (the decode attention of ``gv_attn.c`` is wrapped by ``kernels.attention``).

INT8 layers (``nn.Int8Linear``: codes ``qweight`` int8 [O, I], fp32 ``scales`` [O, I/g], optional ``bias``;
W = q * s in fp32) are computed by one of ``INT8_BACKENDS``:

``reference``  W dequantized to fp32 on every call, fp32 matmul: exact by definition (slow; tests).
``dense``      the same product through a reused fp32 tile buffer and ``torch.addmm``: fp32 summation order only.
``native``     M < ``gemm_min_rows``: ``gv8_matmul`` (AVX2 vpmaddwd on int8 codes x 24-bit fixed-point
               activations, the group scale factored out; ~2e-7 relative error, rows bitwise independent of
               M and the thread count); at and above it: exact fp32 tiles (``gv8_dequant``) + ``torch.addmm``.
``native-i16`` APPROXIMATE, opt-in: ``gv_igemm8`` at every M (16-bit activations, ~2.5e-5 relative error).

Also ``NativeIGemmBackend`` (INT4 backend ``native-igemm``): ``native`` with the prefill GEMM replaced by
``gv_igemm4`` (16-bit activations, ~2.5e-5 relative error; see its docstring for when it is used).

Build: ``pip install -e .`` builds ``_gv_int8<EXT_SUFFIX>`` next to this file; otherwise the sources are
compiled on first use into the same cache as the INT4 library (``native.cache_dir()``); if that fails, one
RuntimeWarning and the native INT8 backend delegates to ``dense``. Threads: ``native.num_threads()``.
"""
from __future__ import annotations

import ctypes
import hashlib
import sysconfig
import threading
import warnings

import torch

from ..errors import InputError
from . import native

SOURCES = tuple(native._HERE / "csrc" / name
                for name in ("gv_int8.c", "gv_igemm.c", "gv_attn.c", "gv_norm.c", "gv_layer.c"))
LIB_STEM = "_gv_int8"

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_load_error: str | None = None
_tried = False


def source_hash() -> str:
    """First 16 hex digits of the SHA-256 of the C sources, in order ('' when they are not shipped)."""
    h = hashlib.sha256()
    try:
        for path in SOURCES:
            h.update(path.read_bytes())
    except OSError:
        return ""
    return h.hexdigest()[:16]


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    c_int, c_i64, vp = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    lib.gv8_get_isa.restype = c_int
    lib.gv8_set_isa.argtypes = [c_int]
    lib.gv8_set_isa.restype = c_int
    lib.gv8_matmul.argtypes = [vp, vp, c_int, c_int, c_int, vp, c_i64, c_int, vp, vp, c_int]
    lib.gv8_dequant.argtypes = [vp, vp, c_int, c_int, c_int, c_int, c_int, vp, c_i64, c_int]
    lib.gv_igemm4.argtypes = [vp, c_i64, c_i64, c_i64, c_int, c_int, c_int, c_int, vp, c_i64, c_int, vp, vp, c_int]
    lib.gv_igemm8.argtypes = [vp, vp, c_int, c_int, c_int, vp, c_i64, c_int, vp, vp, c_int]
    lib.gv_attn_decode.argtypes = [vp, c_int, c_int, c_int, vp, vp, c_i64, c_i64, c_int, c_int, ctypes.c_float,
                                   vp, c_int]
    lib.gv_rms_norm.argtypes = [vp, c_i64, vp, vp, c_i64, c_int, c_int, ctypes.c_double]
    lib.gv_attn_block_decode.argtypes = [vp, c_int, c_int, c_int, vp, vp, ctypes.c_double, vp, vp, vp, vp, c_i64,
                                         c_i64, c_int, c_int, ctypes.c_float, vp, c_int]
    lib.gv_rope.argtypes = [vp, c_i64, vp, vp, vp, c_int, c_int, c_int]
    lib.gv_silu_mul.argtypes = [vp, c_i64, vp, c_i64, vp, c_i64, c_int, c_int]
    lib.gv_decode_layers.argtypes = [vp, c_int, c_int, c_int, c_int, c_int, c_int, ctypes.c_double, ctypes.c_double,
                                     vp, vp, vp, vp, c_i64, c_i64, c_i64, c_i64, c_int, c_int, ctypes.c_float, vp,
                                     c_int]
    for fn in (lib.gv8_matmul, lib.gv8_dequant, lib.gv_igemm4, lib.gv_igemm8, lib.gv_attn_decode,
               lib.gv_attn_block_decode, lib.gv_rms_norm, lib.gv_rope, lib.gv_silu_mul, lib.gv_decode_layers):
        fn.restype = c_int
    return lib


def _try_load(path, digest: str) -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(path))
        lib.gv8_source_hash.restype = ctypes.c_char_p
        built_from = lib.gv8_source_hash().decode()
    except (OSError, AttributeError):
        return None
    if digest and built_from != digest:
        return None
    return _bind(lib)


def _load() -> ctypes.CDLL:
    digest = source_hash()
    for path in sorted(native._HERE.glob(LIB_STEM + "*.so")):
        lib = _try_load(path, digest)
        if lib is not None:
            return lib
    if not digest:
        raise RuntimeError(f"no usable {LIB_STEM}*.so in {native._HERE} and no C sources to compile")
    plat = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    cached = native.cache_dir() / f"gv_int8-{digest}-{plat}.so"
    if not cached.exists():
        native.compile_library(cached, digest, SOURCES)
    lib = _try_load(cached, digest)
    if lib is None:
        raise RuntimeError(f"{cached} was built but cannot be loaded")
    return lib


def load_error() -> str | None:
    return _load_error


def load_library() -> ctypes.CDLL | None:
    """The integer-kernel library, or None when it can be neither found nor compiled (warns once)."""
    global _lib, _load_error, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            try:
                _lib = _load()
            except Exception as exc:  # any failure means: fall back to torch
                _load_error = str(exc)
                warnings.warn(f"gracevlm: native INT8 kernels unavailable ({_load_error}); using torch",
                              RuntimeWarning, stacklevel=2)
            _tried = True
    return _lib


def _as_f32_rows(x: torch.Tensor, in_f: int) -> torch.Tensor:
    xf = x.to(torch.float32)
    if xf.stride(-1) != 1 or xf.stride(0) < in_f:
        xf = xf.contiguous()
    return xf


def _bias32(layer) -> torch.Tensor | None:
    cache = layer.kernel_cache
    if "bias32" not in cache:
        cache["bias32"] = None if layer.bias is None else layer.bias.to(torch.float32).contiguous()
    return cache["bias32"]


# ---- INT8 backends --------------------------------------------------------------------------------------

class Int8ReferenceBackend:
    """Exact by definition: ``W = q * s`` (fp32 products), ``x @ W^T`` in fp32, + bias. Slow; the yardstick."""

    name = "reference"

    def available(self, device: torch.device) -> bool:
        return True

    def matmul(self, layer, x: torch.Tensor) -> torch.Tensor:
        w = layer.dequantize()
        y = x.to(torch.float32) @ w.t()
        if layer.bias is not None:
            y = y + layer.bias.to(torch.float32)
        return y.to(x.dtype)


MAX_TILE_ELEMS = native.MAX_TILE_ELEMS  # fp32 elements of one dequantized weight tile (8 MiB)


class Int8DenseBackend:
    """``W = q * s`` in fp32 tiles of at most ``MAX_TILE_ELEMS`` (torch ops, or ``gv8_dequant`` when the library
    is loaded: bit-identical), each followed by ``torch.addmm``. Error: fp32 summation order only (~1e-7)."""

    name = "dense"

    def available(self, device: torch.device) -> bool:
        return True

    def matmul(self, layer, x: torch.Tensor) -> torch.Tensor:
        in_f, out_f, g = layer.in_features, layer.out_features, layer.group_size
        grad = x.requires_grad and torch.is_grad_enabled()  # autograd keeps each tile: no reused buffer then
        lib = (load_library() if layer.qweight.device.type == "cpu" and native_int8_supports(layer) and not grad
               else None)
        xf = x.to(torch.float32)
        bias = _bias32(layer)
        tile = max(8, min(out_f, MAX_TILE_ELEMS // in_f) // 8 * 8)
        y = torch.empty(x.shape[0], out_f, dtype=torch.float32, device=x.device)
        for o0 in range(0, out_f, tile):
            o1 = min(out_f, o0 + tile)
            if lib is not None:
                w = native._buffer((o1 - o0) * in_f).view(o1 - o0, in_f)
                rc = lib.gv8_dequant(layer.qweight.data_ptr(), layer.scales.data_ptr(), in_f, out_f, g, o0, o1,
                                     w.data_ptr(), in_f, native.num_threads())
                if rc != 0:
                    raise RuntimeError(f"gv8_dequant failed with code {rc}")
            else:
                w = layer.dequantize(o0, o1)
            wt = w.t()
            y[:, o0:o1] = torch.mm(xf, wt) if bias is None else torch.addmm(bias[o0:o1].to(x.device), xf, wt)
        return y.to(x.dtype)


def native_int8_supports(layer) -> bool:
    """The layouts the C kernels take: g % 32 == 0, 32 <= g <= 2048, contiguous CPU tensors."""
    g = layer.group_size
    return (g % 32 == 0 and 32 <= g <= 2048 and layer.in_features % g == 0 and layer.qweight.is_contiguous()
            and layer.scales.is_contiguous())


class Int8NativeBackend:
    """Our C kernels on the layer's own tensors (no repacked copy). M < ``gemm_min_rows``: ``gv8_matmul``
    (activations rounded per group to 24-bit fixed point, exact integer dot products on AVX2 vpmaddwd, the
    group scale factored out; measured relative L2 error vs ``reference`` 2e-7..3e-7; each output row bitwise what
    its input row gives alone, whatever M and the thread count; an activation group holding inf or NaN makes
    the outputs NaN, where fp32 could give +-inf). M >= ``gemm_min_rows``: ``dense`` (exact fp32
    tiles + ``torch.addmm``). Layers the kernels do not take (see ``native_int8_supports``) go to ``dense``."""

    name = "native"
    # Crossover (benchmarks/bench_int8.py --threads 1, best of 5 on a heavily shared 2-core AMD EPYC, AVX2; ms
    # kernel vs dense for 2048->6144, 6144->2048, 2048->2048): M=24: 144 vs 172, 153 vs 173, 12.6 vs 19.8;
    # M=32: 225 vs 212, 231 vs 167, 25.5 vs 22.3; M=48: 517 vs 401, 355 vs 160, 36.7 vs 27.1.
    gemm_min_rows = 32
    kernel_mode_arg = False  # gv8_matmul has no mode argument (native.RowPlan)

    def available(self, device: torch.device) -> bool:
        return device.type == "cpu" and load_library() is not None

    def row_plan(self, layer) -> native.RowPlan | None:
        """``gv8_matmul`` bound to ``layer``'s tensors (``native.RowPlan``; ``keep[0]`` is its qweight)."""
        lib = load_library()
        if lib is None or layer.qweight.device.type != "cpu" or not native_int8_supports(layer):
            return None
        head = (layer.qweight.data_ptr(), layer.scales.data_ptr(), layer.in_features, layer.out_features,
                layer.group_size)
        return native.RowPlan(self, lib.gv8_matmul, head, _bias32(layer), layer.out_features,
                              (layer.qweight, layer.scales), lambda: self.gemm_min_rows)

    def matmul(self, layer, x: torch.Tensor) -> torch.Tensor:
        lib = load_library()
        if (lib is None or x.device.type != "cpu" or not native_int8_supports(layer)
                or x.shape[0] >= self.gemm_min_rows or (x.requires_grad and torch.is_grad_enabled())):
            return _INT8_DENSE.matmul(layer, x)
        rows, in_f, out_f = x.shape[0], layer.in_features, layer.out_features
        if rows == 0:
            return x.new_empty(0, out_f)
        xf = _as_f32_rows(x, in_f)
        bias = _bias32(layer)
        y = torch.empty(rows, out_f, dtype=torch.float32)
        rc = lib.gv8_matmul(layer.qweight.data_ptr(), layer.scales.data_ptr(), in_f, out_f, layer.group_size,
                            xf.data_ptr(), xf.stride(0), rows, None if bias is None else bias.data_ptr(),
                            y.data_ptr(), native.num_threads())
        if rc != 0:
            raise RuntimeError(f"gv8_matmul failed with code {rc}")
        return y.to(x.dtype)


class Int8NativeI16Backend:
    """APPROXIMATE, opt-in: ``gv_igemm8`` at every M: activations rounded per group to 16-bit fixed point
    (measured ~2.5e-5 relative L2 error vs ``reference``), weights exact, vpmaddwd integer GEMM. Layers with g > 256 or
    not multiples of 64 go to ``native``."""

    name = "native-i16"

    def available(self, device: torch.device) -> bool:
        return device.type == "cpu" and load_library() is not None

    def matmul(self, layer, x: torch.Tensor) -> torch.Tensor:
        lib = load_library()
        in_f, out_f, g = layer.in_features, layer.out_features, layer.group_size
        if (lib is None or x.device.type != "cpu" or g % 64 or g > 256 or in_f % 64 or out_f % 8
                or not native_int8_supports(layer) or (x.requires_grad and torch.is_grad_enabled())):
            return INT8_BACKENDS["native"].matmul(layer, x)
        if x.shape[0] == 0:
            return x.new_empty(0, out_f)
        xf = _as_f32_rows(x, in_f)
        bias = _bias32(layer)
        y = torch.empty(x.shape[0], out_f, dtype=torch.float32)
        rc = lib.gv_igemm8(layer.qweight.data_ptr(), layer.scales.data_ptr(), in_f, out_f, g, xf.data_ptr(),
                           xf.stride(0), x.shape[0], None if bias is None else bias.data_ptr(), y.data_ptr(),
                           native.num_threads())
        if rc != 0:
            raise RuntimeError(f"gv_igemm8 failed with code {rc}")
        return y.to(x.dtype)


_INT8_DENSE = Int8DenseBackend()
INT8_BACKENDS = {b.name: b for b in (Int8ReferenceBackend(), _INT8_DENSE, Int8NativeBackend(), Int8NativeI16Backend())}


def select_int8_backend(device: torch.device, override: str | None = None):
    """The INT8 backend: ``override`` (a name of ``INT8_BACKENDS``; 'auto' or None: automatic) > ``native`` on
    CPU when its library loads > ``dense``."""
    if override and override != "auto":
        backend = INT8_BACKENDS.get(override)
        if backend is None:
            raise InputError(f"unknown INT8 backend {override!r}; choose one of {sorted(INT8_BACKENDS)}")
        if not backend.available(device):
            raise InputError(f"INT8 backend {override!r} is not available on device {device}")
        return backend
    native8 = INT8_BACKENDS["native"]
    return native8 if native8.available(device) else _INT8_DENSE


# ---- INT4: the integer prefill GEMM ---------------------------------------------------------------------

def igemm_preferred() -> bool:
    """Whether automatic selection uses ``native-igemm`` for INT4 layers: both libraries load and the INT4
    kernels run a vector path (AVX2 or AVX-512 VNNI; measured faster than ``native``'s exact fp32 tiles on
    both, see ``NativeIGemmBackend``). On the scalar path ``native`` is kept."""
    lib4 = native.load_library()
    return lib4 is not None and lib4.gv_isa() >= 2 and load_library() is not None


class NativeIGemmBackend(native.NativeBackend):
    """``native`` whose large-M path is ``gv_igemm4`` instead of exact fp32 tiles + ``torch.addmm``: the INT4
    codes minus zero points as int16 times the activations rounded per group to 16-bit fixed point (two int8
    planes' worth), vpmaddwd integer dot products, register-blocked (4 rows x 24 columns) and cache-tiled
    (int16 weight panels of 1024 inputs x 24 columns, L2 resident). APPROXIMATE: measured relative L2 error vs
    ``reference`` ~2.5e-5 (the issue's budget: 1e-4). Rows are bitwise independent of M within the GEMM path
    (M >= ``min_gemm_rows``); below it ``native``'s small-M kernel computes them (24-bit activations), so a row's
    bits change where a batch crosses that threshold. Layers with g not a multiple of 64 use ``native``'s path."""

    name = "native-igemm"
    # Crossover vs the small-M kernel (1 thread, ms, kernel vs igemm, 2-core AMD EPYC, AVX2): M=8: 14 vs 17,
    # 74 vs 61, 74 vs 47 (4096x4096, 4096->11008, 11008->4096); M=12: 29 vs 22, 93 vs 68, 98 vs 61.
    # AVX-512 VNNI small-M kernel (2 threads, best of 3, AMD EPYC Zen 4; ms kernel vs igemm vs native's fp32
    # tiles): M=8: 2.1 vs 2.5, 5.3 vs 6.2, 6.4 vs 5.2 (same shapes), 1.6 vs 1.7 (2048->6144); M=12: 3.9 vs 3.5,
    # 8.2 vs 7.3, 7.9 vs 6.4, 1.8 vs 1.8; M=48: 9.5 vs 6.5 vs 15.6, 30 vs 18 vs 41, 28 vs 17 vs 40. The AVX-512
    # crossover stays native's 48 although igemm wins from ~12 rows: batched decode keeps every row's bits
    # (engine.scheduler) up to 47 rows, and prefill chunks (64) and prompts are above it anyway.
    gemm_min_rows_avx2 = 12

    def matmul(self, layer, x: torch.Tensor) -> torch.Tensor:
        lib8 = load_library()
        g = layer.group_size
        if (lib8 is None or x.device.type != "cpu" or x.shape[0] < self.min_gemm_rows(layer) or g % 64
                or not self.supports(layer) or (x.requires_grad and torch.is_grad_enabled())):
            return super().matmul(layer, x)
        lib = native.load_library()
        st = self._prepare(layer, lib)
        in_f, out_f = layer.in_features, layer.out_features
        info = (ctypes.c_int64 * 3)()
        if lib.gv_layout(in_f, g, st["ss"], info) != 0:
            return super().matmul(layer, x)
        xf = _as_f32_rows(x, in_f)
        bias = st["bias"]
        y = torch.empty(x.shape[0], out_f, dtype=torch.float32)
        rc = lib8.gv_igemm4(st["packed"].data_ptr(), info[0], info[1], info[2], st["ss"], in_f, out_f, g,
                            xf.data_ptr(), xf.stride(0), x.shape[0], None if bias is None else bias.data_ptr(),
                            y.data_ptr(), native.num_threads())
        if rc != 0:
            raise RuntimeError(f"gv_igemm4 failed with code {rc}")
        return y.to(x.dtype)
