"""Build a ``LlavaModel`` from a checkpoint folder without ever materializing a dense language model.

Modules are created on the meta device; dense tensors are streamed from the memory-mapped safetensors
straight into their final dtype; packed linears become ``Int4Linear`` holding the on-disk tensors.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, FormatError
from ..formats.checkpoint import (MAPPED_FORMATS, PROJECTOR_PREFIX, VISION_PREFIX, LlavaConfig, TensorStore,
                                  detect_format, is_ignored_key, read_awq_modules)
from ..formats.hf_map import open_mapped, vision_config_dict
from ..formats.hub import resolve_model_path
from ..formats.qat import SIDECAR_NAME, qat_to_awq, read_qat_sidecar
from ..formats.rtn import rtn_quantize
from ..nn import HalfLinear, Int4Linear
from .clip import CLIPVisionSpec, load_clip_folder, tower_from_tensors
from .config_checks import (check_finite_scales, check_folder_readable, check_quantized_module_names,
                            check_vision_select_layer)
from .llama import LlamaForCausalLM, LlamaSpec, Rotary
from .llava import LlavaModel, Projector
from .tokenizer import LlamaTokenizer

log = logging.getLogger(__name__)

LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class LoadStats:
    format: str
    load_seconds: float = 0.0
    file_bytes: int = 0
    bytes_by_part: dict = field(default_factory=dict)

    @property
    def resident_bytes(self) -> int:
        return sum(self.bytes_by_part.values())


@dataclass
class LoadedModel:
    model: LlavaModel
    tokenizer: LlamaTokenizer
    config: LlavaConfig
    path: Path
    stats: LoadStats


def llama_spec(cfg: LlavaConfig) -> LlamaSpec:
    factor = 1.0
    if cfg.rope_scaling and cfg.rope_scaling.get("type", cfg.rope_scaling.get("rope_type")) == "linear":
        factor = float(cfg.rope_scaling["factor"])
    return LlamaSpec(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                     cfg.num_key_value_heads, cfg.vocab_size, cfg.rms_norm_eps, cfg.rope_theta, factor,
                     cfg.max_position_embeddings)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


def _assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    expected = getattr(parent, leaf)
    if tuple(expected.shape) != tuple(tensor.shape):
        raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the config implies "
                              f"{tuple(expected.shape)}")
    if isinstance(expected, nn.Parameter):
        parent._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        parent._buffers[leaf] = tensor


def _nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _packed_linears(cfg: LlavaConfig, store: TensorStore, fmt: str, folder: Path, quantize: str | None,
                    backend: str | None, mapped=None) -> dict[str, nn.Module]:
    """Module name -> Int4Linear for every quantized language-model linear."""
    out: dict[str, nn.Module] = {}
    if fmt == "grace-awq" or (mapped is not None and mapped.modules):
        _, group, modules = read_awq_modules(folder) if mapped is None else (4, mapped.group_size, mapped.modules)
        check_quantized_module_names(modules, cfg.num_hidden_layers, str(folder))
        for name in modules:
            keys = [f"{name}.{s}" for s in ("qweight", "qzeros", "scales")]
            missing = [k for k in keys if k not in store]
            if missing:
                raise CheckpointError(f"awq_quantized_modules.json names {name!r} but the checkpoint has no "
                                      f"{missing[0]!r}; the checkpoint is incomplete or the module list is wrong")
            bias = store.get(f"{name}.bias") if f"{name}.bias" in store else None
            try:
                out[name] = Int4Linear.from_awq(*(store.get(k) for k in keys), bias=bias, group_size=group,
                                                backend=backend, name=name)
            except FormatError as exc:
                raise CheckpointError(f"{folder}: {exc}") from exc
    elif fmt == "grace-qat":
        group = int((cfg.raw.get("qat") or {}).get("group_size", 128))
        for name, layer in read_qat_sidecar(folder / SIDECAR_NAME).items():
            try:
                packed = qat_to_awq(layer.weight, layer.log_scale, layer.bias, group_size=group, name=name)
            except FormatError as exc:
                raise CheckpointError(f"{folder / SIDECAR_NAME}: {exc}") from exc
            out[name] = Int4Linear.from_packed(packed, backend=backend)
    elif quantize == "rtn":
        for i in range(cfg.num_hidden_layers):
            for lin in LINEAR_NAMES:
                name = f"model.layers.{i}.{lin}"
                bias = store.get(f"{name}.bias") if f"{name}.bias" in store else None
                out[name] = Int4Linear.from_packed(rtn_quantize(store.get(f"{name}.weight"), 128, bias), backend)
    elif quantize not in (None, "none"):
        raise CheckpointError(f"unknown --quantize {quantize!r}; choose 'rtn' or none")
    return out


def _vision_config(cfg: LlavaConfig, store: TensorStore) -> CLIPVisionSpec:
    """``mm_vision_config`` (CLIP-L/336 values for the keys it leaves out), else implied by the tensors."""
    return CLIPVisionSpec.from_dict(vision_config_dict(cfg, store.keys(), store.get_slice_shape),
                                    f"the vision tower config of {store.folder}")


def _load_vision_tower(cfg: LlavaConfig, store: TensorStore, folder: Path, dtype: torch.dtype) -> nn.Module | None:
    """The CLIP tower: bundled in the checkpoint (``VISION_PREFIX`` tensors), else the transformers CLIP
    folder or Hub id ``mm_vision_tower`` names (LLaVA-1.5: openai/clip-vit-large-patch14-336)."""
    keys = [k for k in store.keys() if k.startswith(VISION_PREFIX)]
    if keys:
        return tower_from_tensors(_vision_config(cfg, store),
                                  {k[len(VISION_PREFIX):]: store.get(k) for k in keys}, dtype, str(folder))
    if not cfg.mm_vision_tower:
        return None
    path = resolve_model_path(cfg.mm_vision_tower, base=folder)
    try:
        return load_clip_folder(path, dtype)
    except CheckpointError as exc:
        raise CheckpointError(f"cannot load the vision tower from {path} (mm_vision_tower="
                              f"{cfg.mm_vision_tower!r}): {exc}") from exc


def _return_freed_memory() -> None:
    """Hand memory freed during loading (file buffers, unfused parts, released AWQ tensors) back to the OS.
    glibc keeps freed blocks below its adaptive mmap threshold (up to 32 MiB: the q/k/v parts) in the heap,
    where they would stay in the resident size. No-op without glibc."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _keep_half_head(src: torch.Tensor, dtype: torch.dtype) -> bool:
    """Keep an fp16/bf16 ``lm_head`` as stored (``HalfLinear``: exact fp32 results, half the bytes read per
    token) when the model runs in fp32 with the native CPU kernels; else it is converted to ``dtype``."""
    from ..kernels import native

    return (dtype == torch.float32 and src.dtype in (torch.float16, torch.bfloat16)
            and src.device.type == "cpu" and native.load_library() is not None)


