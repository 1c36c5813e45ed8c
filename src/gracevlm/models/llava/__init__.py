"""LLaVA-1.5: CLIP vision tower, mlp2x_gelu projector, LLaMA language model, pad-to-square processing,
vicuna templates. ``FAMILY`` is what ``models.registry`` hands to the engine and the front ends."""
from .family import LlavaFamily

FAMILY = LlavaFamily()
