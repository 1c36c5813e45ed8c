"""Qwen3-VL family: config, image processing, chat prompts, M-RoPE positions, vision tower, language
model and the transformers weight map (spec: shared/reference/qwen3-vl.md). Not yet wired into loading."""
