"""Key, config and packing maps between the LLaVA-original GRACE layout and the transformers ("llava-hf")
layouts: dense, standard AutoAWQ GEMM, and compressed-tensors ``pack-quantized``.

Pure tensor + file code. The one entry point the loader needs is ``open_mapped(folder)``: it presents
any supported foreign checkpoint as LLaVA-original key names plus AWQ triples, so the loader and the
exporters keep a single view of a model.

Key names (reference/formats.md (c)):

=================================================  ==============================================
LLaVA-original (GRACE)                              llava-hf on disk (what we write)
=================================================  ==============================================
``model.embed_tokens.* / model.layers.* /           ``language_model.model.<rest>``
model.norm.*``
``lm_head.weight``                                  ``language_model.lm_head.weight``
``model.mm_projector.0.* / .2.*``                   ``multi_modal_projector.linear_1.* / linear_2.*``
``model.vision_tower.vision_tower.vision_model.x``  ``vision_tower.vision_model.x``
=================================================  ==============================================

We write the classic llava-hf names (those of ``llava-hf/llava-1.5-7b-hf``): SGLang's
``LlavaForConditionalGeneration.load_weights`` strips a leading ``language_model.``/``vision_tower.``
and looks everything else up verbatim, so transformers-5 in-memory names (``model.language_model.*``)
would not load there; transformers 5 and vLLM accept both spellings. On reading, all three spellings
are accepted (classic, transformers-5 in-memory ``model.language_model.*``/``model.vision_tower.*``/
``model.multi_modal_projector.*``/``lm_head.*``, and the flattened tower ``vision_tower.<x>``).

compressed-tensors ``pack-quantized`` (formats.md (f)): ``weight_packed`` int32 ``[O, I/8]`` holds
``u = q + 8`` as sequential nibbles along the input dim (element ``i`` in word ``i // 8`` at bits
``4 * (i % 8)``), ``weight_scale [O, I/g]``, ``weight_shape = [O, I]``, and for asymmetric layers
``weight_zero_point`` int32 ``[O/8, I/g]`` = the signed zero point ``z - 8`` packed the same way
along the *output* dim. Dequant ``W = (q - zp) * s = (u - z) * s``: exactly the AWQ triple.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...errors import CheckpointError, FormatError
from ...formats.awq import pack_awq
from ...formats.checkpoint import PROJECTOR_PREFIX, VISION_PREFIX, LlavaConfig, TensorStore, read_json_object

AWQ_SUFFIXES = ("qweight", "qzeros", "scales")
CT_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
PREPROCESSOR_NAME = "preprocessor_config.json"

# -------------------------------------------------------------------------------------------------
# key names


def original_to_hf(key: str) -> str:
    """LLaVA-original key -> classic llava-hf on-disk key (raises FormatError for keys with no place)."""
    if key.startswith(VISION_PREFIX):
        return "vision_tower.vision_model." + key[len(VISION_PREFIX):]
    if key.startswith(PROJECTOR_PREFIX):
        idx, _, rest = key[len(PROJECTOR_PREFIX):].partition(".")
        linear = {"0": "linear_1", "2": "linear_2"}.get(idx)
        if linear is None:
            raise FormatError(f"{key}: only the mlp2x_gelu projector (indices 0 and 2) maps to llava-hf")
        return f"multi_modal_projector.{linear}.{rest}"
    if key.startswith("lm_head."):
        return "language_model." + key
    if key.startswith("model."):
        return "language_model." + key
    raise FormatError(f"{key}: no llava-hf name for this LLaVA-original key")


def hf_to_original(key: str) -> str | None:
    """Any llava-hf spelling -> LLaVA-original key; None for keys the LLaVA-1.5 model does not use."""
    for prefix, new in (("language_model.model.", "model."), ("model.language_model.", "model."),
                        ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head.")):
        if key.startswith(prefix):
            return new + key[len(prefix):]
    for prefix in ("multi_modal_projector.", "model.multi_modal_projector."):
        if key.startswith(prefix):
            linear, _, rest = key[len(prefix):].partition(".")
            idx = {"linear_1": "0", "linear_2": "2"}.get(linear)
            return None if idx is None else f"{PROJECTOR_PREFIX}{idx}.{rest}"
    for prefix in ("vision_tower.", "model.vision_tower."):
        if key.startswith(prefix):
            rest = key[len(prefix):]
            if rest.startswith("vision_model."):
                rest = rest[len("vision_model."):]
            return VISION_PREFIX + rest
    return None


# -------------------------------------------------------------------------------------------------
# configs


def is_llava_hf_config(d: dict) -> bool:
    return isinstance(d, dict) and isinstance(d.get("text_config"), dict) and "hidden_size" not in d


VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
               "patch_size", "hidden_act", "layer_norm_eps", "num_channels")
CLIP_L336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
              "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
              "num_channels": 3}


def vision_config_from_tensors(keys: list[str], shape) -> dict:
    """CLIP vision config implied by bundled tower tensors (``shape(key)`` gives a tensor's shape).
    Heads are not stored in the weights: head size 64 is assumed (true for every CLIP ViT)."""
    patch = shape(VISION_PREFIX + "embeddings.patch_embedding.weight")
    pos = shape(VISION_PREFIX + "embeddings.position_embedding.weight")
    fc1 = shape(VISION_PREFIX + "encoder.layers.0.mlp.fc1.weight")
    n_layers = 1 + max(int(k[len(VISION_PREFIX):].split(".")[2]) for k in keys
                       if k.startswith(VISION_PREFIX + "encoder.layers."))
    hidden, patch_size = patch[0], patch[2]
    side = round((pos[0] - 1) ** 0.5)
    return {"hidden_size": hidden, "intermediate_size": fc1[0], "num_hidden_layers": n_layers,
            "num_attention_heads": max(1, hidden // 64), "image_size": side * patch_size, "patch_size": patch_size,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "num_channels": patch[1]}


def vision_config_dict(cfg: LlavaConfig, keys: list[str], shape) -> dict:
    """The CLIP vision config of a LLaVA checkpoint: explicit (``mm_vision_config`` / llava-hf
    ``vision_config``) when present, else derived from the bundled tensors."""
    if cfg.vision_config:
        out = dict(CLIP_L336)
        out.update({k: cfg.vision_config[k] for k in VISION_KEYS if k in cfg.vision_config})
        return out
    return vision_config_from_tensors(keys, shape)


def llava_config_from_hf(d: dict, preprocessor: dict | None = None, source: str = "config.json") -> LlavaConfig:
    """A llava-hf ``LlavaConfig`` dict -> our LLaVA-original ``LlavaConfig``.

    ``image_aspect_ratio`` follows the checkpoint's own processing: a top-level ``image_aspect_ratio``
    (our exports write ``"pad"``), else ``do_pad`` in ``preprocessor_config.json`` (``LlavaImageProcessor``),
    else ``"square"`` (what ``CLIPImageProcessor`` does with e.g. llava-hf/llava-1.5-7b-hf).
    """
    text = d.get("text_config") or {}
    if text.get("model_type", "llama") not in ("llama", None):
        raise CheckpointError(f"{source}: text_config.model_type {text.get('model_type')!r} is not supported "
                              "(LLaVA-1.5 uses a LLaMA language model)")
    vision = d.get("vision_config") or {}
    if vision.get("model_type", "clip_vision_model") not in ("clip_vision_model", None):
        raise CheckpointError(f"{source}: vision_config.model_type {vision.get('model_type')!r} is not supported "
                              "(LLaVA-1.5 uses a CLIP vision tower)")
    act = d.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"{source}: projector_hidden_act {act!r} is not supported (LLaVA-1.5 uses gelu)")
    layer = d.get("vision_feature_layer", -2)
    if isinstance(layer, list):
        raise CheckpointError(f"{source}: several vision_feature_layer values ({layer}) are not supported")
    strategy = d.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise CheckpointError(f"{source}: vision_feature_select_strategy {strategy!r} is not supported")
    aspect = d.get("image_aspect_ratio")
    if aspect is None:
        aspect = "pad" if (preprocessor or {}).get("do_pad") else "square"
    rope = text.get("rope_parameters") or {}
    scaling = text.get("rope_scaling")
    if rope and rope.get("rope_type", "default") not in ("default", None):
        scaling = {"type": rope["rope_type"], "factor": rope.get("factor", 1.0)}
    flat = {
        "hidden_size": text.get("hidden_size", 4096), "intermediate_size": text.get("intermediate_size", 11008),
        "num_hidden_layers": text.get("num_hidden_layers", 32),
        "num_attention_heads": text.get("num_attention_heads", 32),
        "num_key_value_heads": text.get("num_key_value_heads") or text.get("num_attention_heads", 32),
        "vocab_size": text.get("vocab_size", 32000), "rms_norm_eps": text.get("rms_norm_eps", 1e-6),
        "max_position_embeddings": text.get("max_position_embeddings", 4096),
        "rope_theta": rope.get("rope_theta", text.get("rope_theta", 10000.0)), "rope_scaling": scaling,
        "bos_token_id": text.get("bos_token_id", 1), "eos_token_id": text.get("eos_token_id", 2),
        "pad_token_id": text.get("pad_token_id"), "tie_word_embeddings": d.get("tie_word_embeddings", False),
        "mm_vision_tower": d.get("mm_vision_tower"), "mm_hidden_size": vision.get("hidden_size", 1024),
        "mm_vision_select_layer": layer, "mm_vision_select_feature": "patch" if strategy == "default" else "cls_patch",
        "mm_projector_type": "mlp2x_gelu", "image_aspect_ratio": aspect,
        "tokenizer_model_max_length": d.get("tokenizer_model_max_length", 2048), "conv_mode": d.get("conv_mode"),
        "mm_vision_config": {k: vision[k] for k in VISION_KEYS if k in vision} or dict(CLIP_L336),
    }
    return LlavaConfig.from_dict(flat, source)


def llava_hf_config(cfg: LlavaConfig, vision: dict, vocab_rows: int, image_token_index: int,
                    dtype: str = "float16", quantization_config: dict | None = None) -> dict:
    """config.json of a ``LlavaForConditionalGeneration`` with the given LLaMA/CLIP shapes.

    Written by hand (not by ``LlavaConfig.to_dict``) so it also parses with transformers 4.x, which vLLM
    and SGLang pin: legacy ``rope_theta``/``rope_scaling`` and ``torch_dtype`` next to their v5 forms.
    The LLaVA-original fields that llava-hf has no place for (``image_aspect_ratio``, ``mm_patch_merge_type``,
    ``tokenizer_model_max_length``, ``conv_mode``) ride along at the top level: transformers keeps unknown
    keys, SGLang reads ``image_aspect_ratio``/``mm_patch_merge_type`` (it assumes ``anyres`` when absent),
    and ``llava_config_from_hf`` reads them back.
    """
    if cfg.mm_projector_type != "mlp2x_gelu":
        raise FormatError(f"mm_projector_type {cfg.mm_projector_type!r} has no llava-hf equivalent "
                          "(LlavaMultiModalProjector is Linear-GELU-Linear = mlp2x_gelu)")
    side = vision["image_size"] // vision["patch_size"]
    text = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": vocab_rows, "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling or None,
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "torch_dtype": dtype, "dtype": dtype,
    }
    vis = {"model_type": "clip_vision_model", "projection_dim": 768, "attention_dropout": 0.0, "dropout": 0.0,
           "torch_dtype": dtype, "dtype": dtype}
    vis.update({k: vision[k] for k in VISION_KEYS if k in vision})
    out = {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "text_config": text, "vision_config": vis,
        "image_token_index": image_token_index, "image_seq_length": side * side,
        "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
        "vision_feature_layer": cfg.mm_vision_select_layer,
        "vision_feature_select_strategy": "default" if cfg.mm_vision_select_feature == "patch" else "full",
        "tie_word_embeddings": False, "vocab_size": vocab_rows, "pad_token_id": cfg.pad_token_id,
        "torch_dtype": dtype, "dtype": dtype,
        # LLaVA-original semantics carried along (see docstring)
        "image_aspect_ratio": cfg.image_aspect_ratio, "mm_patch_merge_type": "flat",
        "tokenizer_model_max_length": cfg.tokenizer_model_max_length,
    }
    if cfg.conv_mode:
        out["conv_mode"] = cfg.conv_mode
    if quantization_config is not None:
        out["quantization_config"] = quantization_config
    return out


# -------------------------------------------------------------------------------------------------
# compressed-tensors pack-quantized

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int64)


def pack_sequential(u: torch.Tensor) -> torch.Tensor:
    """uint8 ``[R, C]`` values 0..15 -> int32 ``[R, ceil(C/8)]``, element ``c`` at word ``c // 8``, bits
    ``4 * (c % 8)`` (compressed-tensors ``pack_to_int32`` order; a short last word is zero-padded)."""
    rows, cols = u.shape
    pad = (-cols) % 8
    v = u.to(torch.int64)
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    words = (v.view(rows, -1, 8) << _SHIFTS).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_sequential(words: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of ``pack_sequential``: int32 ``[R, W]`` -> uint8 ``[R, cols]``."""
    nib = (words.to(torch.int64).unsqueeze(-1) >> _SHIFTS) & 0xF
    return nib.reshape(words.shape[0], -1)[:, :cols].to(torch.uint8)


@dataclass
class CtTensors:
    weight_packed: torch.Tensor
    weight_scale: torch.Tensor
    weight_shape: torch.Tensor
    weight_zero_point: torch.Tensor | None = None


def codes_to_ct(u: torch.Tensor, zeros: torch.Tensor | None, scales: torch.Tensor) -> CtTensors:
    """Codes ``u [O, I]`` (0..15), zero points ``zeros [O, I/g]`` (None = symmetric, all 8) and scales
    ``[O, I/g]`` -> compressed-tensors tensors. Exact: nibbles are ``u``, scales are copied."""
    out_f, in_f = u.shape
    zp = None
    if zeros is not None:
        zp = pack_sequential(zeros.t().contiguous()).t().contiguous()  # packed along the output dim
    return CtTensors(pack_sequential(u), scales.contiguous(), torch.tensor([out_f, in_f], dtype=torch.int64), zp)


def ct_to_awq(weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_shape: torch.Tensor | None,
              weight_zero_point: torch.Tensor | None, group_size: int, name: str = "layer"):
    """compressed-tensors pack-quantized tensors -> AWQ GEMM ``(qweight, qzeros, scales)`` (exact)."""
    if weight_packed.dtype != torch.int32 or weight_packed.dim() != 2:
        raise FormatError(f"{name}.weight_packed must be a 2-D int32 tensor, got {weight_packed.dtype} "
                          f"{tuple(weight_packed.shape)}")
    out_f = weight_packed.shape[0]
    in_f = int(weight_shape[1]) if weight_shape is not None else weight_packed.shape[1] * 8
    if weight_shape is not None and int(weight_shape[0]) != out_f:
        raise FormatError(f"{name}.weight_shape {weight_shape.tolist()} does not match weight_packed rows {out_f}")
    if in_f % group_size or tuple(weight_scale.shape) != (out_f, in_f // group_size):
        raise FormatError(f"{name}.weight_scale has shape {tuple(weight_scale.shape)}, expected "
                          f"{(out_f, in_f // group_size)} for [{out_f}, {in_f}] and group_size {group_size}")
    if out_f % 8:
        raise FormatError(f"{name}: out_features {out_f} is not a multiple of 8; AWQ GEMM cannot hold it")
    u = unpack_sequential(weight_packed, in_f)  # [O, I]
    n_groups = in_f // group_size
    if weight_zero_point is None:
        z = torch.full((n_groups, out_f), 8, dtype=torch.uint8)
    else:
        # stored nibble = signed zero point + 8 = the AWQ zero point z itself
        z = unpack_sequential(weight_zero_point.t().contiguous(), out_f)  # [I/g, O]
        if tuple(z.shape) != (n_groups, out_f):
            raise FormatError(f"{name}.weight_zero_point has shape {tuple(weight_zero_point.shape)}, expected "
                              f"{((out_f + 7) // 8, n_groups)}")
    qweight, qzeros = pack_awq(u.t().contiguous(), z)
    return qweight, qzeros, weight_scale.t().contiguous()


def ct_quantization_config(group_size: int, symmetric: bool = True) -> dict:
    """``quantization_config`` for W4A16 ``pack-quantized`` LM linears of a llava-hf model (formats.md (f)).

    ``ignore``: compressed-tensors' ``match_name`` compares a plain entry for *equality* with the module name
    and a ``re:`` entry with ``re.match``. Module names differ per runtime (``model.vision_tower...`` and
    ``lm_head`` in transformers 5; ``vision_tower...`` and ``language_model.lm_head`` in vLLM/SGLang), so the
    tower, projector and head are excluded by regexes (llm-compressor's LLaVA example uses the same ones)
    plus the plain ``lm_head``. The LM linears match ``targets: ["Linear"]`` by class (vLLM: ``LinearBase``)."""
    return {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"], "format": "pack-quantized",
            "weights": {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group",
                        "group_size": group_size, "dynamic": False, "actorder": None, "observer": "minmax",
                        "block_structure": None, "observer_kwargs": {}},
            "input_activations": None, "output_activations": None}},
        "ignore": ["lm_head", "re:.*lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"],
        "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {},
        "global_compression_ratio": None,
    }


