"""LLaVA-1.5 model: vision tower, projector, LLaMA language model, preprocessing and prompts."""
