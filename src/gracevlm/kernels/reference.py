"""The exact reference: dequantize the whole weight (float32, fp16 scales kept) then matmul."""
from __future__ import annotations

import torch

from ..formats.awq import dequantize_awq


class ReferenceBackend:
    """Exact by definition: ``W = (u - z) * s`` in float32, float32 accumulation.
    Dequantizes on every call; slow, meant for tests and as the yardstick of the others."""

    name = "reference"

    def available(self, device: torch.device) -> bool:
        return True

    def matmul(self, layer, x: torch.Tensor) -> torch.Tensor:
        qweight, qzeros, scales = layer.awq_tensors()
        w = dequantize_awq(qweight, qzeros, scales, layer.group_size)
        y = x.to(torch.float32) @ w
        if layer.bias is not None:
            y = y + layer.bias.to(torch.float32)
        return y.to(x.dtype)
