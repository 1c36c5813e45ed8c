"""``triton``: W4A16 kernels for CUDA written in Triton (``triton_w4a16_jit``), the automatic choice for
layers on a CUDA device when ``triton`` imports.

Prepared once per layer (``kernel_cache["triton"]``, at load through ``prepare``): the AWQ words with their
nibbles put in logical column order (a bit permutation), the zero points as uint8 ``[K/G, N]`` (dropped for
GRACE layers, whose zero point is 8 everywhere), the fp16 scales as stored and the bias in fp32. ``release_awq``
then frees the layer's AWQ ``qweight``/``qzeros``: ``to_awq()`` rebuilds them bit-exactly by the inverse
permutation (the scales are shared, never copied), so the GPU holds the INT4 weights once.

Arithmetic (both kernels): exact integer codes ``u - z`` times the activation, summed per group in fp32, then
times the group's fp16 scale in fp32. The weights are exactly ``reference``'s; only the order of the fp32
sums differs (relative error ~1e-6 before the cast of the output to x's dtype). Activations: fp16, bf16
(used as given, never rounded further) or fp32 (exact fp32 products, no TF32).

Dispatch by rows M: ``M <= gemv_max_rows``: the split-K GEMV (each code read once, fp32 multiply-adds);
larger M: the tiled GEMM on the tensor cores. Split-K sums are added in a fixed order (deterministic).
Tile sizes come from ``gemv_config`` / ``gemm_config``: starting points, not yet tuned on a GPU. Hook for torch's
own CUDA int4 kernel: ``use_torch_int4pack`` (never taken until measured faster for a shape: it needs bf16
scales, so it must also be shown accurate enough).

In a process started with ``TRITON_INTERPRET=1`` (it must be set before triton is imported, and fixes the
mode for the whole process) the programs run in Triton's interpreter on CPU tensors: that is how the tests
check them without a GPU (in a subprocess). ``available`` is then true on CPU too; slow, and never
auto-selected there (``backend="triton"`` / ``GRACEVLM_BACKEND=triton`` asks for it).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

from ..formats.awq import (AWQ_INVERSE, AWQ_ORDER, GRACE_ZERO_WORD, is_symmetric_grace, pack_nibbles,
                           unpack_nibbles)

_SHIFTS = tuple(4 * j for j in range(8))
_jit = None


def triton_version() -> str | None:
    """The installed triton's version, or None (without importing it)."""
    if importlib.util.find_spec("triton") is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("triton")
    except PackageNotFoundError:
        return "unknown"


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")


def jit_module():
    """The Triton programs (imports triton on first use: ``TRITON_INTERPRET`` must be set before then)."""
    global _jit
    if _jit is None:
        _jit = importlib.import_module(".triton_w4a16_jit", __package__)
    return _jit


