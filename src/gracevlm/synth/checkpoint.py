"""Random-weight checkpoints in the exact GRACE on-disk layouts (for tests, demos and full-size benchmarks).

``synthesize(out_dir, preset, fmt)`` writes config.json (LLaVA-original), safetensors shards, the
AWQ module list or the QAT sidecar, a trained SentencePiece tokenizer and generation_config.json.
Weights are drawn so that every quantized linear is exactly ``q * s`` with codes in [-8, 7].
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import InputError
from ..formats.awq import pack_awq
from ..formats.checkpoint import AWQ_MODULES_NAME, ShardWriter, replace_folder, write_json_atomic
from ..formats.publish import discard_temp_folder, new_temp_folder
from ..formats.qat import SIDECAR_NAME
from ..models.llava.config import PROJECTOR_PREFIX, VISION_PREFIX
from ..models.loader import LLAMA_LINEARS as LINEAR_NAMES


@dataclass(frozen=True)
class Preset:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    tokenizer_vocab: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    max_positions: int


PRESETS = {
    "tiny": Preset(128, 256, 2, 4, 1024, 1000, 128, 256, 3, 2, 56, 14, 2048),
    "small": Preset(256, 768, 4, 4, 2048, 2000, 128, 512, 4, 2, 112, 14, 2048),
    "llava-1.5-7b": Preset(4096, 11008, 32, 32, 32000, 8000, 1024, 4096, 24, 16, 336, 14, 4096),
}
FORMATS = ("awq", "qat", "fp16")


def _linear_shapes(p: Preset) -> dict[str, tuple[int, int]]:
    h, m = p.hidden, p.intermediate
    return {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (m, h), "mlp.up_proj": (m, h), "mlp.down_proj": (h, m)}


def _config(p: Preset, fmt: str) -> dict:
    cfg = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        "hidden_size": p.hidden, "intermediate_size": p.intermediate, "num_hidden_layers": p.layers,
        "num_attention_heads": p.heads, "num_key_value_heads": p.heads, "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "max_position_embeddings": p.max_positions, "vocab_size": p.vocab,
        "rope_theta": 10000.0, "rope_scaling": None, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": p.vision_hidden,
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_projector_type": "mlp2x_gelu",
        "mm_patch_merge_type": "flat", "image_aspect_ratio": "pad", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "use_mm_proj": True, "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "mm_vision_config": {"hidden_size": p.vision_hidden, "intermediate_size": p.vision_intermediate,
                             "num_hidden_layers": p.vision_layers, "num_attention_heads": p.vision_heads,
                             "image_size": p.image_size, "patch_size": p.patch_size, "hidden_act": "quick_gelu",
                             "layer_norm_eps": 1e-5},
    }
    if fmt in ("awq", "qat"):
        cfg["qat"] = {"bits": 4, "group_size": 128, "learn_scales": True,
                      "skip_keywords": ["vision_tower", "mm_projector", "lm_head", "embed_tokens"],
                      "num_replaced": 7 * p.layers}
    if fmt == "awq":
        cfg["awq_packing"] = {"bits": 4, "group_size": 128, "zero_point": 8, "version": "gemm"}
    return cfg


def _vision_tensors(p: Preset, gen: torch.Generator):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    cfg = CLIPVisionConfig(hidden_size=p.vision_hidden, intermediate_size=p.vision_intermediate,
                           num_hidden_layers=p.vision_layers, num_attention_heads=p.vision_heads,
                           image_size=p.image_size, patch_size=p.patch_size, hidden_act="quick_gelu",
                           layer_norm_eps=1e-5)
    tower = CLIPVisionModel(cfg)
    for key, value in tower.state_dict().items():
        yield VISION_PREFIX + key, value.to(torch.float16)


def synthesize(out_dir: str | os.PathLike, preset: str = "tiny", fmt: str = "awq", seed: int = 0,
               force: bool = False, progress: bool = True, layers: int | None = None) -> Path:
    """Write a random-weight LLaVA-1.5 checkpoint; returns its folder. Atomic: a temporary folder is
    renamed into place only once complete. ``layers`` overrides the preset's layer count (a slice of
    the full model with the same shapes, for quick benchmarks)."""
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    from .corpus import default_corpus
    from ..models.tokenizer import train_tokenizer

    p = PRESETS[preset]
    if layers is not None:
        if layers < 1:
            raise InputError(f"layers must be >= 1, got {layers}")
        p = dataclasses.replace(p, layers=layers)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(f"{out} exists and is not empty; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_folder(out)  # stale ones from killed runs are removed first
    try:
        gen = torch.Generator().manual_seed(seed)
        train_tokenizer(tmp, default_corpus(), p.tokenizer_vocab)
        write_json_atomic(tmp / "config.json", _config(p, fmt))
        write_json_atomic(tmp / "generation_config.json", {
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "max_length": p.max_positions,
            "temperature": 0.9, "top_p": 0.6})
        writer = ShardWriter(tmp, max_shard_bytes=2 * 1024**3 if p.hidden >= 1024 else 64 * 1024**2)
        std = 0.02
        writer.add("model.embed_tokens.weight", (torch.randn(p.vocab, p.hidden, generator=gen) * std).half())
        sidecar, modules = {}, []
        shapes = _linear_shapes(p)
        for i in tqdm(range(p.layers), desc=f"synth {preset} ({fmt})", disable=not progress, unit="layer"):
            for lin in LINEAR_NAMES:
                name = f"model.layers.{i}.{lin}"
                out_f, in_f = shapes[lin]
                n_groups = in_f // 128
                # codes uniform in [-8, 7] (std ~4.6) and scales around std/4.6 give weights of std ~0.02
                scales = ((torch.rand(n_groups, out_f, generator=gen) + 0.5) * (std / 4.6)).half()
                if fmt == "awq":
                    words = torch.randint(-2**31, 2**31, (in_f, out_f // 8), dtype=torch.int64, generator=gen)
                    qweight = words.to(torch.int32)
                    _, qzeros = pack_awq(torch.zeros(n_groups, 8, dtype=torch.uint8),
                                         torch.full((n_groups, 8), 8, dtype=torch.uint8))
                    writer.add(f"{name}.qweight", qweight)
                    writer.add(f"{name}.qzeros", qzeros.repeat(1, out_f // 8))
                    writer.add(f"{name}.scales", scales)
                    modules.append(name)
                else:
                    q = torch.randint(-8, 8, (out_f, in_f), generator=gen, dtype=torch.int8)
                    s32 = scales.float().t().contiguous()  # [O, I/g], exactly representable in fp16
                    w = q.float() * s32.repeat_interleave(128, dim=1)
                    if fmt == "qat":
                        wq = w.to(torch.bfloat16)
                        writer.add(f"{name}.weight", wq)
                        sidecar[f"{name}.weight"] = wq
                        sidecar[f"{name}.log_scale"] = torch.log(s32).reshape(-1)
                    else:
                        writer.add(f"{name}.weight", w.half())
            for norm in ("input_layernorm", "post_attention_layernorm"):
                writer.add(f"model.layers.{i}.{norm}.weight",
                           (1.0 + 0.1 * torch.randn(p.hidden, generator=gen)).half())
        writer.add("model.norm.weight", (1.0 + 0.1 * torch.randn(p.hidden, generator=gen)).half())
        writer.add("lm_head.weight", (torch.randn(p.vocab, p.hidden, generator=gen) * std).half())
        writer.add(f"{PROJECTOR_PREFIX}0.weight",
                   (torch.randn(p.hidden, p.vision_hidden, generator=gen) / math.sqrt(p.vision_hidden)).half())
        writer.add(f"{PROJECTOR_PREFIX}0.bias", (0.01 * torch.randn(p.hidden, generator=gen)).half())
        writer.add(f"{PROJECTOR_PREFIX}2.weight",
                   (torch.randn(p.hidden, p.hidden, generator=gen) / math.sqrt(p.hidden)).half())
        writer.add(f"{PROJECTOR_PREFIX}2.bias", (0.01 * torch.randn(p.hidden, generator=gen)).half())
        for key, value in _vision_tensors(p, gen):
            writer.add(key, value)
        writer.close()
        if fmt == "awq":
            write_json_atomic(tmp / AWQ_MODULES_NAME, {"bits": 4, "group_size": 128, "modules": sorted(modules)})
        elif fmt == "qat":
            torch.save(sidecar, tmp / SIDECAR_NAME)
        replace_folder(tmp, out)
    except BaseException:
        discard_temp_folder(tmp)
        raise
    return out
