"""Open and build a Qwen3-VL checkpoint: dense (any float dtype, GRACE BF16), GRACE QAT W4/W8 (codes recovered
exactly from the baked weights with the sidecar's log-scales, refused unless exact), GRACE AWQ W4 and
compressed-tensors W4A16/W8A16 ``pack-quantized`` (what ``gracevlm export --format compressed-tensors`` writes).

The store keeps the transformers key names (``model.visual.*``, ``model.language_model.*``, ``lm_head.weight``);
``weights.hf_to_ours`` maps them onto ``Qwen3VLModel``. Quantized linears (the 7 decoder linears of every
layer, module names as the sidecar / ``awq_quantized_modules.json`` list them) become ``Int4Linear``. A tied
``lm_head`` computes with ``embed_tokens`` (one copy in memory; a stored duplicate is not read). As for LLaVA
(``kernels.keep_half_head``), an fp32 model on the CPU keeps a bf16/fp16 embedding table and head as stored and
reads them through ``HalfLinear`` (exact fp32 results, half the bytes per decoded token).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ... import kernels
from ...errors import CheckpointError
from ...formats.checkpoint import TensorStore, is_ignored_key
from ...nn import HalfLinear
from ...formats.mapped import mapped_view
from ..checkpoint import OpenedCheckpoint, QuantizedLinears, grace_quantized
from ..llama import prepare_int4_kernels
from ..loader import (LoadedModel, LoadOptions, LoadStats, assign, install_linears, language_bytes, module_nbytes,
                      quantized_linears)
from .config import Qwen3VLConfig
from .model import Qwen3VLModel
from .rope import MRotary
from .tokenizer import QwenTokenizer, stop_token_ids
from .vision import rope_inv_freq
from .weights import hf_to_ours

DECODER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LM_HEAD = "language_model.lm_head.weight"
EMBED = "language_model.embed_tokens.weight"


def int8_available() -> bool:
    """Whether this tree has ``gracevlm.nn.Int8Linear`` (the W8 QAT path's layer)."""
    from ... import nn as gnn

    return hasattr(gnn, "Int8Linear")


def open_qwen3_vl(family, folder: Path, fmt: str, raw: dict) -> OpenedCheckpoint:
    """A Qwen3-VL folder as the family reads it; foreign quantized layouts and W8 are refused by name."""
    source = folder / "config.json"
    cfg = Qwen3VLConfig.from_dict(raw, str(source))
    if fmt == "awq":
        raise CheckpointError(f"{source}: quantization_config 'awq' is not supported for Qwen3-VL; gracevlm reads "
                              "dense, GRACE QAT (qat_quantized_weights.bin), GRACE AWQ and compressed-tensors "
                              "W4A16/W8A16 pack-quantized Qwen3-VL folders")
    store = TensorStore(folder)
    if fmt == "compressed-tensors":  # e.g. gracevlm's own export: W4 as AWQ triples, W8 as stored
        qc = raw.get("quantization_config") if isinstance(raw.get("quantization_config"), dict) else {}
        store, modules, group, symmetric = mapped_view(store, lambda k: k, fmt, qc, str(source), ct_bits=(4, 8))
        quantized = QuantizedLinears(fmt, store.bits, group, modules, symmetric)
    else:
        quantized = grace_quantized(folder, fmt, raw)
    if fmt == "grace-qat":
        if cfg.qat is None:
            raise CheckpointError(f"{source}: a QAT sidecar is present but config.json has no 'qat' block "
                                  "(bits, group_size)")
        if cfg.qat.bits == 8 and not int8_available():
            raise CheckpointError(f"{folder}: a W8 QAT checkpoint (qat.bits = 8) needs gracevlm.nn.Int8Linear, "
                                  "which this version does not have yet; W4 QAT, GRACE AWQ and dense Qwen3-VL load")
        if cfg.qat.bits not in (4, 8):
            raise CheckpointError(f"{source}: qat.bits = {cfg.qat.bits}; GRACE Qwen3-VL QAT checkpoints are W4 or W8")
    if fmt == "grace-awq" and cfg.awq_packing is not None and cfg.awq_packing.group_size != quantized.group_size:
        raise CheckpointError(f"{folder}: awq_quantized_modules.json says group_size {quantized.group_size} but "
                              f"config.json awq_packing says {cfg.awq_packing.group_size}")
    for name in quantized.names:
        ours = hf_to_ours(name + ".weight")
        if ours is None or not ours.startswith("language_model.layers.") or \
                not ours.endswith(tuple(f"{lin}.weight" for lin in DECODER_LINEARS)):
            raise CheckpointError(f"{folder}: quantized module {name!r} is not a Qwen3 decoder linear "
                                  "(model.language_model.layers.N.self_attn/mlp.*_proj)")
    name = "qwen3-vl" if fmt == "fp16" else fmt
    return OpenedCheckpoint(folder, name, family, cfg, raw, store, quantized, "transformers",
                            raw.get("quantization_config") if fmt == "compressed-tensors" else None)


def _key_map(store, tied: bool) -> dict[str, str]:
    """Our parameter name -> checkpoint key, for every tensor the checkpoint stores."""
    out: dict[str, str] = {}
    for key in store.keys():
        if is_ignored_key(key):
            continue
        ours = hf_to_ours(key)
        if ours is None:
            continue
        if ours.endswith((".qweight", ".qzeros", ".scales")):
            continue
        if ours == LM_HEAD and tied:
            continue  # a stored duplicate of the tied matrix: embed_tokens is the one copy
        if ours in out:
            raise CheckpointError(f"{store.folder}: two checkpoint keys map to {ours} ({out[ours]} and {key})")
        out[ours] = key
    return out


def build_qwen3_vl(opened: OpenedCheckpoint, options: LoadOptions) -> LoadedModel:
    cfg: Qwen3VLConfig = opened.config
    folder, store = opened.folder, opened.store
    tokenizer = QwenTokenizer.from_folder(folder)
    tokenizer.stop_ids = stop_token_ids(folder, tokenizer)
    with torch.device("meta"):
        model = Qwen3VLModel(cfg)
    lm = model.language_model
    hf_names = [f"model.language_model.layers.{i}.{lin}" for i in range(cfg.text.num_hidden_layers)
                for lin in DECODER_LINEARS]
    packed = quantized_linears(opened, options, hf_names)
    ours_linears = {hf_to_ours(n + ".weight")[:-len(".weight")]: m for n, m in packed.items()}
    install_linears(model, ours_linears, f"a Qwen3-VL with {cfg.text.num_hidden_layers} decoder layers")
    keys = _key_map(store, cfg.tie_word_embeddings)
    vision_dtype = options.vision_dtype or options.dtype
    used = set()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not tensor.is_meta or name in ("visual.inv_freq",) or name.startswith("language_model.rotary."):
            continue
        if name == LM_HEAD and cfg.tie_word_embeddings:
            continue
        key = keys.get(name)
        if key is None:
            hint = " (an untied lm_head needs lm_head.weight)" if name == LM_HEAD else ""
            raise CheckpointError(f"{folder}: tensor for {name!r} is missing from the checkpoint{hint}")
        src = store.get(key)
        used.add(key)
        half = options.half_lm_head and kernels.keep_half_head(src, options.dtype)
        if name == LM_HEAD and half:
            lm.lm_head = HalfLinear(src)
            continue
        if name == EMBED and half:  # kept as stored: embed() converts rows exactly, a tied head reads it half
            assign(model, name, src)
            continue
        if name == "visual.patch_embed.weight":
            src = src.reshape(src.shape[0], -1)
        assign(model, name, src.to(vision_dtype if name.startswith("visual.") else options.dtype))
    replaced = tuple(f"{m}." for m in ours_linears)  # their dense (baked) weights are not read
    extra = sorted(k for o, k in keys.items() if k not in used and not o.startswith(replaced))
    if extra:
        raise CheckpointError(f"{folder}: checkpoint tensor {extra[0]} has no place in this Qwen3-VL model "
                              f"({len(extra)} such)")
    model.visual.inv_freq = rope_inv_freq(cfg.vision)
    spec = lm.spec
    lm.rotary = MRotary(spec.head_dim, spec.rope_theta, spec.mrope_section)
    if cfg.tie_word_embeddings:
        embed = lm.embed_tokens.weight
        if embed.dtype != options.dtype:  # half table: the head is a HalfLinear over the very same parameter
            lm.lm_head = HalfLinear(embed)
            lm.lm_head.weight = embed
        else:
            lm.tie_lm_head()
    if options.fuse:
        lm.fuse_projections()
    prepare_int4_kernels(lm, release_awq=not options.keep_awq)
    model.eval()
    stats = LoadStats(opened.format)
    stats.bytes_by_part = {**language_bytes(lm), "vision_tower": module_nbytes(model.visual)}  # tied: once
    return LoadedModel(model, tokenizer, cfg, folder, stats)
