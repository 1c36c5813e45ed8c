"""Write trained models as checkpoint folders in the exact GRACE layouts.

* ``save_dense_checkpoint``: a plain LLaVA-1.5 folder (config.json, safetensors, tokenizer files).
* ``export_qat``: GRACE's QAT folder: the baked fake-quantized weights (``q * s``) in the safetensors plus
  the ``qat_quantized_weights.bin`` sidecar (``<m>.weight``, ``<m>.log_scale`` fp32 flat, ``<m>.bias``).
* ``export_awq``: QAT folder -> GRACE AWQ release folder through ``formats.pack.pack_qat_checkpoint``,
  the same code path as ``gracevlm pack`` (which verifies every layer bit-exactly).

Tensor names, on-disk shapes, the config and ``qat.skip_keywords`` come from the model's family
(``Family.checkpoint_key`` / ``checkpoint_tensor`` / ``config_for_model`` / ``qat_skip_keywords``; LLaVA: the
LLaVA-original keys, for our ``LlavaModel``, our ``LlamaForCausalLM`` and transformers'
``LlavaForConditionalGeneration``; Qwen3-VL: transformers' ``model.visual.*`` / ``model.language_model.*`` keys
for our ``Qwen3VLModel``, a tied ``lm_head`` stored once).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from ..formats.checkpoint import ShardWriter, make_public, replace_folder, write_json_atomic
from ..formats.publish import discard_temp_folder, new_temp_folder
from ..formats.pack import TOKENIZER_FILES, PackReport, pack_qat_checkpoint
from ..formats.qat import SIDECAR_NAME
from ..models.registry import family_for_model
from .qat import GRACE_SKIP_KEYWORDS, lsq_layers

def checkpoint_config(model: nn.Module, conv_mode: str | None = None, max_length: int = 2048) -> dict:
    """The ``config.json`` dict describing ``model`` in its family's checkpoint layout."""
    return family_for_model(model).config_for_model(model, conv_mode, max_length)


def _floating(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach()
    if dtype is not None and t.dtype.is_floating_point:
        t = t.to(dtype)
    return t.contiguous().cpu()


def _copy_side_files(src: str | os.PathLike | None, dst: Path) -> None:
    if src is None:
        return
    src = Path(src)
    for fname in TOKENIZER_FILES:
        if (src / fname).is_file():
            shutil.copy2(src / fname, dst / fname)
    if not (dst / "generation_config.json").is_file():
        write_json_atomic(dst / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})


def _write_folder(model: nn.Module, out_dir, config: dict, tokenizer_dir, dtype, weight_dtype,
                  sidecar: bool, force: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(f"{out} exists and is not empty; pass force=True to replace it")
    family = family_for_model(model)
    lsq = lsq_layers(model)
    if sidecar and not lsq:
        raise InputError("the model has no LSQLinear layers; call gracevlm.train.prepare(model) first "
                         "(or save it with save_dense_checkpoint)")
    baked_keys = {f"{name}.weight": layer for name, layer in lsq.items()}
    scale_keys = {f"{name}.log_scale" for name in lsq}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_folder(out)  # stale ones from killed runs are removed first
    try:
        writer = ShardWriter(tmp)
        side: dict[str, torch.Tensor] = {}
        for name, tensor in model.state_dict().items():
            if name in scale_keys:
                continue
            key = family.checkpoint_key(name, model)
            if key is None:
                continue
            layer = baked_keys.get(name)
            if layer is not None:
                value = layer.baked_weight(weight_dtype).contiguous().cpu()
                if sidecar:
                    module = key[: -len(".weight")]
                    side[f"{module}.weight"] = value
                    side[f"{module}.log_scale"] = layer.log_scale.detach().to(torch.float32).clone().cpu()
                    if layer.bias is not None:
                        side[f"{module}.bias"] = _floating(layer.bias, dtype)
            else:
                value = _floating(tensor, dtype)
            writer.add(key, family.checkpoint_tensor(key, value, model))
        writer.close()
        cfg = dict(config)
        for field in ("qat", "awq_packing", "quantization_config"):
            cfg.pop(field, None)
        if sidecar:
            layers = list(lsq.values())
            cfg["qat"] = {"bits": layers[0].bits, "group_size": max(l.group_size for l in layers),
                          "learn_scales": any(l.log_scale.requires_grad for l in layers),
                          "skip_keywords": list(family.qat_skip_keywords or GRACE_SKIP_KEYWORDS),
                          "num_replaced": len(layers)}
            groups = {l.group_size for l in layers if l.group_size != l.in_features}
            if len(groups) == 1:
                cfg["qat"]["group_size"] = groups.pop()
            cfg["qat"] = {k: v for k, v in cfg["qat"].items() if k in family.qat_fields}
            torch.save(side, tmp / SIDECAR_NAME)
            make_public(tmp / SIDECAR_NAME)
        write_json_atomic(tmp / "config.json", cfg)
        _copy_side_files(tokenizer_dir, tmp)
        replace_folder(tmp, out)
    except BaseException:
        discard_temp_folder(tmp)
        raise
    return out


def save_dense_checkpoint(model: nn.Module, out_dir: str | os.PathLike, config: dict | None = None,
                          tokenizer_dir: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
                          force: bool = False) -> Path:
    """Write ``model`` as a plain LLaVA-1.5 checkpoint folder (LSQ layers, if any, as baked ``q * s``).

    ``config``: the config.json dict to write (its ``qat``/``awq_packing`` fields are dropped); default
    ``checkpoint_config(model)``. ``dtype``: cast floating tensors (None keeps them). Tokenizer files and
    generation_config.json are copied from ``tokenizer_dir``.
    """
    return _write_folder(model, out_dir, config or checkpoint_config(model), tokenizer_dir, dtype, dtype, False, force)


def export_qat(model: nn.Module, out_dir: str | os.PathLike, config: dict | None = None,
               tokenizer_dir: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
               weight_dtype: torch.dtype | None = None, force: bool = False) -> Path:
    """Write a GRACE QAT checkpoint folder for a model prepared with ``prepare``.

    Quantized linears are saved as baked ``q * s`` (computed in fp32, rounded once to ``weight_dtype``,
    default the weight's own dtype); the sidecar holds the same baked weights and the unclamped fp32
    ``log_scale`` of each layer; ``config.json`` gains GRACE's ``qat`` section. Other tensors are cast to
    ``dtype`` (None keeps them).
    """
    return _write_folder(model, out_dir, config or checkpoint_config(model), tokenizer_dir, dtype, weight_dtype,
                         True, force)


def export_awq(model: nn.Module, out_dir: str | os.PathLike, config: dict | None = None,
               tokenizer_dir: str | os.PathLike | None = None, dtype: torch.dtype | None = torch.float16,
               weight_dtype: torch.dtype | None = None, qat_dir: str | os.PathLike | None = None,
               force: bool = False, progress: bool = False) -> PackReport:
    """``export_qat`` then ``pack_qat_checkpoint`` (= ``gracevlm pack``) into the GRACE AWQ release layout.

    The QAT folder is written to ``qat_dir`` (kept) or to a temporary folder (removed). Dense tensors
    default to fp16 as in the GRACE release.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(f"{out} exists and is not empty; pass force=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    if qat_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.qat.", dir=out.parent))
        qat_dir = tmp / "qat"
    try:
        export_qat(model, qat_dir, config, tokenizer_dir, dtype, weight_dtype, force=True)
        return pack_qat_checkpoint(qat_dir, out, force=True, progress=progress)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
