"""Load a checkpoint for inference without ever materializing a dense quantized language model.

``load_checkpoint`` = open (``models.checkpoint``) -> the family builds its module tree on the meta device
and fills it (``Family.build``, using the steps below) -> stats. Dense tensors are read straight into
their final dtype; quantized linears become ``Int4Linear`` holding the exact AWQ tensors.
"""
from __future__ import annotations

import ctypes
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import kernels
from ..errors import CheckpointError, FormatError
from ..formats.checkpoint import is_ignored_key
from ..formats.rtn import rtn_quantize
from ..nn import HalfLinear, Int4Linear, Int8Linear
from .checkpoint import OpenedCheckpoint, open_checkpoint
from .checks import check_finite_scales, check_quantized_module_names
from .llama import LlamaForCausalLM, LlamaSpec, Rotary

log = logging.getLogger(__name__)

LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class LoadOptions:
    """How to load. ``dtype``: compute dtype; ``backend``: INT4 kernel (None = ``GRACEVLM_BACKEND`` or
    automatic, resolved once); ``quantize="rtn"``: W4G128 round-to-nearest of a dense checkpoint;
    ``vision_dtype``: the vision tower's dtype (default ``dtype``); ``fuse``: concatenate q/k/v and
    gate/up (exact); ``keep_awq``: keep the AWQ buffers beside the CPU kernels' layout; ``half_lm_head``:
    let an fp16/bf16 lm_head stay half (``kernels.keep_half_head``; training passes False); ``device``: where
    every tensor goes as it is read (e.g. "cuda"): each packed layer and dense tensor is copied from the file
    straight to the device, so no dense CPU copy of the model is made; kernel layouts are prepared there."""

    dtype: torch.dtype = torch.float32
    backend: str | None = None
    quantize: str | None = None
    vision_dtype: torch.dtype | None = None
    fuse: bool = True
    keep_awq: bool = False
    half_lm_head: bool = True
    device: torch.device | str = "cpu"

    def __post_init__(self):
        self.device = torch.device(self.device)


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
    """A built model with its tokenizer and config; ``family`` is its ``models.registry.Family``."""

    model: nn.Module
    tokenizer: Any
    config: Any
    path: Path
    stats: LoadStats
    family: Any = None


# -- steps a family's build uses --------------------------------------------------------------------------

def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


def assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in place of the (meta) parameter or buffer ``name``, checking its shape."""
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


def module_nbytes(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def quantized_linears(opened: OpenedCheckpoint, options: LoadOptions, dense_names: list[str]) -> dict[str, nn.Module]:
    """Module name -> ``Int4Linear`` for every quantized linear of the checkpoint, or, with
    ``options.quantize == "rtn"`` on a dense checkpoint, for each of ``dense_names``."""
    backend = kernels.backend_choice(options.backend)
    q = opened.quantized
    if q.names and options.quantize not in (None, "none"):
        raise CheckpointError(f"--quantize {options.quantize} applies to dense checkpoints; {opened.folder} is "
                              "already quantized")
    out: dict[str, nn.Module] = {}
    for name in q.names:
        try:
            if q.bits == 8:  # GRACE W8 QAT (codes from the baked weights and log-scales) or W8A16 pack-quantized
                out[name] = Int8Linear.from_codes(opened.int8_codes(name), name=name)
            else:
                out[name] = Int4Linear.from_packed(opened.awq_tensors(name), backend=backend)
        except FormatError as exc:
            raise CheckpointError(f"{opened.folder}: {name}: {exc}") from exc
    if options.quantize == "rtn":
        store = opened.store
        for name in dense_names:
            bias = store.get(f"{name}.bias") if f"{name}.bias" in store else None
            out[name] = Int4Linear.from_packed(rtn_quantize(store.get(f"{name}.weight"), 128, bias), backend)
    elif options.quantize not in (None, "none"):
        raise CheckpointError(f"unknown --quantize {options.quantize!r}; choose 'rtn' or none")
    return out


def install_linears(root: nn.Module, linears: dict[str, nn.Module], what: str) -> set[str]:
    """Replace the meta linears of ``root`` by ``linears`` (shapes checked); returns the checkpoint keys used."""
    for name, module in linears.items():
        try:
            target = root.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"quantized module {name!r} does not exist in {what}") from None
        if (target.in_features, target.out_features) != (module.in_features, module.out_features):
            raise CheckpointError(f"{name}: packed shape {module.in_features}->{module.out_features} does not "
                                  f"match the config ({target.in_features}->{target.out_features})")
        set_module(root, name, module)
    return {f"{n}.{s}" for n in linears for s in ("qweight", "qzeros", "scales", "bias", "weight", "log_scale")}


def load_llama(opened: OpenedCheckpoint, spec: LlamaSpec, options: LoadOptions,
               tie_word_embeddings: bool = False) -> tuple[LlamaForCausalLM, set[str]]:
    """The LLaMA decoder under keys ``model.*`` / ``lm_head.weight``: meta build, quantized linears, dense
    tensors in ``options.dtype`` (the embedding table keeps its stored dtype), a tied or half lm_head,
    fusion and kernel preparation. Returns the model and the checkpoint keys it used."""
    with torch.device("meta"):
        lm = LlamaForCausalLM(spec)
    names = [f"model.layers.{i}.{lin}" for i in range(spec.num_layers) for lin in LLAMA_LINEARS]
    check_quantized_module_names(opened.quantized.names, spec.num_layers, str(opened.folder))
    linears = quantized_linears(opened, options, names)
    check_finite_scales(linears, str(opened.folder))
    device = options.device
    if device.type != "cpu":
        linears = {name: module.to(device) for name, module in linears.items()}
    used = install_linears(lm, linears, f"a LLaMA with {spec.num_layers} layers")
    del linears  # the model holds the layers now: fusing below frees each part as it goes
    lm.rotary = Rotary(spec)  # computed tables, not checkpoint tensors
    store = opened.store
    for name, tensor in list(lm.named_parameters()) + list(lm.named_buffers()):
        if not tensor.is_meta:
            continue
        key = name
        if name == "lm_head.weight" and key not in store and tie_word_embeddings:
            key = "model.embed_tokens.weight"
        if key not in store:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint in {opened.folder}")
        src = store.get(key)
        used.add(key)
        if name == "lm_head.weight" and options.half_lm_head and device.type == "cpu" \
                and kernels.keep_half_head(src, options.dtype):
            lm.lm_head = HalfLinear(src)
            continue
        target_dtype = src.dtype if name == "model.embed_tokens.weight" else options.dtype
        assign(lm, name, src.to(device=device, dtype=target_dtype))
    if device.type != "cpu":
        lm.rotary.to(device)
    if options.fuse:
        lm.fuse_projections()
    lm.prepare_kernels(release_awq=not options.keep_awq)
    return lm, used


def warn_unused(opened: OpenedCheckpoint, used: set[str], also_ignored=()) -> None:
    unused = [k for k in opened.store.keys()
              if k not in used and not is_ignored_key(k) and not k.startswith(tuple(also_ignored))]
    if unused:
        log.warning("%d checkpoint tensors are not used by the model (e.g. %s)", len(unused), unused[0])


def return_freed_memory() -> None:
    """Hand memory freed during loading (file buffers, unfused parts, released AWQ tensors) back to the OS.
    glibc keeps freed blocks below its adaptive mmap threshold (up to 32 MiB: the q/k/v parts) in the heap,
    where they would stay in the resident size. No-op without glibc."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def language_bytes(lm: nn.Module) -> dict[str, int]:
    """Resident bytes of a language model by part: packed INT4 tensors, kernel layouts, INT8 codes + scales
    (only when there are INT8 layers), the rest."""
    int4 = [m for m in lm.modules() if isinstance(m, Int4Linear)]
    int8 = [m for m in lm.modules() if isinstance(m, Int8Linear)]
    out = {"int4_linears": sum(m.nbytes() for m in int4 if not m.awq_released),
           "int4_kernel_layouts": sum(m.cache_nbytes() for m in int4),
           "language_dense": module_nbytes(lm) - sum(module_nbytes(m) for m in int4 + int8)}
    if int8:
        out["int8_linears"] = sum(module_nbytes(m) for m in int8)
    return out


