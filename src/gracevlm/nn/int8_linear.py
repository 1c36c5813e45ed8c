"""``Int8Linear``: a linear layer whose weight is symmetric int8 codes with per-group fp32 scales (GRACE W8)."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import FormatError
from ..formats.w8 import Int8Codes, int8_to_qat, qat_to_int8
from ..kernels import native_int8
from ..kernels.native import NoRowPlan


class Int8Linear(nn.Module):
    """``y = x @ W^T + b`` with ``W[o, k] = q[o, k] * s[o, k // g]``: int8 codes ``q`` in [-128, 127] times
    fp32 scales ``s`` (for a GRACE layer ``s = exp(float32(log_scale))``), the product taken in fp32. This is
    neither the baked bf16 weight ``W_q = bf16(q * s)`` transformers computes with nor ``q * fp16(s)``.

    Buffers: ``qweight`` int8 [O, I], ``scales`` fp32 [O, I/g], optional ``bias`` [O] (added in fp32), and
    ``log_scale`` (flat, as stored) when built by ``from_qat``. Input ``x [..., I]`` of any float dtype,
    output in x's dtype. ``backend`` (a name of ``kernels.native_int8.INT8_BACKENDS``) forces a kernel;
    default: ``native`` on CPU when its library loads, else ``dense``.
    """

    kernel_bits = 8  # kernels.use_backend switches INT4 layers only

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 group_size: int = 128, log_scale: torch.Tensor | None = None, backend: str | None = None,
                 name: str = "Int8Linear"):
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise FormatError(f"{name}: qweight must be int8 [out, in], got {qweight.dtype} {tuple(qweight.shape)}")
        out_f, in_f = qweight.shape
        if group_size <= 0 or in_f % group_size or tuple(scales.shape) != (out_f, in_f // group_size):
            raise FormatError(f"{name}: scales {tuple(scales.shape)} do not match qweight {tuple(qweight.shape)} "
                              f"with group_size {group_size} (expected [{out_f}, {in_f // max(group_size, 1)}])")
        if bias is not None and tuple(bias.shape) != (out_f,):
            raise FormatError(f"{name}: bias {tuple(bias.shape)} does not match out_features {out_f}")
        self.in_features, self.out_features, self.group_size = in_f, out_f, group_size
        self.backend = backend
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.to(torch.float32).contiguous())
        self.register_buffer("bias", None if bias is None else bias.contiguous())
        self.register_buffer("log_scale", None if log_scale is None else log_scale.reshape(-1).contiguous())
        self.kernel_cache: dict = {}

    @classmethod
    def from_codes(cls, codes: Int8Codes, backend: str | None = None, name: str = "Int8Linear") -> "Int8Linear":
        return cls(codes.qweight, codes.scales, codes.bias, codes.group_size, codes.log_scale, backend, name)

    @classmethod
    def from_qat(cls, weight: torch.Tensor, log_scale: torch.Tensor, bias: torch.Tensor | None = None,
                 group_size: int = 128, backend: str | None = None, name: str = "Int8Linear") -> "Int8Linear":
        """From a GRACE QAT W8 layer (baked weight ``W_q`` + ``log_scale``): codes recovered exactly, refused
        with a FormatError naming ``name`` and the first bad element unless ``dtype(q * s) == W_q`` everywhere
        (``formats.w8.qat_to_int8``)."""
        return cls.from_codes(qat_to_int8(weight, log_scale, bias, group_size, name), backend, name)

    @classmethod
    def concat(cls, layers: list["Int8Linear"]) -> "Int8Linear":
        """One layer computing all of ``layers`` (same input, outputs concatenated in order). Exact: codes,
        scales, biases and the flat ``[O, I/g]``-ordered log_scales are concatenated along the outputs."""
        first = layers[0]
        if any(l.in_features != first.in_features or l.group_size != first.group_size for l in layers):
            raise ValueError("Int8Linear.concat needs layers with equal in_features and group_size")
        for name in ("bias", "log_scale"):
            if len({getattr(l, name) is None for l in layers}) > 1:
                raise ValueError(f"Int8Linear.concat needs all layers with a {name} or none")
        cat = lambda name: None if getattr(first, name) is None else torch.cat([getattr(l, name) for l in layers])  # noqa: E731
        return cls(cat("qweight"), cat("scales"), cat("bias"), first.group_size, cat("log_scale"), first.backend)

    def to_codes(self) -> Int8Codes:
        """The codes, scales, log_scale and bias (clones; bit-exact)."""
        clone = lambda t: None if t is None else t.clone()  # noqa: E731
        return Int8Codes(self.qweight.clone(), self.scales.clone(), clone(self.log_scale), clone(self.bias),
                         self.group_size)

    def to_qat(self, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_q, log_scale)`` as a GRACE QAT checkpoint stores them: bit-exact for a layer made by ``from_qat``
        from a ``dtype`` weight. FormatError for a layer built from scales (no log_scale)."""
        return int8_to_qat(self.to_codes(), dtype)

    def dequantize(self, o0: int = 0, o1: int | None = None) -> torch.Tensor:
        """``W[o0:o1]`` as fp32 ``[o1 - o0, I]``: ``q * s`` (the exact fp32 products)."""
        o1 = self.out_features if o1 is None else o1
        g = self.group_size
        q = self.qweight[o0:o1].to(torch.float32).view(o1 - o0, -1, g)
        return (q * self.scales[o0:o1].unsqueeze(-1)).view(o1 - o0, self.in_features)

    def nbytes(self) -> int:
        """Bytes of codes + scales + bias (what a decode step reads)."""
        ts = [self.qweight, self.scales] + ([] if self.bias is None else [self.bias])
        return sum(t.numel() * t.element_size() for t in ts)

    def _apply(self, fn, recurse=True):
        """Moves and casts as any module, except that the scales (and log_scale) keep their dtype: ``.half()``
        or ``.to(torch.bfloat16)`` must not round them (the layer's function is ``q * s`` with fp32 ``s``)."""
        self.kernel_cache = {}
        keep = {n: self._buffers[n] for n in ("scales", "log_scale") if self._buffers.get(n) is not None}
        out = super()._apply(fn, recurse)
        for n, t in keep.items():
            self._buffers[n] = t.to(self.qweight.device)
        return out

    def _plan_current(self, plan, backend, rows: int) -> bool:
        return (plan is not None and plan.backend is backend and plan.takes(rows) and plan.keep[0] is self.qweight
                and plan.keep[1] is self.scales)

    def row_plan_for(self, rows: int):
        """The bound kernel (``kernels.native.RowPlan``) ``forward`` runs for ``rows`` fp32 CPU rows now, or None."""
        plan = self.kernel_cache.get("row_plan")
        return plan if self._plan_current(plan, native_int8.select_int8_backend(self.qweight.device, self.backend),
                                          rows) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int8Linear expects input [..., {self.in_features}], got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        backend = native_int8.select_int8_backend(x.device, self.backend)
        plan = self.kernel_cache.get("row_plan")
        if (self._plan_current(plan, backend, x2.shape[0]) and x2.dtype == torch.float32 and x2.stride(-1) == 1
                and not (x2.requires_grad and torch.is_grad_enabled())):
            return plan.run(x2).reshape(*lead, self.out_features)  # decode steps: the same call, arguments bound
        y = backend.matmul(self, x2)
        if (plan is None or plan.backend is not backend) and hasattr(backend, "row_plan"):
            self.kernel_cache["row_plan"] = backend.row_plan(self) or NoRowPlan(backend)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits=8, "
                f"group_size={self.group_size}, bias={self.bias is not None}, backend={self.backend or 'auto'}")
