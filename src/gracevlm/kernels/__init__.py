"""INT4 matmul backends behind one dispatch (INT8 layers have their own: ``native_int8.select_int8_backend``).

A backend computes ``y[M, O] = x[M, I] @ W^T + bias`` for a packed layer (an object with ``qweight``,
``qzeros``, ``scales``, ``bias``, ``group_size``, ``in_features``, ``out_features`` and a dict
``kernel_cache`` where backends keep their own prepared layout). Every backend agrees with
``reference`` within the error stated in its docstring; tests check it.

Selection: an explicit ``backend`` argument, else the ``GRACEVLM_BACKEND`` environment variable,
else automatic by device and number of rows M.
"""
from __future__ import annotations

import os
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
                         "(argument backend= or env GRACEVLM_BACKEND)") from None


def select_backend(device: torch.device, rows: int, override: str | None = None) -> Backend:
    """Pick the backend for ``rows`` input rows on ``device``: override > env var > automatic."""
    name = override or os.environ.get("GRACEVLM_BACKEND") or None
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
    return _BACKENDS["dense"]


from . import reference as _reference  # noqa: E402  (registers backends)
from . import torch_cpu as _torch_cpu  # noqa: E402
from . import native as _native  # noqa: E402
from . import native_int8 as _native_int8  # noqa: E402

register_backend(_reference.ReferenceBackend())
register_backend(_torch_cpu.DenseBackend())
register_backend(_torch_cpu.Int4PackBackend())
register_backend(_torch_cpu.Int4PackBF16Backend())
register_backend(_native.NativeBackend())
register_backend(_native.NativeF32Backend())
register_backend(_native.NativeI8X2Backend())
register_backend(_native.NativeBF16Backend())
register_backend(_native_int8.NativeIGemmBackend())
