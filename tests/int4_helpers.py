"""Shared by the INT4 tests: a random packed layer (uniform codes; GRACE zeros = 8 when ``symmetric``)."""
import torch

from gracevlm.formats.awq import pack_awq
from gracevlm.nn import Int4Linear


def random_int4_layer(in_f, out_f, g, bias, symmetric, gen):
    codes = torch.randint(0, 16, (in_f, out_f), dtype=torch.uint8, generator=gen)
    zeros = (torch.full((in_f // g, out_f), 8, dtype=torch.uint8) if symmetric
             else torch.randint(0, 16, (in_f // g, out_f), dtype=torch.uint8, generator=gen))
    qweight, qzeros = pack_awq(codes, zeros)
    scales = (torch.rand(in_f // g, out_f, generator=gen) * 0.02 + 1e-3).half()
    b = torch.randn(out_f, generator=gen).half() if bias else None
    return Int4Linear.from_awq(qweight, qzeros, scales, b, group_size=g)
