"""LLaVA-1.5: CLIP vision tower, mlp2x_gelu projector, LLaMA language model, pad-to-square processing, vicuna templates."""
