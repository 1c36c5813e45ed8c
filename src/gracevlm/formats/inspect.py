"""Describe a checkpoint folder without loading a model: format, quantization, footprint, sanity checks."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from ..errors import CheckpointError
from .awq import GRACE_ZERO_WORD
from .checkpoint import (PROJECTOR_PREFIX, VISION_PREFIX, LlavaConfig, TensorStore, detect_format,
                         read_awq_modules)
from .qat import SIDECAR_NAME


def _part(key: str) -> str:
    if key.startswith(VISION_PREFIX):
        return "vision_tower"
    if key.startswith(PROJECTOR_PREFIX):
        return "projector"
    if key.startswith("model.embed_tokens"):
        return "embed_tokens"
    if key.startswith("lm_head"):
        return "lm_head"
    return "language_model"


def inspect_checkpoint(folder: str | os.PathLike) -> dict:
    """A JSON-able description of the checkpoint in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    cfg = LlavaConfig.from_file(folder / "config.json")
    fmt = detect_format(folder)
    store = TensorStore(folder)
    bytes_by_part: Counter = Counter()
    dtypes_by_part: dict[str, set] = {}
    for key in store.keys():
        _, dtype, nbytes = store.meta(key)
        part = _part(key)
        bytes_by_part[part] += nbytes
        dtypes_by_part.setdefault(part, set()).add(dtype)
    info = {
        "path": str(folder), "format": fmt,
        "architecture": {"layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
                         "intermediate_size": cfg.intermediate_size, "heads": cfg.num_attention_heads,
                         "kv_heads": cfg.num_key_value_heads, "vocab_size": cfg.vocab_size,
                         "vision_tower": "bundled" if any(k.startswith(VISION_PREFIX) for k in store.keys())
                         else cfg.mm_vision_tower,
                         "projector": cfg.mm_projector_type, "vision_select_layer": cfg.mm_vision_select_layer,
                         "image_aspect_ratio": cfg.image_aspect_ratio},
        "file_bytes": store.file_bytes(),
        "bytes_by_part": dict(bytes_by_part),
        "dtypes_by_part": {k: sorted(v) for k, v in dtypes_by_part.items()},
        "quantization": None,
        "checks": {},
    }
    if fmt == "grace-awq":
        bits, group, modules = read_awq_modules(folder)
        missing = [m for m in modules if f"{m}.qweight" not in store]
        non_grace = [m for m in modules if f"{m}.qzeros" in store
                     and not bool((store.get(f"{m}.qzeros") == GRACE_ZERO_WORD).all())]
        kinds = Counter(m.rsplit(".", 1)[-1] for m in modules)
        info["quantization"] = {"method": "awq-gemm", "bits": bits, "group_size": group, "zero_point": 8,
                                "packed_modules": len(modules), "by_kind": dict(kinds),
                                "fp16_parts": ["embed_tokens", "lm_head", "norms", "projector", "vision_tower"]}
        info["checks"] = {"modules_missing_tensors": missing, "qzeros_all_0x88888888": not non_grace,
                          "layers_with_other_zero_points": non_grace[:10]}
    elif fmt == "grace-qat":
        from .qat import read_qat_sidecar
        layers = read_qat_sidecar(folder / SIDECAR_NAME)
        info["quantization"] = {"method": "grace-qat (fake-quantized weights + sidecar)",
                                "bits": int((cfg.raw.get("qat") or {}).get("bits", 4)),
                                "group_size": int((cfg.raw.get("qat") or {}).get("group_size", 128)),
                                "quantized_modules": len(layers)}
    info["ok"] = not info["checks"].get("modules_missing_tensors") if info["checks"] else True
    return info


def format_report(info: dict) -> str:
    lines = [f"{info['path']}", f"  format        {info['format']}"]
    a = info["architecture"]
    lines.append(f"  model         LLaVA: {a['layers']} layers, hidden {a['hidden_size']}, vocab {a['vocab_size']}, "
                 f"vision tower {a['vision_tower']}, projector {a['projector']}")
    q = info["quantization"]
    if q:
        lines.append("  quantization  " + ", ".join(f"{k}={v}" for k, v in q.items()))
    for part, n in sorted(info["bytes_by_part"].items()):
        lines.append(f"  {part:<14}{n / 2**20:10.1f} MiB  {'/'.join(info['dtypes_by_part'][part])}")
    lines.append(f"  on disk       {info['file_bytes'] / 2**20:10.1f} MiB")
    for k, v in info["checks"].items():
        lines.append(f"  check {k}: {v}")
    return "\n".join(lines)
