"""transformers as the peer of ``gracevlm export --check transformers`` for a Qwen3-VL export folder.

The folder is loaded as its model card says: ``Qwen3VLForConditionalGeneration`` (fp32), the tokenizer and its chat
template, and the image processor with the PIL backend (``Qwen3VLProcessor`` itself also builds a video processor,
which needs torchvision); each ``<|image_pad|>`` is expanded to the image's ``t*h*w / merge^2`` tokens as the
processor does. Greedy tokens stop at any ``generation_config.eos_token_id``.
"""
from __future__ import annotations

from pathlib import Path

IMAGE_PAD = "<|image_pad|>"


class TransformersPeer:
    def __init__(self, folder: str | Path):
        import torch
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen3VLForConditionalGeneration

        self.folder = str(folder)
        self.model = Qwen3VLForConditionalGeneration.from_pretrained(self.folder, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.images = AutoImageProcessor.from_pretrained(self.folder, backend="pil")
        eos = self.model.generation_config.eos_token_id
        self.eos = [eos] if isinstance(eos, int) else list(eos or [])

    def inputs(self, query: str, image) -> dict:
        """The processor's inputs for one user turn (the image first, then the question)."""
        content = ([] if image is None else [{"type": "image"}]) + [{"type": "text", "text": query}]
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)
        extra = {}
        if image is not None:
            extra = dict(self.images(images=[image], return_tensors="pt"))
            n = int(extra["image_grid_thw"][0].prod()) // self.images.merge_size ** 2
            text = text.replace(IMAGE_PAD, IMAGE_PAD * n)
        ids = self.tokenizer(text, return_tensors="pt")
        # which positions are image tokens (transformers' M-RoPE reads it; the processor returns it too)
        return {**ids, "mm_token_type_ids": (ids["input_ids"] == self.model.config.image_token_id).long(), **extra}

    def run(self, query: str, image, forced: list[int], n: int) -> tuple[list[int], "object"]:
        """(greedy tokens without the stop token, teacher-forced logits rows [len(forced), V]) for one case."""
        import torch

        inputs = self.inputs(query, image)
        prompt = inputs["input_ids"].shape[1]
        with torch.no_grad():
            gen = self.model.generate(**inputs, max_new_tokens=n, do_sample=False)[0, prompt:].tolist()
            stop = next((i for i, t in enumerate(gen) if t in self.eos), len(gen))
            ids = torch.cat([inputs["input_ids"], torch.tensor([forced[:-1]], dtype=torch.long)], 1)
            extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
            types = (ids == self.model.config.image_token_id).long()
            logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types,
                                **extra).logits[0]
        return gen[:stop], logits[prompt - 1:].float()
