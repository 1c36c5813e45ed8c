"""The demo model's architecture: a small LLaVA-1.5 (CLIP-style ViT -> GELU projector -> LLaMA).

All linear dimensions are multiples of 128 so every quantized linear has whole W4G128 groups.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..models.llama import LlamaForCausalLM, LlamaSpec, Rotary
from ..models.llava.model import LlavaModel, Projector


@dataclass(frozen=True)
class DemoArch:
    hidden: int = 256
    intermediate: int = 768
    layers: int = 4
    heads: int = 4
    vocab: int = 512
    max_positions: int = 512
    vision_hidden: int = 128
    vision_intermediate: int = 512
    vision_layers: int = 3
    vision_heads: int = 2
    image_size: int = 64
    patch_size: int = 8

    def as_dict(self) -> dict:
        return asdict(self)


def init_llama_(lm: LlamaForCausalLM, std: float = 0.02, seed: int = 0) -> None:
    """LLaMA-style initialization: N(0, std) for linears and embeddings, ones for the norms; output
    projections (o_proj, down_proj) scaled by 1/sqrt(2 * layers) (GPT-2 style residual scaling)."""
    gen = torch.Generator().manual_seed(seed)
    n_layers = len(lm.model.layers)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            else:
                scale = std / (2 * n_layers) ** 0.5 if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def build_model(arch: DemoArch = DemoArch(), seed: int = 0, position_std: float = 0.3) -> LlavaModel:
    """A freshly initialized demo LlavaModel (fp32), reproducible from ``seed``. The vision tower's position
    embeddings are drawn with ``position_std`` (CLIP's default init is 0.02, much weaker than the patch
    content; a tower trained from scratch then learns positions slowly)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    spec = LlamaSpec(arch.hidden, arch.intermediate, arch.layers, arch.heads, arch.heads, arch.vocab,
                     max_position_embeddings=arch.max_positions)
    lm = LlamaForCausalLM(spec)
    lm.rotary = Rotary(spec)
    init_llama_(lm, seed=seed)
    torch.manual_seed(seed + 1)
    vcfg = CLIPVisionConfig(hidden_size=arch.vision_hidden, intermediate_size=arch.vision_intermediate,
                            num_hidden_layers=arch.vision_layers, num_attention_heads=arch.vision_heads,
                            image_size=arch.image_size, patch_size=arch.patch_size, hidden_act="quick_gelu",
                            layer_norm_eps=1e-5)
    tower = CLIPVisionModel(vcfg)
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():  # position as visible as content from the start (where-questions learn faster)
        pos = tower.embeddings.position_embedding.weight
        pos.copy_(torch.randn(pos.shape, generator=gen) * position_std)
    projector = Projector(arch.vision_hidden, arch.hidden)
    with torch.no_grad():
        for m in projector:
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.02)
                m.bias.zero_()
    return LlavaModel(tower, projector, lm)