def load_checkpoint(model: str | Path, dtype: torch.dtype = torch.float32, backend: str | None = None,
                    quantize: str | None = None, vision_dtype: torch.dtype | None = None,
                    fuse: bool = True, keep_awq: bool = False, half_lm_head: bool = True) -> LoadedModel:
    """Load a GRACE AWQ, GRACE QAT or plain LLaVA-1.5 checkpoint (folder or Hub id) for inference; also
    AutoAWQ GEMM, compressed-tensors W4A16 and dense llava-hf checkpoints (``formats.hf_map.open_mapped``
    presents those as LLaVA-original names + AWQ triples).

    ``fuse`` concatenates q/k/v and gate/up into single linears after loading (exact, fewer calls).
    ``keep_awq``: keep each INT4 layer's AWQ buffers next to the CPU kernels' own layout; by default they
    are freed once that layout holds the same bits (rebuilt on demand: ``Int4Linear.release_awq``).
    ``vision_dtype``: dtype of the vision tower and projector (default ``dtype``). With ``dtype`` float32 on
    CPU and ``half_lm_head`` an fp16/bf16 ``lm_head`` stays as stored (``HalfLinear``: fp32 results, half
    the bytes per token; inference only: training passes ``half_lm_head=False`` for a trainable nn.Linear).
    """
    t0 = time.perf_counter()
    folder = resolve_model_path(model)
    check_folder_readable(folder)
    fmt = detect_format(folder)
    if fmt == "gguf":
        raise CheckpointError(f"{folder} holds GGUF files, which are for llama.cpp; gracevlm loads the checkpoint "
                              "they were exported from (GRACE AWQ/QAT, AutoAWQ, compressed-tensors, llava-hf)")
    mapped = None
    if fmt in MAPPED_FORMATS:
        mapped = open_mapped(folder, fmt)
        cfg, store = mapped.config, mapped.store
    else:
        cfg = LlavaConfig.from_file(folder / "config.json")
        store = TensorStore(folder)
    tokenizer = LlamaTokenizer.from_dir(folder)
    spec = llama_spec(cfg)
    with torch.device("meta"):
        lm = LlamaForCausalLM(spec)
    if mapped is not None and mapped.modules and quantize not in (None, "none"):
        raise CheckpointError(f"--quantize {quantize} applies to dense checkpoints; {folder} is already quantized")
    packed = _packed_linears(cfg, store, fmt, folder, quantize, backend, mapped)
    check_finite_scales(packed, str(folder))
    for name, module in packed.items():
        try:
            target = lm.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"quantized module {name!r} does not exist in a LLaMA with "
                                  f"{cfg.num_hidden_layers} layers") from None
        if (target.in_features, target.out_features) != (module.in_features, module.out_features):
            raise CheckpointError(f"{name}: packed shape {module.in_features}->{module.out_features} does not "
                                  f"match the config ({target.in_features}->{target.out_features})")
        _set_module(lm, name, module)
    used = {f"{n}.{s}" for n in packed for s in ("qweight", "qzeros", "scales", "bias", "weight")}
    del packed  # the model holds the layers now: fusing below frees each part as it goes
    lm.rotary = Rotary(spec)  # computed tables, not checkpoint tensors
    for name, tensor in list(lm.named_parameters()) + list(lm.named_buffers()):
        if not tensor.is_meta:
            continue
        key = name
        if name == "lm_head.weight" and key not in store and cfg.tie_word_embeddings:
            key = "model.embed_tokens.weight"
        if key not in store:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint in {folder}")
        src = store.get(key)
        used.add(key)
        if name == "lm_head.weight" and half_lm_head and _keep_half_head(src, dtype):
            lm.lm_head = HalfLinear(src)
            continue
        target_dtype = src.dtype if name == "model.embed_tokens.weight" else dtype  # lookup table stays compact
        _assign(lm, name, src.to(target_dtype))

    if fuse:
        lm.fuse_projections()
    lm.prepare_kernels(release_awq=not keep_awq)

    projector = None
    if f"{PROJECTOR_PREFIX}0.weight" in store:
        if cfg.mm_projector_type != "mlp2x_gelu":
            raise CheckpointError(f"mm_projector_type {cfg.mm_projector_type!r} is not supported (mlp2x_gelu)")
        with torch.device("meta"):
            projector = Projector(cfg.mm_hidden_size, cfg.hidden_size)
        for name, _ in list(projector.named_parameters()):
            key = PROJECTOR_PREFIX + name
            _assign(projector, name, store.get(key).to(vision_dtype or dtype))
            used.add(key)
    vision = _load_vision_tower(cfg, store, folder, vision_dtype or dtype) if projector is not None else None
    check_vision_select_layer(cfg.mm_vision_select_layer, vision, str(folder / "config.json"))
    unused = [k for k in store.keys() if k not in used and not k.startswith(VISION_PREFIX) and not is_ignored_key(k)]
    if unused:
        log.warning("%d checkpoint tensors are not used by the model (e.g. %s)", len(unused), unused[0])
    model = LlavaModel(vision, projector, lm, cfg.mm_vision_select_layer, cfg.mm_vision_select_feature).eval()
    _return_freed_memory()
    stats = LoadStats(fmt, file_bytes=store.file_bytes())
    stats.bytes_by_part = {
        "int4_linears": sum(m.nbytes() for m in lm.modules() if isinstance(m, Int4Linear) and not m.awq_released),
        "int4_kernel_layouts": sum(m.cache_nbytes() for m in lm.modules() if isinstance(m, Int4Linear)),
        "language_dense": _nbytes(lm) - sum(_nbytes(m) for m in lm.modules() if isinstance(m, Int4Linear)),
        "vision_tower": _nbytes(vision) if vision is not None else 0,
        "projector": _nbytes(projector) if projector is not None else 0,
    }
    stats.load_seconds = time.perf_counter() - t0
    return LoadedModel(model, tokenizer, cfg, folder, stats)
