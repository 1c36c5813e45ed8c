"""``native``: our own C INT4 kernels for CPU (``csrc/gv_int4.c``), called through ctypes.

Backends: ``native`` (the automatic choice on CPU when the library loads), ``native-f32`` (the fp32
small-M kernel), ``native-i8x2`` (approximate, opt-in) and ``native-bf16`` (bf16 GEMM for large M,
approximate, opt-in); see ``NativeBackend``. Also ``half_matmul`` (fp16/bf16 dense weights, exact fp32
results; ``nn.HalfLinear``) and ``NativeBackend.release_awq`` (frees a layer's AWQ tensors once the native
layout holds them; rebuilt exactly by ``gv_unpack``).

Build and fallback: ``pip install -e .`` compiles the library (setup.py) into ``_gv_int4<EXT_SUFFIX>``
next to this file, stamped with a hash of the source it was built from. When no library here matches the
current source (a plain source tree, or the source edited since the install), the source is compiled on
first use with ``$CC`` (default ``cc``) into ``$XDG_CACHE_HOME/gracevlm`` (default ``~/.cache/gracevlm``).
If that fails too, one RuntimeWarning is emitted and the native backends delegate to ``dense``
(``select_backend`` then picks the torch backends).

Threads: env ``GRACEVLM_NUM_THREADS``, else ``torch.get_num_threads()``. The library links libgomp by
its soname, so in a process that imported torch it shares torch's OpenMP runtime and thread pool.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from .torch_cpu import DenseBackend

_HERE = Path(__file__).resolve().parent
SOURCE = _HERE / "csrc" / "gv_int4.c"
LIB_STEM = "_gv_int4"  # setuptools names the build <stem><EXT_SUFFIX>, e.g. _gv_int4.cpython-311-x86_64-linux-gnu.so
MODE_F32, MODE_I8X2, MODE_I8X3 = 0, 2, 3  # gv_matmul modes (see csrc/gv_int4.c)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_load_error: str | None = None
_tried = False


def source_hash() -> str:
    """First 16 hex digits of the SHA-256 of the C source ('' when the source is not shipped)."""
    try:
        return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    except OSError:
        return ""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gracevlm"


def compile_library(out: Path, digest: str, sources: tuple[Path, ...] = (SOURCE,)) -> None:
    """Compile ``sources`` (default SOURCE) into the shared library ``out`` with ``$CC`` (default ``cc``), with
    OpenMP and the AVX-512 code where the compiler has them. Raises RuntimeError with the compiler's first
    error on failure."""
    cc = os.environ.get("CC", "cc")
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    # with OpenMP, then without the AVX-512 code (older compilers), then single-threaded
    variants = (["-fopenmp"], ["-fopenmp", "-DGV_NO_AVX512"], [], ["-DGV_NO_AVX512"])
    for flags in variants:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        cmd = [cc, "-O3", "-fPIC", "-shared", "-fvisibility=hidden", f'-DGV_SOURCE_HASH="{digest}"', *flags,
               *map(str, sources), "-o", tmp, "-lm"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode == 0:
                os.replace(tmp, out)  # atomic: concurrent processes never load a half-written file
                return
            lines = proc.stderr.strip().splitlines()
            errors.append(next((ln for ln in lines if "error" in ln), lines[-1] if lines else f"exit {proc.returncode}"))
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(str(exc))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"compiling {', '.join(p.name for p in sources)} with {cc!r} failed: {errors[0]}")


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    c_int, c_i64, vp = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    lib.gv_source_hash.restype = ctypes.c_char_p
    lib.gv_isa.restype = c_int
    lib.gv_set_isa.argtypes = [c_int]
    lib.gv_set_isa.restype = c_int
    lib.gv_set_multi_row.argtypes = [c_int]
    lib.gv_set_multi_row.restype = c_int
    lib.gv_has_openmp.restype = c_int
    lib.gv_layout.argtypes = [c_int, c_int, c_int, ctypes.POINTER(c_i64)]
    lib.gv_repack.argtypes = [vp, vp, vp, c_int, c_int, c_int, c_int, vp, c_int]
    lib.gv_matmul.argtypes = [vp, c_int, c_int, c_int, c_int, vp, c_i64, c_int, vp, vp, c_int, c_int]
    lib.gv_dequant.argtypes = [vp, c_int, c_int, c_int, c_int, c_int, c_int, vp, c_i64, c_int]
    lib.gv_matmul_half.argtypes = [vp, c_int, c_int, c_int, vp, c_i64, c_int, vp, c_int]
    lib.gv_unpack.argtypes = [vp, c_int, c_int, c_int, c_int, vp, vp, vp, c_int]
    lib.gv_stream_read.argtypes = [vp, c_i64, c_int]
    lib.gv_stream_read.restype = ctypes.c_uint64
    for fn in (lib.gv_layout, lib.gv_repack, lib.gv_matmul, lib.gv_dequant, lib.gv_matmul_half, lib.gv_unpack):
        fn.restype = c_int
    return lib


def _try_load(path: Path, digest: str) -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(path))
        lib.gv_source_hash.restype = ctypes.c_char_p
        built_from = lib.gv_source_hash().decode()
    except (OSError, AttributeError):
        return None
    if digest and built_from != digest:  # stale build of an older source
        return None
    return _bind(lib)


def _load() -> ctypes.CDLL:
    digest = source_hash()
    for path in sorted(_HERE.glob(LIB_STEM + "*.so")):
        lib = _try_load(path, digest)
        if lib is not None:
            return lib
    if not digest:
        raise RuntimeError(f"no usable {LIB_STEM}*.so in {_HERE} and no C source to compile")
    plat = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    cached = cache_dir() / f"gv_int4-{digest}-{plat}.so"
    if not cached.exists():
        compile_library(cached, digest)
    lib = _try_load(cached, digest)
    if lib is None:
        raise RuntimeError(f"{cached} was built but cannot be loaded")
    return lib


def load_error() -> str | None:
    """Why the library could not be loaded (None when it loaded or was not tried yet)."""
    return _load_error


def load_library() -> ctypes.CDLL | None:
    """The kernel library, or None when it can be neither found nor compiled (warns once)."""
    global _lib, _load_error, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            try:
                _lib = _load()
            except Exception as exc:  # any failure means: fall back to torch backends
                _load_error = str(exc)
                warnings.warn(f"gracevlm: native INT4 kernels unavailable ({_load_error}); "
                              "using the torch CPU backends", RuntimeWarning, stacklevel=2)
            _tried = True
    return _lib


def num_threads() -> int:
    """Threads for the C kernels: env ``GRACEVLM_NUM_THREADS``, else ``torch.get_num_threads()``."""
    env = os.environ.get("GRACEVLM_NUM_THREADS")
    return max(1, int(env)) if env else torch.get_num_threads()


_scratch = threading.local()


def _buffer(numel: int) -> torch.Tensor:
    """A per-thread float32 buffer of at least ``numel`` elements, reused across calls."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < numel:
        _scratch.buf = None  # free the old one first
        with torch.inference_mode(False):  # a normal tensor: reused in and outside inference mode
            buf = _scratch.buf = torch.empty(numel, dtype=torch.float32)
    return buf[:numel]