def decode_read_bytes(lm: nn.Module, embedding: nn.Module) -> dict:
    """The weight bytes one decode step of ``lm`` reads (one token per row), by kind, and what its head is.

    ``bytes``: ``quantized_linears`` (INT4 in the layout the decode kernel reads, else its packed tensors; INT8
    codes + scales + bias), ``dense_linears`` (``nn.Linear`` weights and biases), ``lm_head`` (its matrix once,
    also when it is the embedding table itself), ``other`` (norms and any remaining parameters). The embedding
    table is not counted (a step reads one row per token) unless it is the head's matrix. Tensors shared
    between modules count once. ``lm_head``: the head's class and weight dtype, whether it shares the embedding
    matrix (same storage), and whether the CPU half kernel computes it row by row (``rows_independent(1)``:
    the native ``gv_matmul_half`` GEMV, not a tiled fp32 conversion)."""
    head = lm.lm_head
    seen: set[int] = set()
    out = {"quantized_linears": 0, "dense_linears": 0, "lm_head": 0, "other": 0}

    def add(kind: str, t: torch.Tensor | None) -> None:
        if t is None or t.is_meta or t.data_ptr() in seen:
            return
        seen.add(t.data_ptr())
        out[kind] += t.numel() * t.element_size()

    for t in list(head.parameters()) + list(head.buffers()):
        add("lm_head", t)
    embed_ptrs = {t.data_ptr() for t in embedding.parameters()}
    for module in lm.modules():
        if module is head or module is embedding:
            continue
        if isinstance(module, Int4Linear):
            out["quantized_linears"] += module.cache_nbytes() or module.nbytes()
            continue
        if isinstance(module, Int8Linear):
            out["quantized_linears"] += module.nbytes()
            continue
        kind = "dense_linears" if isinstance(module, nn.Linear) else "other"
        for t in module.parameters(recurse=False):
            if t.data_ptr() not in embed_ptrs:
                add(kind, t)
    shares = head.weight.data_ptr() in embed_ptrs
    row_kernel = getattr(head, "rows_independent", None)
    return {"bytes": out, "total": sum(out.values()),
            "lm_head": {"class": type(head).__name__, "dtype": str(head.weight.dtype).replace("torch.", ""),
                        "shape": list(head.weight.shape), "shares_embedding": shares,
                        "row_kernel": bool(row_kernel(1)) if row_kernel is not None else False}}


# -- the entry point -----------------------------------------------------------------------------------------

def load_checkpoint(model: str | Path, dtype: torch.dtype = torch.float32, backend: str | None = None,
                    quantize: str | None = None, vision_dtype: torch.dtype | None = None,
                    fuse: bool = True, keep_awq: bool = False, half_lm_head: bool = True,
                    device: torch.device | str = "cpu") -> LoadedModel:
    """Load any supported checkpoint (folder or Hub id, every family and format ``open_checkpoint`` reads)
    for inference; see ``LoadOptions`` for the arguments."""
    t0 = time.perf_counter()
    options = LoadOptions(dtype, backend, quantize, vision_dtype, fuse, keep_awq, half_lm_head, device)
    opened = open_checkpoint(model)
    loaded = opened.family.build(opened, options)
    loaded.family = opened.family
    return_freed_memory()
    loaded.stats.file_bytes = opened.file_bytes()
    loaded.stats.load_seconds = time.perf_counter() - t0
    return loaded
