"""``LSQLinear``: GRACE's learned-step-size (LSQ) fake-quant linear for quantization-aware training.

Symmetric W4 (codes [-8, 7]; ``bits=8``: [-128, 127], as below with those bounds), groups of ``g = 128``
consecutive input columns (one group per row when
``in_features % g != 0``, as GRACE's QAT module does). Each group has a learned scale kept as
``log_scale``, flat fp32 of length ``O * I / g`` (entry ``o * (I / g) + i // g``: the layout of GRACE's
``qat_quantized_weights.bin`` sidecar). Forward::

    s   = exp(clamp(log_scale, ln 1e-8, ln 1e4))
    W_q = clamp(round(W / s), -8, 7) * s            (the codes q are integers in [-8, 7])
    y   = x @ W_q^T + b

Backward (LSQ, Esser et al. 2020), with ``x = W / s`` per element:

* ``dW``: straight-through inside the clamp range (``-8 <= x <= 7``), zero outside;
* ``ds``: ``round(x) - x`` inside, the clamped code (``-8`` or ``7``) outside, summed over the group and
  multiplied by the LSQ gradient scale ``1 / sqrt(g * qmax)`` (``qmax = 7``).

The wrapper *shares* the wrapped linear's ``weight`` (and ``bias``) Parameter: an optimizer holding the
original parameters keeps training them, and ``named_parameters`` keeps the original names
(``...q_proj.weight``) next to the new ``...q_proj.log_scale``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOG_SCALE_MIN = math.log(1e-8)
LOG_SCALE_MAX = math.log(1e4)
DEFAULT_CLIP_RATIOS = tuple(round(1.0 - 0.01 * k, 2) for k in range(61))  # 1.00, 0.99, ..., 0.40


def effective_group_size(in_features: int, group_size: int) -> int:
    """GRACE's rule: ``group_size`` when it divides ``in_features``, else one group per row."""
    return group_size if in_features % group_size == 0 else in_features