# -------------------------------------------------------------------------------------------------
# the mapped view


@dataclass
class MappedCheckpoint:
    """A foreign checkpoint presented in LLaVA-original terms: ``store`` answers like a ``TensorStore``
    with original key names and AWQ triples; ``modules`` are the quantized linears (``group_size`` each)."""

    format: str
    config: LlavaConfig
    store: "MappedStore"
    modules: list[str] = field(default_factory=list)
    group_size: int = 128
    symmetric: bool = True
    quantization_config: dict | None = None


class MappedStore:
    """``TensorStore`` interface over renamed (and, for compressed-tensors, repacked) tensors.

    ``plan`` maps an original key to ``("copy", source_key)`` or ``("ct", module, suffix)``; repacked
    modules are converted once and the last one is cached (readers fetch qweight/qzeros/scales in turn)."""

    def __init__(self, base: TensorStore, plan: dict[str, tuple], group_size: int = 128):
        self.base = base
        self.folder = base.folder
        self.plan = plan
        self.group_size = group_size
        self._cache: tuple[str, dict] | None = None

    def keys(self) -> list[str]:
        return sorted(self.plan)

    def __contains__(self, key: str) -> bool:
        return key in self.plan

    def _entry(self, key: str) -> tuple:
        entry = self.plan.get(key)
        if entry is None:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint in {self.folder}")
        return entry

    def _ct_module(self, module: str) -> dict:
        if self._cache is None or self._cache[0] != module:
            hf = self.plan[f"{module}.qweight"][3]
            get = lambda s: self.base.get(f"{hf}.{s}") if f"{hf}.{s}" in self.base else None  # noqa: E731
            if get("weight_g_idx") is not None:
                raise CheckpointError(f"{hf}: activation reordering (weight_g_idx) is not supported")
            try:
                qweight, qzeros, scales = ct_to_awq(get("weight_packed"), get("weight_scale"), get("weight_shape"),
                                                    get("weight_zero_point"), self.group_size, hf)
            except FormatError as exc:
                raise CheckpointError(f"{self.folder}: {exc}") from exc
            self._cache = (module, {"qweight": qweight, "qzeros": qzeros, "scales": scales})
        return self._cache[1]

    def get(self, key: str) -> torch.Tensor:
        entry = self._entry(key)
        if entry[0] == "copy":
            return self.base.get(entry[1])
        return self._ct_module(entry[1])[entry[2]]

    def get_slice_shape(self, key: str) -> list[int]:
        return self.meta(key)[0]

    def meta(self, key: str) -> tuple[list[int], str, int]:
        entry = self._entry(key)
        if entry[0] == "copy":
            return self.base.meta(entry[1])
        _, module, suffix, hf = entry
        out_f, packed = self.base.get_slice_shape(f"{hf}.weight_packed")
        in_f = packed * 8
        if f"{hf}.weight_shape" in self.base:
            in_f = int(self.base.get(f"{hf}.weight_shape")[1])
        g = in_f // self.group_size
        shape = {"qweight": [in_f, out_f // 8], "qzeros": [g, out_f // 8], "scales": [g, out_f]}[suffix]
        dtype = self.base.meta(f"{hf}.weight_scale")[1] if suffix == "scales" else "I32"
        size = 2 if dtype in ("F16", "BF16") else 4
        return shape, dtype, shape[0] * shape[1] * size

    def file_bytes(self) -> int:
        return self.base.file_bytes()


def _read_json(path: Path) -> dict | None:
    return read_json_object(path) if path.is_file() else None


def _awq_settings(qc: dict, source: str) -> tuple[int, bool]:
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    group = int(qc.get("group_size", qc.get("q_group_size", 128)))
    version = str(qc.get("version", "gemm")).lower()
    if bits != 4:
        raise CheckpointError(f"{source}: AWQ bits={bits}; only 4-bit checkpoints are supported")
    if version != "gemm":
        raise CheckpointError(f"{source}: AWQ version {version!r} is not supported; only the GEMM packing "
                              "(AutoAWQ's default, what transformers/vLLM call 'gemm') is")
    if group <= 0:
        raise CheckpointError(f"{source}: AWQ group_size {group} is not supported (per-group scales are needed)")
    return group, bool(qc.get("zero_point", True))


def _ct_settings(qc: dict, source: str) -> tuple[int, bool]:
    fmt = qc.get("format")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise CheckpointError(f"{source}: compressed-tensors quantization_config has no config_groups")
    settings = set()
    for name, grp in groups.items():
        w = grp.get("weights") or {}
        gfmt = grp.get("format") or fmt
        if gfmt != "pack-quantized":
            raise CheckpointError(f"{source}: compressed-tensors format {gfmt!r} is not supported; only W4A16 "
                                  "'pack-quantized' is")
        if grp.get("input_activations"):
            raise CheckpointError(f"{source}: config group {name!r} quantizes activations; only weight-only "
                                  "W4A16 is supported")
        if int(w.get("num_bits", 0)) != 4 or w.get("type", "int") != "int" or w.get("strategy") != "group":
            raise CheckpointError(f"{source}: config group {name!r} is not 4-bit int group quantization "
                                  f"({w}); only W4A16 group quantization is supported")
        if w.get("actorder") not in (None, False, "static"):
            raise CheckpointError(f"{source}: activation reordering ({w.get('actorder')!r}) is not supported")
        settings.add((int(w["group_size"]), bool(w.get("symmetric", True))))
    if len(settings) != 1:
        raise CheckpointError(f"{source}: config groups use different settings {sorted(settings)}; one group "
                              "size for all quantized linears is supported")
    return settings.pop()


def open_mapped(folder: str | os.PathLike, fmt: str | None = None) -> MappedCheckpoint:
    """Open a llava-hf (dense, AWQ or compressed-tensors) or an AutoAWQ LLaVA-original checkpoint as
    LLaVA-original names + AWQ triples. Raises CheckpointError naming what is unsupported."""
    from ...formats.checkpoint import detect_format

    folder = Path(folder)
    fmt = fmt or detect_format(folder)
    raw = _read_json(folder / "config.json")
    if raw is None:
        raise CheckpointError(f"{folder / 'config.json'} not found: a checkpoint folder needs its config.json")
    source = str(folder / "config.json")
    hf_layout = is_llava_hf_config(raw)
    cfg = (llava_config_from_hf(raw, _read_json(folder / PREPROCESSOR_NAME), source) if hf_layout
           else LlavaConfig.from_dict(raw, source))
    base = TensorStore(folder)
    rename = hf_to_original if hf_layout else (lambda k: k)
    qc = raw.get("quantization_config") or {}
    group, symmetric = 128, True
    if fmt == "awq":
        group, _ = _awq_settings(qc, source)
    elif fmt == "compressed-tensors":
        group, symmetric = _ct_settings(qc, source)
    plan: dict[str, tuple] = {}
    modules: set[str] = set()
    for key in base.keys():
        new = rename(key)
        if new is None:
            continue
        if fmt == "compressed-tensors" and key.rsplit(".", 1)[-1] in CT_SUFFIXES:
            hf_module, suffix = key.rsplit(".", 1)
            module = new.rsplit(".", 1)[0]
            if suffix == "weight_packed":
                modules.add(module)
                for s in AWQ_SUFFIXES:
                    plan[f"{module}.{s}"] = ("ct", module, s, hf_module)
            continue
        if new in plan:
            raise CheckpointError(f"{folder}: tensors {plan[new][1]!r} and {key!r} both map to {new!r}")
        plan[new] = ("copy", key)
        if fmt == "awq" and new.endswith(".qweight"):
            modules.add(new[: -len(".qweight")])
    if fmt == "awq":
        for m in modules:
            if f"{m}.qzeros" not in plan:
                raise CheckpointError(f"{folder}: AWQ layer {m} has no qzeros; zero_point=false AWQ checkpoints "
                                      "are not supported")
    if fmt in ("awq", "compressed-tensors") and not modules:
        raise CheckpointError(f"{folder}: quantization_config says {fmt!r} but no quantized tensors were found")
    return MappedCheckpoint(fmt, cfg, MappedStore(base, plan, group), sorted(modules), group, symmetric,
                            qc or None)
