"""Qwen3-VL: ViT + merger + deepstack vision tower, Qwen3 decoder with interleaved M-RoPE, smart_resize
processing, the checkpoint's chat template (spec: shared/reference/qwen3-vl.md). ``FAMILY`` is what
``models.registry`` hands to the engine and the front ends."""
from .family import Qwen3VLFamily

FAMILY = Qwen3VLFamily()
