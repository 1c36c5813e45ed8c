"""INT4 matmul backends behind one dispatch (INT8 layers have their own: ``native_int8.select_int8_backend``).

A backend computes ``y[M, O] = x[M, I] @ W^T + bias`` for a packed layer (an object with ``qweight``,
``qzeros``, ``scales``, ``bias``, ``group_size``, ``in_features``, ``out_features`` and a dict
``kernel_cache`` where backends keep their own prepared layout). Every backend agrees with
``reference`` within the error stated in its docstring; tests check it.

Selection: a layer's ``backend`` (set at load from the ``backend`` argument, or once from the
``GRACEVLM_BACKEND`` environment variable: ``backend_choice``), else automatic by device and number of
rows M: on CPU ``native`` (else the torch backends), on CUDA ``triton`` when triton is installed, else
``dense``. ``use_backend`` switches every INT4 layer of a model. The lm_head policy (``keep_half_head``) is
here too: which layout each kind of layer keeps is a kernel decision. ``warn_emulated_bf16`` warns where an
opt-in bf16 path (``native-bf16``, a bf16 vision tower) would run on a CPU without bf16 instructions.
"""
from __future__ import annotations

import os
import warnings
from typing import Protocol

import torch

from ..errors import InputError


class Backend(Protocol):
    name: str

    def available(self, device: torch.device) -> bool: ...

    def matmul(self, layer, x: torch.Tensor) -> torch.Tensor: ...


_BACKENDS: dict[str, Backend] = {}

# Torch-only CPU fallback (native library unavailable): rows at and above which dequantize-then-GEMM
# beats the GEMV kernel (measured with benchmarks/bench_int4.py on the 2-core development machine; see
# README). The native backends have their own crossover, NativeBackend.gemm_min_rows.
DENSE_MIN_ROWS_CPU = 2


def register_backend(backend: Backend) -> Backend:
    _BACKENDS[backend.name] = backend
    return backend


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str) -> Backend:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise InputError(f"unknown INT4 backend {name!r}; choose one of {backend_names()} "
                         "(argument backend=, --backend, or env GRACEVLM_BACKEND)") from None


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 dot products in hardware (AVX512-BF16 or AMX, as torch detects them).
    Without them torch emulates bf16 math in fp32 with conversions: measured on a Xeon with AVX-512 VNNI but
    no AVX512-BF16, a bf16 prefill GEMM 5x slower and a bf16 CLIP tower 8x slower than the exact fp32 path."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)


def warn_emulated_bf16(what: str) -> bool:
    """Warn (RuntimeWarning) that ``what`` runs bf16 math this CPU emulates; returns whether it warned."""
    if cpu_has_fast_bf16():
        return False
    warnings.warn(f"gracevlm: {what} computes in bfloat16, but this CPU has no AVX512-BF16 or AMX: bf16 is "
                  "emulated here and several times slower than the exact fp32 default (measured 5x for the "
                  "prefill GEMM); leave it off on this machine", RuntimeWarning, stacklevel=3)
    return True


def backend_choice(backend: str | None = None) -> str | None:
    """The backend a load uses for its INT4 layers: ``backend``, else ``GRACEVLM_BACKEND``, else None
    (automatic). Read once per load; an unknown name raises InputError; ``native-bf16`` on a CPU without
    bf16 instructions warns (``warn_emulated_bf16``)."""
    name = backend or os.environ.get("GRACEVLM_BACKEND") or None
    if name is None or name == "auto":
        return None
    get_backend(name)
    if name == "native-bf16":
        warn_emulated_bf16("INT4 backend 'native-bf16'")
    return name


def use_backend(model: torch.nn.Module, backend: str | None) -> None:
    """Make every INT4 layer of ``model`` use ``backend`` (None or "auto": automatic; warns as
    ``backend_choice``)."""
    name = backend_choice(backend) if backend not in (None, "auto") else None
    for module in model.modules():  # INT4 layers only: Int8Linear (kernel_bits 8) has its own backends
        if hasattr(module, "kernel_cache") and hasattr(module, "backend") and getattr(module, "kernel_bits", 4) == 4:
            module.backend = name


def keep_half_head(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Keep an fp16/bf16 ``lm_head`` as stored (``HalfLinear``: exact fp32 results, half the bytes read per
    token) when the model computes in fp32 on the CPU with the native kernels; else it is converted to ``dtype``."""
    from . import native

    return (dtype == torch.float32 and weight.dtype in (torch.float16, torch.bfloat16)
            and weight.device.type == "cpu" and native.load_library() is not None)


def select_backend(device: torch.device, rows: int, override: str | None = None) -> Backend:
    """Pick the backend for ``rows`` input rows on ``device``: ``override`` (a layer's backend), else automatic."""
    name = override
    if name and name != "auto":
        backend = get_backend(name)
        if not backend.available(device):
            raise InputError(f"INT4 backend {name!r} is not available on device {device}")
        return backend
    if device.type == "cpu":
        if _BACKENDS["native"].available(device):  # our C kernels; warns once and falls back if unloadable
            # on the AVX2 code path the integer prefill GEMM beats dequantize + fp32 GEMM (README)
            return _BACKENDS["native-igemm"] if _native_int8.igemm_preferred() else _BACKENDS["native"]
        return _BACKENDS["dense"] if rows >= DENSE_MIN_ROWS_CPU else _BACKENDS["int4pack"]
    if device.type == "cuda" and _BACKENDS["triton"].available(device):  # Triton W4A16 kernels
        return _BACKENDS["triton"]
    return _BACKENDS["dense"]


from . import reference as _reference  # noqa: E402  (registers backends)
from . import torch_cpu as _torch_cpu  # noqa: E402
from . import native as _native  # noqa: E402
from . import triton_w4a16 as _triton  # noqa: E402  (imports triton only when its kernels first run)
from . import native_int8 as _native_int8  # noqa: E402

register_backend(_reference.ReferenceBackend())
register_backend(_torch_cpu.DenseBackend())
register_backend(_torch_cpu.Int4PackBackend())
register_backend(_torch_cpu.Int4PackBF16Backend())
register_backend(_native.NativeBackend())
register_backend(_native.NativeF32Backend())
register_backend(_native.NativeI8X2Backend())
register_backend(_native.NativeBF16Backend())
register_backend(_triton.TritonBackend())
register_backend(_native_int8.NativeIGemmBackend())
