"""Backends built from stock torch operators (no compiled code of our own).

``dense``        dequantize the layer into a reused float32 buffer, then one float32 GEMM. Same
                 arithmetic as ``reference`` (exact weights, fp32 accumulation); the GEMM may sum in a
                 different order, so outputs agree to ~1e-6 relative. Best for many rows (prefill).
``int4pack``     ``torch.ops.aten._weight_int4pack_mm_for_cpu`` with float32 activations and float32
                 scale/offset: exact weights, fp32 accumulation (~2e-6 relative vs reference).
``int4pack-bf16`` the same kernel with bfloat16 activations and bfloat16 scales: much faster on CPU,
                 but APPROXIMATE: scales and activations are rounded to bf16 (~2e-3 relative error).
                 Never selected automatically.
Layers that torch's kernel cannot take (out_features % 16 != 0, or a group size outside
{32, 64, 128, 256}) fall back to ``dense``.
"""
from __future__ import annotations

import threading

import torch

from ..formats.awq import AWQ_ORDER, unpack_awq, unpack_nibbles

_scratch = threading.local()


def _buffer(numel: int, device: torch.device) -> torch.Tensor:
    """A per-thread float32 scratch buffer of at least ``numel`` elements on ``device`` (reused)."""
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    buf = bufs.get(device)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: reused in and outside inference mode
            buf = bufs[device] = torch.empty(numel, dtype=torch.float32, device=device)
    return buf[:numel]


class DenseBackend:
    """Dequantize once per call (vectorized, storage-order columns, no gather) then fp32 GEMM.
    Error vs reference: fp32 summation order only (~1e-6 relative)."""

    name = "dense"

    def available(self, device: torch.device) -> bool:
        return True

    def _prepare(self, layer) -> dict:
        state = layer.kernel_cache.get(self.name)
        if state is None:
            out_f = layer.out_features
            zeros = unpack_nibbles(layer.qzeros)  # zeros [I/g, O] logical order
            # Column order of the dequantized buffer: nibble plane k, then word c -> logical 8c+ORDER[k].
            perm = (torch.arange(out_f // 8).unsqueeze(0) * 8 + torch.tensor(AWQ_ORDER).unsqueeze(1)).reshape(-1)
            s = layer.scales.to(torch.float32)[:, perm]
            zs = zeros.to(torch.float32)[:, perm] * s
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(out_f)
            bias = None if layer.bias is None else layer.bias.to(torch.float32)
            state = dict(s=s.unsqueeze(1).contiguous(), zs=zs.unsqueeze(1).contiguous(), inv=inv, bias=bias)
            layer.kernel_cache[self.name] = state
        return state

    def dequantize_storage_order(self, layer, out: torch.Tensor | None = None) -> torch.Tensor:
        """``W^T`` ``[I, O]`` float32 with columns in storage order (see ``_prepare``)."""
        st = self._prepare(layer)
        in_f, out_f, g = layer.in_features, layer.out_features, layer.group_size
        w = out if out is not None else _buffer(in_f * out_f, layer.device)
        w8 = w.view(in_f, 8, out_f // 8)
        qw = layer.qweight
        tmp = torch.empty_like(qw)
        for k in range(8):
            torch.bitwise_right_shift(qw, 4 * k, out=tmp)
            tmp.bitwise_and_(15)
            w8[:, k, :].copy_(tmp)
        wg = w.view(in_f // g, g, out_f)
        wg.mul_(st["s"]).sub_(st["zs"])
        return w.view(in_f, out_f)

    def matmul(self, layer, x: torch.Tensor) -> torch.Tensor:
        st = self._prepare(layer)
        w = self.dequantize_storage_order(layer)
        y = torch.mm(x.to(torch.float32), w)[:, st["inv"]]
        if st["bias"] is not None:
            y += st["bias"]
        return y.to(x.dtype)


class Int4PackBackend:
    """torch's CPU int4 kernel with float32 activations: exact weights, fp32 accumulation
    (~2e-6 relative vs reference)."""

    name = "int4pack"
    act_dtype = torch.float32

    def available(self, device: torch.device) -> bool:
        return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")

    @staticmethod
    def supports(layer) -> bool:
        return layer.out_features % 16 == 0 and layer.group_size in (32, 64, 128, 256)

    def _prepare(self, layer) -> dict:
        key = f"int4pack:{self.act_dtype}"
        state = layer.kernel_cache.get(key)
        if state is None:
            codes, zeros = unpack_awq(layer.qweight, layer.qzeros)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.t().contiguous().to(torch.int32), 1)
            s = layer.scales.to(torch.float32)
            # torch's kernel computes (u - 8) * scale + offset; offset = (8 - z) * s reproduces (u - z) * s.
            sz = torch.stack([s, (8.0 - zeros.to(torch.float32)) * s], dim=-1).to(self.act_dtype).contiguous()
            bias = None if layer.bias is None else layer.bias.to(torch.float32)
            state = dict(packed=packed, sz=sz, bias=bias)
            layer.kernel_cache[key] = state
        return state

    def matmul(self, layer, x: torch.Tensor) -> torch.Tensor:
        if not self.supports(layer):
            return _DENSE.matmul(layer, x)
        st = self._prepare(layer)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(self.act_dtype).contiguous(), st["packed"], layer.group_size, st["sz"])
        y = y.to(torch.float32)
        if st["bias"] is not None:
            y += st["bias"]
        return y.to(x.dtype)


class Int4PackBF16Backend(Int4PackBackend):
    """APPROXIMATE: torch's CPU int4 kernel with bfloat16 activations and bf16-rounded scales
    (~2e-3 relative error vs reference). Fast; opt-in only."""

    name = "int4pack-bf16"
    act_dtype = torch.bfloat16


_DENSE = DenseBackend()