def code_range(bits: int) -> tuple[int, int]:
    """Signed symmetric code range: ``[-2^(b-1), 2^(b-1) - 1]`` ([-8, 7] for 4 bits)."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


class _LsqFakeQuant(torch.autograd.Function):
    """``W [O, I]``, ``scale [O, n]`` (fp32, ``n`` groups per row) -> ``clamp(round(W/s), qmin, qmax) * s``."""

    @staticmethod
    def forward(ctx, weight, scale, qmin: int, qmax: int, grad_factor: float):
        out_f, in_f = weight.shape
        n = scale.shape[1]
        s = scale.unsqueeze(-1)
        x = weight.to(torch.float32).view(out_f, n, in_f // n) / s
        q = torch.round(x).clamp_(qmin, qmax)
        ctx.save_for_backward(weight, scale)
        ctx.qmin, ctx.qmax, ctx.grad_factor = qmin, qmax, grad_factor
        return (q * s).view(out_f, in_f).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        out_f, in_f = weight.shape
        n = scale.shape[1]
        s = scale.unsqueeze(-1)
        x = weight.to(torch.float32).view(out_f, n, in_f // n) / s
        inside = (x >= ctx.qmin) & (x <= ctx.qmax)
        g = grad.to(torch.float32).view(out_f, n, in_f // n)
        grad_w = grad_s = None
        if ctx.needs_input_grad[0]:
            grad_w = (g * inside).view(out_f, in_f).to(weight.dtype)
        if ctx.needs_input_grad[1]:
            q = torch.round(x).clamp_(ctx.qmin, ctx.qmax)
            grad_s = (g * torch.where(inside, q - x, q)).sum(-1) * ctx.grad_factor
        return grad_w, grad_s, None, None, None


def lsq_fake_quantize(weight: torch.Tensor, scale: torch.Tensor, bits: int = 4,
                      grad_factor: float = 1.0) -> torch.Tensor:
    """Differentiable fake quantization of ``weight [O, I]`` with per-group scales ``scale [O, n]``."""
    qmin, qmax = code_range(bits)
    return _LsqFakeQuant.apply(weight, scale, qmin, qmax, float(grad_factor))


@torch.no_grad()
def mse_scale_init(weight: torch.Tensor, group_size: int = 128, bits: int = 4,
                   ratios: tuple[float, ...] = DEFAULT_CLIP_RATIOS, chunk_rows: int = 4096) -> torch.Tensor:
    """Per-group scales ``[O, I/g]`` (fp32) minimizing the squared quantization error.

    For each group the candidates are ``s = r * max|W_group| / qmax`` for the clipping ratios ``r``;
    the first ratio with the smallest error wins (ratio 1.0 = no clipping, the RTN scale). All-zero
    groups get ``s = 1e-8`` (any scale reproduces zeros exactly).
    """
    out_f, in_f = weight.shape
    g = effective_group_size(in_f, group_size)
    n = in_f // g
    _, qmax = code_range(bits)
    qmin = -qmax - 1
    result = torch.empty(out_f, n, dtype=torch.float32, device=weight.device)
    for start in range(0, out_f, chunk_rows):
        w = weight[start:start + chunk_rows].detach().to(torch.float32).view(-1, n, g)
        amax = w.abs().amax(-1)
        best_s = (amax / qmax).clamp_min(1e-8)
        best_err = torch.full_like(best_s, float("inf"))
        for r in ratios:
            s = (amax * r / qmax).clamp_min(1e-8)
            q = torch.round(w / s.unsqueeze(-1)).clamp_(qmin, qmax)
            err = (q * s.unsqueeze(-1) - w).pow_(2).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
        result[start:start + chunk_rows] = best_s
    return result


class LSQLinear(nn.Module):
    """Fake-quantized view of an ``nn.Linear`` with learned per-group scales (see the module doc).

    ``LSQLinear(linear)`` shares ``linear.weight`` / ``linear.bias``; ``init`` is ``"mse"`` (search over
    clipping ratios, the default) or ``"max"`` (``max|W| / qmax``, round-to-nearest's scale).
    ``log_scale`` is trainable unless ``learn_scales=False``.
    """

    def __init__(self, linear: nn.Linear, bits: int = 4, group_size: int = 128, init: str = "mse",
                 learn_scales: bool = True):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LSQLinear wraps an nn.Linear, got {type(linear).__name__}")
        if init not in ("mse", "max"):
            raise ValueError(f"init must be 'mse' or 'max', got {init!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits = bits
        self.group_size = effective_group_size(self.in_features, group_size)
        self.qmin, self.qmax = code_range(bits)
        self.weight = linear.weight
        self.bias = linear.bias
        ratios = DEFAULT_CLIP_RATIOS if init == "mse" else (1.0,)
        s0 = mse_scale_init(linear.weight, self.group_size, bits, ratios=ratios)
        self.log_scale = nn.Parameter(torch.log(s0).reshape(-1), requires_grad=learn_scales)
        self.grad_factor = 1.0 / math.sqrt(self.group_size * self.qmax)

    @property
    def n_groups(self) -> int:
        return self.in_features // self.group_size

    def scales(self) -> torch.Tensor:
        """Per-group scales ``[O, I/g]`` fp32, with the forward clamp of ``log_scale`` applied."""
        return torch.exp(self.log_scale.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)).view(self.out_features, self.n_groups)

    def quantized_weight(self) -> torch.Tensor:
        """``W_q = clamp(round(W / s), qmin, qmax) * s`` in the weight's dtype (differentiable, LSQ)."""
        return lsq_fake_quantize(self.weight, self.scales(), self.bits, self.grad_factor)

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        """Integer codes ``[O, I]`` (int8) of the current weight and scales."""
        s = self.scales().unsqueeze(-1)
        x = self.weight.to(torch.float32).view(self.out_features, self.n_groups, self.group_size) / s
        return torch.round(x).clamp_(self.qmin, self.qmax).to(torch.int8).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def baked_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``q * s`` computed in fp32 and rounded once to ``dtype`` (default: the weight's dtype)."""
        w = self.codes().to(torch.float32).view(self.out_features, self.n_groups, self.group_size)
        w = w * self.scales().unsqueeze(-1)
        return w.view(self.out_features, self.in_features).to(dtype or self.weight.dtype)

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` holding the baked fake-quantized weight (``q * s`` in ``dtype``)."""
        w = self.baked_weight(dtype)
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=w.device, dtype=dtype or w.dtype)
        lin.weight.copy_(w)
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