# Largest dequantized weight tile (fp32 elements) of the large-M path: 2 Mi = 8 MiB, so that the tile is
# still in cache when the GEMM reads it (a whole 4096x11008 matrix would go through DRAM: 2.3x slower).
MAX_TILE_ELEMS = 2 << 20


def half_matmul(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """``x [M, I]`` (any float dtype) @ ``weight [O, I]`` (fp16 or bf16, CPU) -> fp32 ``[M, O]``, each weight
    converted exactly, fp32 accumulation, rows computed independently (``gv_matmul_half``). None when the
    native library is unavailable or the arguments are not CPU tensors of those dtypes."""
    lib = load_library()
    if (lib is None or weight.device.type != "cpu" or x.device.type != "cpu" or x.dim() != 2
            or weight.dtype not in (torch.float16, torch.bfloat16) or not weight.is_contiguous()):
        return None
    out_f, in_f = weight.shape
    if x.shape[1] != in_f:
        raise ValueError(f"half_matmul: x has {x.shape[1]} features, the weight {in_f}")
    xf = x.to(torch.float32)
    if xf.stride(-1) != 1 or xf.stride(0) < in_f:
        xf = xf.contiguous()
    y = torch.empty(x.shape[0], out_f, dtype=torch.float32)
    if x.shape[0] == 0:
        return y
    rc = lib.gv_matmul_half(weight.data_ptr(), in_f, out_f, int(weight.dtype == torch.bfloat16), xf.data_ptr(),
                            xf.stride(0), x.shape[0], y.data_ptr(), num_threads())
    if rc != 0:
        raise RuntimeError(f"gv_matmul_half failed with code {rc}")
    return y


class NativeSwitch:
    """On/off for one native path (``kernels.norm_rope``, ``kernels.attention``): read from the environment
    variable ``env`` at import (``0``: off), switchable at run time for A/B comparisons and tests."""

    __slots__ = ("on",)

    def __init__(self, env: str):
        self.on = os.environ.get(env, "1") != "0"

    def enabled(self) -> bool:
        return self.on

    def set_enabled(self, on: bool) -> bool:
        """Switch the path on or off; returns the previous setting."""
        old, self.on = self.on, bool(on)
        return old


class RowPlan:
    """A layer's small-M kernel call with its arguments bound, for decode steps (``Int4Linear`` and
    ``Int8Linear`` keep one in ``kernel_cache["row_plan"]``). ``run(x2)`` takes fp32 CPU rows ``x2 [M, I]``
    (last stride 1, rows not overlapping) and returns fp32 ``[M, O]``: the same call, so the same bits, as
    ``backend.matmul`` makes for the ``M`` that ``takes(M)`` accepts, with about a quarter of its Python.
    ``fn(*head, x, x_row_stride, M, bias, y, [mode,] threads)`` is the C entry point's argument order."""

    __slots__ = ("backend", "fn", "head", "bias_ptr", "out_f", "keep", "row_limit")

    def __init__(self, backend, fn, head: tuple, bias, out_f: int, keep: tuple, row_limit):
        self.backend, self.fn, self.head = backend, fn, head
        self.bias_ptr = None if bias is None else bias.data_ptr()
        self.out_f, self.keep, self.row_limit = out_f, keep + (bias,), row_limit  # keep: the tensors pointed to

    def takes(self, rows: int) -> bool:
        """Whether ``backend.matmul`` runs the small-M kernel for ``rows`` rows (``row_limit()``: its crossover now)."""
        return 0 < rows < self.row_limit()

    def __reduce__(self):
        # a copied or pickled layer binds its own tensors again on its first call (raw pointers don't travel)
        return NoRowPlan, (None,)

    def run(self, x2: torch.Tensor) -> torch.Tensor:
        rows = x2.shape[0]
        y = torch.empty(rows, self.out_f, dtype=torch.float32)
        tail = (self.backend.mode,) if self.backend.kernel_mode_arg else ()
        rc = self.fn(*self.head, x2.data_ptr(), x2.stride(0), rows, self.bias_ptr, y.data_ptr(), *tail,
                     num_threads())
        if rc != 0:
            raise RuntimeError(f"{self.fn.__name__} failed with code {rc}")
        return y


class NoRowPlan:
    """``backend`` has no bound kernel for the layer (so the layer does not ask it again)."""

    __slots__ = ("backend",)

    def __init__(self, backend):
        self.backend = backend

    def takes(self, rows: int) -> bool:
        return False


class NativeBackend:
    """Our C kernels (csrc/gv_int4.c) on a repacked copy of the weights, made once per layer in
    ``kernel_cache["native"]`` (the AWQ buffers stay untouched, so ``to_awq()`` stays exact).

    Layout: per output row, the scales (fp16 as stored, else fp32) and uint8 zero points of its groups,
    then (from a 64-byte boundary) its 4-bit codes, the 64 inputs of a chunk in 32 bytes (low nibbles:
    inputs 0..31, high: 32..63).

    M < ``min_gemm_rows(layer)``: ``gv_matmul`` streams each weight row once per 4 rows of x, the group scale
    factored out of the inner loop; rows are split across ``num_threads()`` threads, never the reduction.
    Each output row is bitwise what that input row gives alone (whatever M, its place, the thread count),
    so batching decode steps does not change results. Weights and scales are exact; this backend rounds
    the activations per group to 24-bit fixed point (three int8 digit planes; exact integer dot products
    on vpdpbusd with AVX-512 VNNI for group sizes that are multiples of 128, else on vpmaddubsw; both
    faster than fp32 FMAs). Measured relative L2 error vs ``reference``: 4e-7..1.4e-6, the order of fp32
    summation error.
    M >= ``min_gemm_rows(layer)`` (16 on the AVX2 path, 48 on the AVX-512 one): exact fp32 weight tiles (``gv_dequant``, bit-identical to ``reference``'s
    weights) then ``torch.addmm``: error ~1e-7 (summation order only).
    Layers outside the layout (in_features % 64 != 0; group_size not 32 or a multiple of 64 up to 4096)
    go to ``dense``.
    """

    name = "native"
    mode = MODE_I8X3
    reads_own_layout = True  # works on layers whose AWQ buffers were released (Int4Linear.forward)
    # Crossover: rows from which dequantize + GEMM beats the small-M kernel; None = by code path:
    # AVX2 path (benchmarks/bench_native.py, 1 thread, fastest of repeats, 2-core machine), small-M kernel vs
    # dequantize + GEMM in ms: M=16: 4096x4096 11.5 vs 17.3, 11008x4096 49 vs 46, 4096x11008 44 vs 34;
    # M=24: 19 vs 16, 48 vs 47, 49 vs 46; M=8: the kernel wins by 1.0-3x.
    # AVX-512 VNNI path (2 threads, 4 layers each, best of 3): M=32: 9.6 vs 19.3, 34 vs 92 (22016x4096),
    # 18 vs 25 ms; M=48: 14 vs 21, 66 vs 112, 33 vs 36; M=64: 19 vs 16, 88 vs 88, 62 vs 35.
    gemm_min_rows: int | None = None
    gemm_min_rows_avx2 = 16
    gemm_min_rows_avx512 = 48
    gemm_dtype = torch.float32  # of the large-M GEMM (exact weights in fp32)

    def min_gemm_rows(self, layer) -> int:
        """Rows from which this backend dequantizes and runs a GEMM instead of the small-M kernel."""
        if self.gemm_min_rows is not None:
            return self.gemm_min_rows
        lib = load_library()
        avx512 = (lib is not None and lib.gv_isa() == 3 and self.mode != MODE_F32
                  and layer.group_size % 128 == 0)
        return self.gemm_min_rows_avx512 if avx512 else self.gemm_min_rows_avx2

    kernel_mode_arg = True  # gv_matmul takes the mode after y (RowPlan)

    def row_plan(self, layer) -> RowPlan | None:
        """``layer``'s small-M kernel bound (``RowPlan``), or None where this backend would not run it."""
        lib = load_library()
        if lib is None or not self.supports(layer) or layer.device.type != "cpu":
            return None
        st = self._prepare(layer, lib)
        head = (st["packed"].data_ptr(), layer.in_features, layer.out_features, layer.group_size, st["ss"])
        return RowPlan(self, lib.gv_matmul, head, st["bias"], layer.out_features, (st["packed"],),
                       lambda: self.min_gemm_rows(layer))

    def available(self, device: torch.device) -> bool:
        return device.type == "cpu" and load_library() is not None

    @staticmethod
    def supports(layer) -> bool:
        g = layer.group_size
        return layer.in_features % 64 == 0 and (g == 32 or g % 64 == 0) and g <= 4096

    def prepare(self, layer) -> None:
        """Build the native layout now (e.g. at load) rather than on the first call."""
        lib = load_library()
        if lib is not None and self.supports(layer) and layer.device.type == "cpu":
            self._prepare(layer, lib)

    def release_awq(self, layer) -> bool:
        """Build the native layout and free the layer's AWQ buffers: the layout holds the same bits, and
        ``layer.qweight`` / ``to_awq()`` / ``state_dict()`` rebuild them from it on demand (``gv_unpack``).
        Halves the resident INT4 weights. Returns False (nothing freed) where the layout cannot be built."""
        lib = load_library()
        if lib is None or not self.supports(layer) or layer.device.type != "cpu":
            return False
        if layer.awq_released:
            return True
        state = self._prepare(layer, lib)
        scale_dtype = layer.scales.dtype
        layer.release_awq(lambda: _unpack(lib, layer, state, scale_dtype))
        return True

    def _prepare(self, layer, lib: ctypes.CDLL) -> dict:
        state = layer.kernel_cache.get("native")
        if state is None:
            with torch.inference_mode(False):  # normal tensors: the layer is used in and outside it
                state = layer.kernel_cache["native"] = self._repack(layer, lib)
        return state

    @staticmethod
    def _repack(layer, lib: ctypes.CDLL) -> dict:
        """The layer in the native layout: ``packed`` uint8 [O, stride], ``ss`` (scale bytes), fp32 ``bias``."""
        in_f, out_f, g = layer.in_features, layer.out_features, layer.group_size
        scales = layer.scales if layer.scales.dtype == torch.float16 else layer.scales.to(torch.float32)
        ss = scales.element_size()
        info = (ctypes.c_int64 * 3)()
        if lib.gv_layout(in_f, g, ss, info) != 0:
            raise ValueError(f"native layout rejects in_features={in_f}, group_size={g}")
        packed = torch.empty(out_f, info[0], dtype=torch.uint8)  # [O, stride] bytes
        qweight, qzeros, scales = layer.qweight.contiguous(), layer.qzeros.contiguous(), scales.contiguous()
        rc = lib.gv_repack(qweight.data_ptr(), qzeros.data_ptr(), scales.data_ptr(), in_f, out_f, g, ss,
                           packed.data_ptr(), num_threads())
        if rc != 0:
            raise ValueError(f"gv_repack failed ({rc}) for a {in_f}x{out_f} layer, group_size={g}")
        bias = None if layer.bias is None else layer.bias.to(torch.float32).contiguous()
        return dict(packed=packed, ss=ss, bias=bias)

    def matmul(self, layer, x: torch.Tensor) -> torch.Tensor:
        """``x [M, I]`` (any float dtype, any strides) -> ``[M, O]`` in x's dtype; fp32 inside."""
        lib = load_library()
        if (lib is None or x.device.type != "cpu" or not self.supports(layer)
                or (x.requires_grad and torch.is_grad_enabled())):  # the C kernels have no backward
            return _DENSE.matmul(layer, x)
        st = self._prepare(layer, lib)
        in_f, out_f, g = layer.in_features, layer.out_features, layer.group_size
        rows = x.shape[0]
        if rows == 0:
            return x.new_empty(0, out_f)
        xf = x.to(torch.float32)
        if xf.stride(-1) != 1 or xf.stride(0) < in_f:
            xf = xf.contiguous()
        nt = num_threads()
        bias = st["bias"]
        if rows < self.min_gemm_rows(layer):
            y = torch.empty(rows, out_f, dtype=torch.float32)
            rc = lib.gv_matmul(st["packed"].data_ptr(), in_f, out_f, g, st["ss"], xf.data_ptr(), xf.stride(0), rows,
                               None if bias is None else bias.data_ptr(), y.data_ptr(), self.mode, nt)
            if rc != 0:
                raise RuntimeError(f"gv_matmul failed with code {rc}")
            return y.to(x.dtype)
        tile = max(8, min(out_f, MAX_TILE_ELEMS // in_f) // 8 * 8)  # output rows per weight tile
        w = _buffer(min(tile, out_f) * in_f)
        y = torch.empty(rows, out_f, dtype=torch.float32) if tile < out_f else None
        low = self.gemm_dtype != torch.float32
        xg = xf.to(self.gemm_dtype) if low else xf
        for o0 in range(0, out_f, tile):
            o1 = min(out_f, o0 + tile)
            rc = lib.gv_dequant(st["packed"].data_ptr(), in_f, out_f, g, st["ss"], o0, o1, w.data_ptr(), in_f, nt)
            if rc != 0:
                raise RuntimeError(f"gv_dequant failed with code {rc}")
            wt = w[:(o1 - o0) * in_f].view(o1 - o0, in_f)
            wt = (wt.to(self.gemm_dtype) if low else wt).t()  # W^T tile [I, o1 - o0]
            if low:  # the low-precision GEMM accumulates in fp32 and rounds its output to gemm_dtype
                yt = torch.mm(xg, wt).to(torch.float32)
                if bias is not None:
                    yt += bias[o0:o1]
            else:
                yt = torch.mm(xf, wt) if bias is None else torch.addmm(bias[o0:o1], xf, wt)
            if y is None:
                return yt.to(x.dtype)
            y[:, o0:o1] = yt
        return y.to(x.dtype)


def _unpack(lib: ctypes.CDLL, layer, state: dict, scale_dtype: torch.dtype):
    """The AWQ tensors ``(qweight, qzeros, scales)`` of ``layer`` rebuilt from its native layout (bit-exact)."""
    in_f, out_f, g = layer.in_features, layer.out_features, layer.group_size
    qweight = torch.empty(in_f, out_f // 8, dtype=torch.int32)
    qzeros = torch.empty(in_f // g, out_f // 8, dtype=torch.int32)
    stored = torch.float16 if state["ss"] == 2 else torch.float32
    scales = torch.empty(in_f // g, out_f, dtype=stored)
    rc = lib.gv_unpack(state["packed"].data_ptr(), in_f, out_f, g, state["ss"], qweight.data_ptr(),
                       qzeros.data_ptr(), scales.data_ptr(), num_threads())
    if rc != 0:
        raise RuntimeError(f"gv_unpack failed with code {rc}")
    return qweight, qzeros, scales.to(scale_dtype)  # fp32 -> the stored bf16/fp32 dtype is exact


class NativeF32Backend(NativeBackend):
    """``native`` with the plain fp32 small-M kernel: fp32 activations and FMAs, no activation rounding.
    Error vs ``reference`` 4e-7..1.4e-6. About 1.5x slower than ``native`` at M=1, as fast from M=2 on."""

    name = "native-f32"
    mode = MODE_F32
    # M=16 (same measurement as native): 13.7 vs 17.3, 52 vs 46, 37 vs 34 ms; M=8: the kernel wins.
    # (The fp32 kernel has no AVX-512 path.)
    gemm_min_rows_avx512 = 16


class NativeI8X2Backend(NativeBackend):
    """APPROXIMATE, opt-in: ``native`` with activations rounded to 16-bit fixed point per group (two int8
    digit planes). Weights stay exact; measured error vs ``reference`` 2e-5..5e-5 relative L2. The fastest
    small-M kernel (about 1.2x ``native`` at M=1, 1.2-1.5x at M=2..16). Never selected automatically."""

    name = "native-i8x2"
    mode = MODE_I8X2
    # AVX2, M=24 (same measurement as native): 14.1 vs 16.0, 45 vs 47, 32 vs 46 ms; M=16: 8.0 vs 17.3,
    # 37 vs 46, 24 vs 34 ms. AVX-512, M=48: 12 vs 21, 59 vs 94, 30 vs 30; M=64: 18 vs 18, 56 vs 82, 26 vs 42.
    gemm_min_rows_avx2 = 32
    gemm_min_rows_avx512 = 64


_DENSE = DenseBackend()


class NativeBF16Backend(NativeBackend):
    """APPROXIMATE, opt-in: ``native`` whose large-M path (prefill) runs the GEMM in bfloat16: the exact
    weight tiles and the activations are rounded to bf16 and the GEMM's output too (fp32 accumulation
    inside). Measured relative L2 error vs ``reference``: 2.9e-3 (the small-M kernel, used for decode, is
    ``native``'s). Large-M layers 1.5-2x faster where the CPU has native bf16 dot products (AVX512-BF16).
    Never selected automatically."""

    name = "native-bf16"
    gemm_dtype = torch.bfloat16
    # crossover as ``native``'s (2 threads, ms, small-M kernel vs bf16 GEMM; fp32 GEMM third): M=32: 9.8 vs
    # 10.3 (17.7), 53 vs 63 (99), 31 vs 35 (35); M=48: 13 vs 15 (21), 71 vs 69 (117), 47 vs 57 (43);
    # M=512: 53 (78), 258 (506), 170 (297) for 4096x4096, 22016x4096, 4096x11008.
