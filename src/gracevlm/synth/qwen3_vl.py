"""Random-weight Qwen3-VL checkpoints in the real folder layout (spec: shared/reference/qwen3-vl.md sections 1-4).

``synthesize_qwen3_vl(out_dir, preset, fmt)`` writes config.json (transformers ``Qwen3VLConfig``),
generation_config.json (eos list), model.safetensors (shards for big presets; transformers key names, tied ``lm_head``
omitted), a trained byte-level BPE tokenizer.json with the Qwen special tokens + tokenizer_config.json (with a
Qwen3-VL style chat template), chat_template.jinja and preprocessor_config.json. ``fmt``: ``bf16`` (dense), ``qat``
(GRACE QAT W4G128, or W8G128 with ``bits=8`` or ``fmt="qat8"``: the decoder linears baked as ``bf16(q * s)``,
``s = exp(log_scale)``, plus ``qat_quantized_weights.bin``) or ``awq`` (GRACE AWQ W4G128: those linears packed
exactly as ``gracevlm pack`` packs the QAT form).
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import InputError
from ..formats.checkpoint import AWQ_MODULES_NAME, ShardWriter, replace_folder, write_json_atomic
from ..formats.qat import SIDECAR_NAME, qat_to_awq

SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
# The Qwen3-VL Instruct layout (spec section 5): no default system prompt, parts in order, image parts ->
# vision_start/image_pad/vision_end, a system message's text parts concatenated.
CHAT_TEMPLATE = """{%- for message in messages -%}
<|im_start|>{{ message['role'] }}
{% if message['content'] is string -%}
{{ message['content'] }}
{%- else -%}
{%- for part in message['content'] -%}
{%- if message['role'] != 'system' and (part['type'] == 'image' or 'image' in part or 'image_url' in part) -%}
<|vision_start|><|image_pad|><|vision_end|>
{%- elif 'text' in part -%}
{{ part['text'] }}
{%- endif -%}
{%- endfor -%}
{%- endif %}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% endif -%}
"""
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
GROUP = 128
FORMATS = ("bf16", "qat", "qat8", "awq")


@dataclass(frozen=True)
class QwenPreset:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tokenizer_vocab: int
    mrope_section: tuple[int, int, int]
    rope_theta: float
    max_positions: int
    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    position_grid: int
    deepstack: tuple[int, ...]
    min_pixels: int
    max_pixels: int


QWEN_PRESETS = {
    "qwen3-vl-tiny": QwenPreset(128, 256, 2, 4, 2, 32, 1024, 900, (6, 5, 5), 5_000_000.0, 4096, 2, 64, 128, 2, 8,
                                (0, 1), 64 * 64, 256 * 256),
    # Qwen3-VL-2B-Instruct's shapes (config.json of the release); a small trained tokenizer, padded vocab rows
    "qwen3-vl-2b": QwenPreset(2048, 6144, 28, 16, 8, 128, 151936, 8000, (24, 20, 20), 5_000_000.0, 262144, 24, 1024,
                              4096, 16, 48, (5, 11, 17), 65536, 16777216),
}


def _train_tokenizer(folder: Path, vocab: int) -> dict[str, int]:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from .corpus import default_corpus

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(default_corpus(), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.save(str(folder / "tokenizer.json"))
    write_json_atomic(folder / "tokenizer_config.json", {
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "add_bos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 262144, "chat_template": CHAT_TEMPLATE})
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return {t: tok.token_to_id(t) for t in SPECIALS}


def qwen3_vl_config(p: QwenPreset, ids: dict[str, int], fmt: str, bits: int = 4) -> dict:
    """config.json of a transformers ``Qwen3VLForConditionalGeneration`` (+ GRACE ``qat`` / ``awq_packing``)."""
    text = {"model_type": "qwen3_vl_text", "vocab_size": p.vocab, "hidden_size": p.hidden,
            "intermediate_size": p.intermediate, "num_hidden_layers": p.layers, "num_attention_heads": p.heads,
            "num_key_value_heads": p.kv_heads, "head_dim": p.head_dim, "hidden_act": "silu", "rms_norm_eps": 1e-6,
            "max_position_embeddings": p.max_positions, "attention_bias": False, "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": p.rope_theta,
                                "mrope_section": list(p.mrope_section), "mrope_interleaved": True},
            "dtype": "bfloat16"}
    vision = {"model_type": "qwen3_vl", "depth": p.vision_depth, "hidden_size": p.vision_hidden,
              "intermediate_size": p.vision_intermediate, "num_heads": p.vision_heads, "in_channels": 3,
              "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": p.hidden,
              "num_position_embeddings": p.position_grid ** 2, "deepstack_visual_indexes": list(p.deepstack),
              "hidden_act": "gelu_pytorch_tanh"}
    cfg = {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", "text_config": text,
           "vision_config": vision, "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
           "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
           "tie_word_embeddings": True, "dtype": "bfloat16"}
    if fmt in ("qat", "awq"):
        cfg["qat"] = {"bits": bits, "group_size": GROUP, "skip_keywords": ["visual", "merger", "lm_head", "embed_tokens"],
                      "num_replaced": 7 * p.layers}
    if fmt == "awq":
        cfg["awq_packing"] = {"bits": 4, "group_size": GROUP, "zero_point": 8, "version": "gemm"}
    return cfg


def _random(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if name.endswith("bias"):
        return 0.01 * torch.randn(shape, generator=gen)
    if "norm" in name:
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if "embed_tokens" in name or "pos_embed" in name:
        return 0.02 * torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen) / math.sqrt(shape[-1])


def _w8_layer(out_f: int, in_f: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A GRACE QAT W8G128 linear: codes uniform in [-128, 127] (std ~74), ``s = exp(log_scale)`` giving weights of
    std ~1/sqrt(in), baked ``W_q = bf16(q * s)`` (fp32 product). bf16 keeps 8 significant bits, so
    ``round(W_q / s)`` recovers every code (error <= 128 * 2^-9 = 0.25 of a code)."""
    log_scale = torch.log((torch.rand(out_f * (in_f // GROUP), generator=gen) + 0.5) / (74.0 * math.sqrt(in_f)))
    s = torch.exp(log_scale).view(out_f, in_f // GROUP)
    q = torch.randint(-128, 128, (out_f, in_f), generator=gen).float()
    return (q * s.repeat_interleave(GROUP, dim=1)).to(torch.bfloat16), log_scale


def synthesize_qwen3_vl(out_dir: str | os.PathLike, preset: str = "qwen3-vl-tiny", fmt: str = "awq", seed: int = 0,
                        force: bool = False, progress: bool = True, layers: int | None = None, bits: int = 4) -> Path:
    """Write a random-weight Qwen3-VL checkpoint (atomic: a temporary folder renamed into place); returns it.
    ``bits``: 4, or 8 for a W8 QAT folder (``fmt="qat"`` only: GRACE AWQ is 4-bit)."""
    from ..models.qwen3_vl.config import Qwen3VLConfig
    from ..models.qwen3_vl.model import Qwen3VLModel
    from ..models.qwen3_vl.weights import ours_to_hf

    if preset not in QWEN_PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose one of {sorted(QWEN_PRESETS)}")
    if fmt == "qat8":  # the CLI's name for W8 QAT
        fmt, bits = "qat", 8
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r} for Qwen3-VL; choose one of {FORMATS}")
    if bits not in (4, 8) or (bits == 8 and fmt != "qat"):
        raise InputError(f"bits={bits} with format {fmt!r}: Qwen3-VL synth writes W4 (qat, awq) or W8 (qat only)")
    p = QWEN_PRESETS[preset]
    if layers is not None:
        if layers < 1:
            raise InputError(f"layers must be >= 1, got {layers}")
        p = dataclasses.replace(p, layers=layers)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(f"{out} exists and is not empty; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        gen = torch.Generator().manual_seed(seed)
        ids = _train_tokenizer(tmp, p.tokenizer_vocab)
        cfg = qwen3_vl_config(p, ids, fmt, bits)
        write_json_atomic(tmp / "config.json", cfg)
        write_json_atomic(tmp / "generation_config.json", {
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"],
            "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20})
        write_json_atomic(tmp / "preprocessor_config.json", {
            "image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "do_rescale": True,
            "do_normalize": True, "do_convert_rgb": True, "resample": 3, "rescale_factor": 1 / 255,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "patch_size": 16,
            "temporal_patch_size": 2, "merge_size": 2,
            "size": {"shortest_edge": p.min_pixels, "longest_edge": p.max_pixels}})
        config = Qwen3VLConfig.from_dict(cfg)
        with torch.device("meta"):
            shapes = {n: tuple(t.shape) for n, t in Qwen3VLModel(config).named_parameters()}
        writer = ShardWriter(tmp, max_shard_bytes=2 * 1024**3 if p.hidden >= 1024 else 64 * 1024**2)
        sidecar, modules = {}, []
        for name, shape in tqdm(shapes.items(), desc=f"synth {preset} ({fmt} W{bits})", disable=not progress, unit="tensor"):
            key = ours_to_hf(name, config)
            module, _, leaf = key.rpartition(".")
            if fmt != "bf16" and leaf == "weight" and module.startswith("model.language_model.layers.") and \
                    module.endswith(LINEARS):
                out_f, in_f = shape
                if bits == 8:
                    wq, log_scale = _w8_layer(out_f, in_f, gen)
                    writer.add(key, wq)
                    sidecar[f"{module}.weight"], sidecar[f"{module}.log_scale"] = wq, log_scale
                    modules.append(module)
                    continue
                # codes uniform in [-8, 7] (std ~4.6); fp16 scales give weights of std ~1/sqrt(in)
                s = ((torch.rand(out_f, in_f // GROUP, generator=gen) + 0.5) / (4.6 * math.sqrt(in_f))).half().float()
                q = torch.randint(-8, 8, (out_f, in_f), generator=gen).float()
                wq = (q * s.repeat_interleave(GROUP, dim=1)).to(torch.bfloat16)
                log_scale = torch.log(s).reshape(-1)
                if fmt == "qat":
                    writer.add(key, wq)
                    sidecar[f"{module}.weight"], sidecar[f"{module}.log_scale"] = wq, log_scale
                else:
                    packed = qat_to_awq(wq, log_scale, group_size=GROUP, name=module)
                    for suffix in ("qweight", "qzeros", "scales"):
                        writer.add(f"{module}.{suffix}", getattr(packed, suffix))
                modules.append(module)
                continue
            tensor = _random(name, shape, gen)
            if name == "visual.patch_embed.weight":
                tensor = tensor.reshape(shape[0], 3, 2, 16, 16)
            writer.add(key, tensor.to(torch.bfloat16))
        writer.close()
        if fmt == "awq":
            write_json_atomic(tmp / AWQ_MODULES_NAME, {"bits": 4, "group_size": GROUP, "modules": sorted(modules)})
        elif fmt in ("qat", "qat8"):
            torch.save(sidecar, tmp / SIDECAR_NAME)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