def permute_nibbles(words: torch.Tensor, source: tuple[int, ...]) -> torch.Tensor:
    """int32 words whose nibble ``j`` is nibble ``source[j]`` of ``words`` (exact; any device)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros_like(w)
    for j, src in enumerate(source):
        out |= ((w >> (4 * src)) & 0xF) << (4 * j)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def awq_to_logical(qweight: torch.Tensor) -> torch.Tensor:
    """AWQ words -> words with logical column ``8c + j`` in nibble ``j``."""
    return permute_nibbles(qweight, AWQ_INVERSE)


def logical_to_awq(words: torch.Tensor) -> torch.Tensor:
    """Inverse of ``awq_to_logical``."""
    return permute_nibbles(words, AWQ_ORDER)


def _pow2_divisor(n: int, cap: int) -> int:
    b = 1
    while n % (b * 2) == 0 and b * 2 <= cap:
        b *= 2
    return b


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """Programs to aim for: two per streaming multiprocessor (one in the interpreter, which runs them in turn)."""
    if device.type != "cuda":
        return 1
    return 2 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def _split_k(n_tiles: int, n_groups: int, device: torch.device) -> tuple[int, int]:
    """(splits, groups per split) so that about ``_target_programs`` programs run."""
    want = max(1, min(n_groups, -(-_target_programs(device) // max(1, n_tiles))))
    per = -(-n_groups // want)
    return -(-n_groups // per), per


def gemv_config(rows: int, group: int) -> dict:
    """Tile sizes of the GEMV for ``rows`` rows: BLOCK_M * BLOCK_K * BLOCK_N <= 8192 values per program."""
    block_m = _next_pow2(rows)
    block_k = _pow2_divisor(group, 64 if block_m == 1 else 32)
    block_n = max(16, min(256, 8192 // (block_m * block_k)))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)


def gemm_config(rows: int, group: int) -> dict:
    """Tile sizes of the GEMM (tensor-core tiles need BLOCK_K >= 16 dividing the group)."""
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64 if rows <= 64 else 128
    return dict(BLOCK_M=block_m, BLOCK_N=128 if rows > 64 else 64, BLOCK_K=_pow2_divisor(group, 64),
                num_warps=8 if block_m >= 128 else 4, num_stages=3)


class TritonBackend:
    """Triton W4A16 kernels (module docstring). Error vs ``reference``: fp32 summation order only
    (~1e-6 relative before the output is cast to x's dtype); weights and scales exact."""

    name = "triton"
    reads_own_layout = True  # works on layers whose AWQ buffers were released
    gemv_max_rows = 8  # rows up to which the GEMV beats the GEMM: a starting point, to measure on a GPU

    def available(self, device: torch.device) -> bool:
        if triton_version() is None:
            return False
        return device.type == "cuda" or (device.type == "cpu" and interpreting())

    @staticmethod
    def supports(layer) -> bool:
        """Group sizes with a power-of-two divisor >= 16 (tensor-core tiles); others go to ``dense``."""
        return layer.group_size % 16 == 0 and layer.in_features % layer.group_size == 0

    def use_torch_int4pack(self, layer, rows: int) -> bool:
        """Hook: where ``torch.ops.aten._weight_int4pack_mm`` (CUDA, bf16 scales) is measured faster and
        accurate enough for a shape, return True here and route the call there. Not measured yet: never."""
        return False

    def prepare(self, layer) -> None:
        if self.supports(layer) and self.available(layer.device):
            self._prepare(layer)

    def release_awq(self, layer) -> bool:
        """Free the layer's AWQ words (the prepared layout holds the same bits; rebuilt exactly on demand)."""
        if not self.supports(layer) or not self.available(layer.device):
            return False
        if layer.awq_released:
            return True
        state = self._prepare(layer)
        zeros_shape, device = tuple(layer.qzeros.shape), layer.device

        def rebuild():
            if state["zp"] is None:  # GRACE: every zero word is 0x88888888
                qzeros = torch.full(zeros_shape, GRACE_ZERO_WORD, dtype=torch.int32, device=device)
            else:
                qzeros = pack_nibbles(state["zp"])
            return logical_to_awq(state["qw"]), qzeros, state["s"]

        layer.release_awq(rebuild)
        return True

    def _prepare(self, layer) -> dict:
        state = layer.kernel_cache.get(self.name)
        if state is None:
            with torch.inference_mode(False):
                qweight, qzeros, scales = layer.awq_tensors()
                zp = None if is_symmetric_grace(qzeros) else unpack_nibbles(qzeros).contiguous()
                bias = None if layer.bias is None else layer.bias.to(torch.float32).contiguous()
                state = dict(qw=awq_to_logical(qweight).contiguous(), zp=zp, s=scales.contiguous(), bias=bias)
            layer.kernel_cache[self.name] = state
        return state

    def matmul(self, layer, x: torch.Tensor) -> torch.Tensor:
        """``x [M, I]`` fp16/bf16/fp32 -> ``[M, O]`` in x's dtype (fp32 inside)."""
        if not self.supports(layer) or (x.requires_grad and torch.is_grad_enabled()):
            from .torch_cpu import DenseBackend  # no backward here; odd group sizes

            return DenseBackend().matmul(layer, x)
        return w4a16_matmul(self._prepare(layer), x, layer.group_size, gemv_max_rows=self.gemv_max_rows)


def w4a16_matmul(state: dict, x: torch.Tensor, group: int, out_dtype: torch.dtype | None = None,
                 gemv_max_rows: int = 8, kernel: str | None = None, split_k: int | None = None) -> torch.Tensor:
    """``y = x @ W^T + bias`` on a prepared layout (``TritonBackend._prepare``). ``out_dtype`` defaults to
    x's; ``kernel`` forces "gemv" or "gemm" and ``split_k`` the number of K splits (tests), else chosen by
    rows and by the device's multiprocessors."""
    interpret = interpreting()
    jit = jit_module()
    qw, zp, s, bias = state["qw"], state["zp"], state["s"], state["bias"]
    k_dim, n = qw.shape[0], qw.shape[1] * 8
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        x = x.to(torch.float32)
    x = x.contiguous()
    m = x.shape[0]
    out_dtype = out_dtype or x.dtype
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m == 0:
        return out
    kind = kernel or ("gemv" if m <= gemv_max_rows else "gemm")
    n_groups = k_dim // group
    if kind == "gemv":
        cfg = gemv_config(m, group) if m <= 64 else None
        if cfg is None:
            raise ValueError("the GEMV takes at most 64 rows")
        tiles_m, tiles_n = 1, -(-n // cfg["BLOCK_N"])
    else:
        cfg = gemm_config(m, group)
        tiles_m, tiles_n = -(-m // cfg["BLOCK_M"]), -(-n // cfg["BLOCK_N"])
    if split_k:
        per = -(-n_groups // min(split_k, n_groups))
        split = -(-n_groups // per)
    else:
        split, per = _split_k(tiles_m * tiles_n, n_groups, x.device)
    target = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    common = dict(GROUP=group, SPLIT_K=split, HAS_ZEROS=zp is not None, HAS_BIAS=bias is not None)
    args = (x, qw, zp, s, bias, target, m, n, k_dim, x.stride(0), m * n, per)
    if kind == "gemv":
        jit.w4a16_gemv_kernel[(tiles_n, split)](*args, **cfg, **common)
    else:
        jit.w4a16_gemm_kernel[(tiles_m, tiles_n, split)](*args, **cfg, **common, IEEE=x.dtype == torch.float32,
                                                         UPCAST=interpret and x.dtype == torch.bfloat16)
    if split > 1:
        block = 1024
        jit.w4a16_reduce_kernel[(-(-m * n // block),)](target, bias, out, m * n, n, SPLIT_K=split,
                                                        HAS_BIAS=bias is not None, BLOCK=block)
    return out
