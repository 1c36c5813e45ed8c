"""A dense linear layer that keeps its fp16/bf16 weight as stored and computes in fp32."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import native


class HalfLinear(nn.Module):
    """``y = x @ W^T`` (no bias) for a weight ``W [O, I]`` kept in fp16 or bf16, output fp32.

    Every weight is converted exactly to fp32 and the sums run in fp32, so the result is that of an fp32
    ``nn.Linear`` holding the same values (up to summation order), while the layer holds and reads half
    the bytes. Made for a model's ``lm_head`` when the model runs in fp32: at decode it is a ~260 MB
    matrix-vector product per token for LLaVA-1.5-7B.

    Below ``gemm_min_rows`` rows on CPU the native kernel computes each output row independently of the
    others (``rows_independent``); otherwise the weight is converted tile by tile and multiplied with
    ``torch.mm``.
    """

    gemm_min_rows = 16
    tile_elems = 4 << 20  # weight elements converted to fp32 per GEMM tile (16 MiB)
    compute_dtype = torch.float32  # what LlamaForCausalLM.logits feeds it

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        if weight.dim() != 2 or weight.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"HalfLinear needs a 2-D fp16/bf16 weight, got {tuple(weight.shape)} {weight.dtype}")
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def rows_independent(self, rows: int) -> bool:
        """Whether ``rows`` input rows are each computed as they would be alone (bitwise)."""
        return self.weight.device.type == "cpu" and rows < self.gemm_min_rows and native.load_library() is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = native.half_matmul(self.weight, x2) if x2.shape[0] < self.gemm_min_rows else None
        if y is None:
            xf = x2.to(torch.float32)
            rows = max(1, min(self.out_features, self.tile_elems // self.in_features))
            y = torch.empty(x2.shape[0], self.out_features, dtype=torch.float32, device=x.device)
            for o0 in range(0, self.out_features, rows):
                y[:, o0:o0 + rows] = xf @ self.weight[o0:o0 + rows].to(torch.float32).t()
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight_dtype={self.weight.dtype}"
