"""Round-to-nearest symmetric W4 group quantization (the no-training baseline)."""
from __future__ import annotations

import torch

from ..errors import FormatError
from .qat import AwqTensors, symmetric_to_awq


def rtn_quantize(weight: torch.Tensor, group_size: int = 128, bias: torch.Tensor | None = None) -> AwqTensors:
    """``weight [O, I]`` -> AWQ tensors with codes ``q = clamp(round(W / s), -8, 7)``, ``s = max|W_group| / 7``
    rounded to fp16 first (so the stored scale is the one the codes were computed with)."""
    out_f, in_f = weight.shape
    if in_f % group_size:
        raise FormatError(f"RTN: group_size {group_size} does not divide in_features {in_f}")
    w = weight.detach().to(torch.float32).view(out_f, in_f // group_size, group_size)
    s = (w.abs().amax(-1) / 7.0).clamp_min(1e-8).to(torch.float16).to(torch.float32)
    q = torch.round(w / s.unsqueeze(-1)).clamp(-8, 7).to(torch.int8).view(out_f, in_f)
    return symmetric_to_awq(q, s, bias)
