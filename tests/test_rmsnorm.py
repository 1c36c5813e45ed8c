"""``models.llama.RMSNorm``: its one-call fp32 path gives the same bits as the written-out formula (what
transformers' LlamaRMSNorm / Qwen3RMSNorm compute), and the mixed-dtype path is the formula itself."""
import torch

from gracevlm.models.llama import RMSNorm


def formula(x, weight, eps):
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def test_fp32_path_is_bitwise_the_formula():
    gen = torch.Generator().manual_seed(0)
    for i in range(60):
        d = int(torch.randint(1, 3000, (1,), generator=gen))
        norm = RMSNorm(d, 1e-6)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(d, generator=gen))
        x = torch.randn(2, int(torch.randint(1, 4, (1,), generator=gen)), d, generator=gen) * (10 ** (i % 5 - 2))
        assert torch.equal(norm(x), formula(x, norm.weight, 1e-6)), d


def test_bf16_input_keeps_the_formula():
    norm = RMSNorm(64, 1e-5)
    x = torch.randn(3, 64).to(torch.bfloat16)
    assert torch.equal(norm(x), formula(x, norm.weight, 1e-5))
