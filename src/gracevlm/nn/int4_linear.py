"""``Int4Linear``: a linear layer whose weight is an AWQ GEMM packed W4 tensor triple."""
from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..formats.awq import check_awq, is_symmetric_grace
from ..formats.qat import AwqTensors
from ..kernels.native import NoRowPlan


class Int4Linear(nn.Module):
    """``y = x @ W^T + b`` with ``W^T = (u - z) * s`` held packed.

    Buffers (the on-disk AWQ tensors, kept bit-exact): ``qweight [I, O/8]`` int32,
    ``qzeros [I/g, O/8]`` int32, ``scales [I/g, O]`` (fp16), optional ``bias [O]``.
    Input ``x [..., I]`` of any float dtype; output ``[..., O]`` in x's dtype.
    ``backend`` forces a kernel (``kernels.backend_choice`` resolves it at load); default: automatic by
    device and rows.

    ``release_awq`` (used by the CPU loader once the native kernels hold an exact copy in their own layout)
    frees ``qweight``/``qzeros``/``scales``; reading them, ``to_awq()`` and ``state_dict()`` then rebuild the
    exact tensors from that copy, and moving the layer (``.to``/``.cuda``) restores them first.
    """

    _AWQ_NAMES = ("qweight", "qzeros", "scales")

    def __init__(self, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None, group_size: int = 128, backend: str | None = None,
                 name: str = "Int4Linear"):
        super().__init__()
        self.in_features, self.out_features = check_awq(qweight, qzeros, scales, group_size, bias, name)
        self.group_size = group_size
        self.backend = backend
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("qzeros", qzeros.contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("bias", None if bias is None else bias.contiguous())
        self.kernel_cache: dict = {}
        self._rebuild = None  # set by release_awq: () -> (qweight, qzeros, scales)
        self._awq_nbytes = 0

    # -- released AWQ buffers ------------------------------------------------------------------------
    def release_awq(self, rebuild) -> int:
        """Free the AWQ buffers; ``rebuild()`` must return the exact ``(qweight, qzeros, scales)``. Returns
        the bytes freed."""
        if self._rebuild is not None:
            return 0
        freed = sum(self._buffers[n].numel() * self._buffers[n].element_size() for n in self._AWQ_NAMES)
        self._awq_nbytes = freed
        self._awq_device = self._buffers["qweight"].device
        for n in self._AWQ_NAMES:
            del self._buffers[n]
        self._rebuild = rebuild
        return freed

    @property
    def device(self) -> torch.device:
        """The layer's device (without rebuilding released buffers)."""
        return self._buffers["qweight"].device if self._rebuild is None else self._awq_device

    @property
    def awq_released(self) -> bool:
        return self._rebuild is not None

    def restore_awq(self) -> None:
        """Bring the AWQ buffers back (undoes ``release_awq``)."""
        if self._rebuild is None:
            return
        tensors = self._rebuild()
        self._rebuild = None
        for n, t in zip(self._AWQ_NAMES, tensors):
            self.register_buffer(n, t)

    def __getattr__(self, name: str):
        if name in Int4Linear._AWQ_NAMES:
            rebuild = self.__dict__.get("_rebuild")
            if rebuild is not None:
                return rebuild()[Int4Linear._AWQ_NAMES.index(name)]
        return super().__getattr__(name)

    def awq_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(qweight, qzeros, scales)`` without copies (one rebuild when released): read them this way
        rather than attribute by attribute, which rebuilds each time."""
        if self._rebuild is not None:
            return self._rebuild()
        return self.qweight, self.qzeros, self.scales

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._rebuild is not None:
            for n, t in zip(self._AWQ_NAMES, self._rebuild()):
                destination[prefix + n] = t

    @classmethod
    def from_awq(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None, group_size: int = 128, backend: str | None = None,
                 name: str = "Int4Linear") -> "Int4Linear":
        """Wrap AWQ GEMM tensors (validated; raises FormatError naming ``name`` on a bad layout)."""
        return cls(qweight, qzeros, scales, bias, group_size, backend, name)

    @classmethod
    def from_packed(cls, packed: AwqTensors, backend: str | None = None) -> "Int4Linear":
        return cls(packed.qweight, packed.qzeros, packed.scales, packed.bias, packed.group_size, backend)

    @classmethod
    def concat(cls, layers: list["Int4Linear"]) -> "Int4Linear":
        """One layer computing all of ``layers`` (same input, outputs concatenated in order). Exact: the
        packed words, zeros and scales are concatenated along the output dimension (O % 8 == 0)."""
        first = layers[0]
        if any(l.in_features != first.in_features or l.group_size != first.group_size for l in layers):
            raise ValueError("Int4Linear.concat needs layers with equal in_features and group_size")
        if len({l.bias is None for l in layers}) > 1:
            raise ValueError("Int4Linear.concat needs all layers with a bias or none")
        bias = None if first.bias is None else torch.cat([l.bias for l in layers])
        parts = [l.awq_tensors() for l in layers]
        return cls(*(torch.cat([p[i] for p in parts], 1) for i in range(3)), bias, first.group_size, first.backend)

    def split_awq(self, sizes: list[int]) -> list[AwqTensors]:
        """Inverse of ``concat``: the AWQ tensors of each part (``sizes`` = out_features of the parts)."""
        if sum(sizes) != self.out_features or any(n % 8 for n in sizes):
            raise ValueError(f"sizes {sizes} must be multiples of 8 adding up to {self.out_features}")
        out, start = [], 0
        qweight, qzeros, scales = self.awq_tensors()
        for n in sizes:
            out.append(AwqTensors(qweight[:, start // 8:(start + n) // 8].clone(),
                                  qzeros[:, start // 8:(start + n) // 8].clone(),
                                  scales[:, start:start + n].clone(),
                                  None if self.bias is None else self.bias[start:start + n].clone(),
                                  self.group_size))
            start += n
        return out

    def to_awq(self) -> AwqTensors:
        """The original AWQ tensors, bit-exact (clones; safe to modify)."""
        qweight, qzeros, scales = self.awq_tensors()
        if self._rebuild is None:
            qweight, qzeros, scales = qweight.clone(), qzeros.clone(), scales.clone()
        return AwqTensors(qweight, qzeros, scales, None if self.bias is None else self.bias.clone(), self.group_size)

    @property
    def symmetric(self) -> bool:
        """True for GRACE layers (every zero point is 8)."""
        return is_symmetric_grace(self.qzeros)

    def nbytes(self) -> int:
        """Bytes of the packed tensors (excluding backend caches)."""
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        if self._rebuild is not None:
            return self._awq_nbytes + bias
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.qzeros, self.scales)) + bias

    def cache_nbytes(self) -> int:
        """Bytes held by backend-prepared layouts."""
        total = 0
        for state in self.kernel_cache.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
        return total

    def _apply(self, fn, recurse=True):
        self.restore_awq()  # the prepared layouts belong to the old device/dtype: take the exact tensors along
        self.kernel_cache = {}
        return super()._apply(fn, recurse)

    def row_plan_for(self, rows: int):
        """The bound kernel (``kernels.native.RowPlan``) ``forward`` runs for ``rows`` fp32 CPU rows now, or None."""
        plan = self.kernel_cache.get("row_plan")
        backend = kernels.select_backend(self.device, rows, self.backend)
        return plan if plan is not None and plan.backend is backend and plan.takes(rows) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int4Linear expects input [..., {self.in_features}], got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        backend = kernels.select_backend(x.device, x2.shape[0], self.backend)
        plan = self.kernel_cache.get("row_plan")
        if (plan is not None and plan.backend is backend and plan.takes(x2.shape[0]) and x2.dtype == torch.float32
                and x2.stride(-1) == 1 and not (x2.requires_grad and torch.is_grad_enabled())):
            return plan.run(x2).reshape(*lead, self.out_features)  # decode steps: the same call, arguments bound
        if self._rebuild is not None and not getattr(backend, "reads_own_layout", False):
            self.restore_awq()  # this backend computes from the AWQ tensors: bring them back once
        y = backend.matmul(self, x2)
        if (plan is None or plan.backend is not backend) and hasattr(backend, "row_plan"):
            self.kernel_cache["row_plan"] = backend.row_plan(self) or NoRowPlan(backend)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits=4, "
                f"group_size={self.group_size}, bias={self.bias is not None}, "
                f"backend={self.backend or 'auto'}, packed_bytes={self.nbytes()}"
                + (", awq=released" if self._rebuild is not None else ""))
