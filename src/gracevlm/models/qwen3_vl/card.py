"""The Qwen3-VL parts of an export's model card (``Family.export_card``): what the folder is and how transformers
and vLLM load it. ``tests/test_qwen3_vl_export.py`` runs the first transformers block as written."""
from __future__ import annotations

QUESTION = "What is in the picture?"

_WHAT = {
    "qwen3-vl-hf": "a dense transformers `Qwen3VLForConditionalGeneration` checkpoint: every quantized decoder linear "
                   "dequantized exactly from its integer codes and scales, then cast once to the folder's dtype",
    "compressed-tensors": "a compressed-tensors `pack-quantized` Qwen3-VL checkpoint (W4A16 or W8A16, transformers "
                          "tensor names) for vLLM, SGLang and transformers: the integer codes and scales repacked, not "
                          "requantized",
}


def _transformers(out: str, fmt: str) -> str:
    ct = ("\n\nWith compressed-tensors installed (`pip install compressed-tensors`) transformers decompresses the "
          "packed linears on the first forward. Loaded with `dtype=torch.float32` that gives gracevlm's logits (the "
          "codes times the stored scales); `CompressedTensorsConfig(dequantize=True)` decompresses at load, W4 as "
          "`fp16((u - 8) * s)` (one rounding); in bfloat16 the scales are rounded to bfloat16 first."
          if fmt == "compressed-tensors" else "")
    return f'''## transformers

Load it with `Qwen3VLForConditionalGeneration` (or `AutoModelForImageTextToText`).{ct} The image processor's PIL
backend reproduces gracevlm's preprocessing; `AutoProcessor` / `Qwen3VLProcessor` also builds a video processor,
which needs a working torchvision, so the form below uses the tokenizer and the image processor directly and
expands `<|image_pad|>` to the image's token count and marks the image positions (`mm_token_type_ids`, which
M-RoPE reads) as the processor does; its prompt ids are gracevlm's.
The folder's generation_config carries the Instruct sampling defaults: pass `do_sample=False` for greedy.

```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, Qwen3VLForConditionalGeneration

model = Qwen3VLForConditionalGeneration.from_pretrained("{out}", dtype=torch.float32)
tok = AutoTokenizer.from_pretrained("{out}")
improc = AutoImageProcessor.from_pretrained("{out}", backend="pil")
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "{QUESTION}"}}]}}]
text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
pixels = improc(images=[Image.open("photo.jpg")], return_tensors="pt")
n = int(pixels["image_grid_thw"][0].prod()) // improc.merge_size ** 2
inputs = tok(text.replace("<|image_pad|>", "<|image_pad|>" * n), return_tensors="pt")
inputs["mm_token_type_ids"] = (inputs["input_ids"] == model.config.image_token_id).long()  # image positions
out = model.generate(**inputs, **pixels, max_new_tokens=64, do_sample=False)
print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

Where torchvision works, the processor does all of it:

```python
import torch
from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

model = Qwen3VLForConditionalGeneration.from_pretrained("{out}", dtype=torch.float32)
proc = AutoProcessor.from_pretrained("{out}")
messages = [{{"role": "user", "content": [{{"type": "image", "image": "photo.jpg"}},
                                         {{"type": "text", "text": "{QUESTION}"}}]}}]
inputs = proc.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True,
                                  return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(proc.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```
'''


def _vllm(out: str, fmt: str, source: str) -> str:
    quant = ("The decoder linears run on vLLM's compressed-tensors WNA16 kernels (W4A16 or W8A16, group size as "
             "in config.json); those create `weight_scale` in the model dtype, so serving in bfloat16 rounds the "
             "stored scales to bfloat16 (`--dtype float16` keeps W4's fp16 scales exact). "
             if fmt == "compressed-tensors" else "")
    return f'''## vLLM (and SGLang)

vLLM serves the folder as `Qwen3VLForConditionalGeneration` (vLLM >= 0.11). {quant}Not run by gracevlm's tests
(no vLLM here); the names, shapes and config follow transformers' own Qwen3-VL save.

```bash
python -m vllm.entrypoints.openai.api_server --model {out} --max-model-len 4096 --port 8000
```

Greedy answers: `"temperature": 0` on `/v1/chat/completions` with the image as an `image_url` part (the chat path
renders the folder's template). `gracevlm export --model {source} --format {fmt} --out {out} --check vllm
--vllm-url http://127.0.0.1:8000` compares its greedy tokens with gracevlm.
'''


def card_sections(fmt: str, out: str, source: str) -> dict:
    return {"what": _WHAT[fmt], "usage": _transformers(out, fmt) + "\n" + _vllm(out, fmt, source)}
