"""Describe a checkpoint folder without loading a model: format, quantization, footprint, sanity checks."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from ..errors import CheckpointError
from ..formats.awq import GRACE_ZERO_WORD
from ..formats.checkpoint import (MAPPED_FORMATS, PROJECTOR_PREFIX, VISION_PREFIX, LlavaConfig, TensorStore,
                         detect_format, read_awq_modules)
from ..formats.qat import SIDECAR_NAME


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
    """A JSON-able description of the checkpoint in ``folder`` (or of one ``.gguf`` file)."""
    folder = Path(folder)
    if folder.is_file() and folder.suffix == ".gguf":
        return _inspect_gguf(folder.parent, [folder])
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    fmt = detect_format(folder)
    if fmt == "gguf":
        return _inspect_gguf(folder, sorted(folder.glob("*.gguf")))
    mapped = None
    if fmt in MAPPED_FORMATS:
        from .llava.weights import open_mapped

        mapped = open_mapped(folder, fmt)  # LLaVA-original names, AWQ triples
        cfg, store = mapped.config, mapped.store
    else:
        cfg = LlavaConfig.from_file(folder / "config.json")
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
        "layout": "llava-hf" if mapped is not None and _hf_layout(folder) else "llava-original",
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
    elif fmt in ("awq", "compressed-tensors"):
        kinds = Counter(m.rsplit(".", 1)[-1] for m in mapped.modules)
        if fmt == "awq":
            asym = [m for m in mapped.modules if not bool((store.get(f"{m}.qzeros") == GRACE_ZERO_WORD).all())]
            method = "awq-gemm (AutoAWQ quantization_config)"
        else:
            asym = [] if mapped.symmetric else list(mapped.modules)
            method = "compressed-tensors pack-quantized W4A16"
        info["quantization"] = {"method": method, "bits": 4, "group_size": mapped.group_size,
                                "zero_point": 8 if not asym else "asymmetric", "packed_modules": len(mapped.modules),
                                "by_kind": dict(kinds)}
        info["checks"] = {"modules_missing_tensors": [m for m in mapped.modules if f"{m}.scales" not in store],
                          "symmetric_zero_point_8": not asym, "layers_with_other_zero_points": asym[:10]}
    elif fmt == "grace-qat":
        from ..formats.qat import read_qat_sidecar
        layers = read_qat_sidecar(folder / SIDECAR_NAME)
        info["quantization"] = {"method": "grace-qat (fake-quantized weights + sidecar)",
                                "bits": int((cfg.raw.get("qat") or {}).get("bits", 4)),
                                "group_size": int((cfg.raw.get("qat") or {}).get("group_size", 128)),
                                "quantized_modules": len(layers)}
    info["ok"] = not info["checks"].get("modules_missing_tensors") if info["checks"] else True
    return info


def _inspect_gguf(folder: Path, files: list[Path]) -> dict:
    """llama.cpp files: architecture, tensor types, and which LLaVA pieces (LLM, mmproj) are present."""
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise CheckpointError("reading GGUF files needs the gguf package (pip install gguf==0.19.0)") from exc

    described, types_total, file_bytes, arch_info, projector = [], Counter(), 0, {}, None
    for path in files:
        try:
            reader = GGUFReader(str(path))
        except Exception as exc:  # noqa: BLE001 - gguf raises ValueError and friends for bad files
            raise CheckpointError(f"cannot read GGUF file {path}: {exc}") from exc

        def meta(key, reader=reader):
            f = reader.fields.get(key)
            return None if f is None else f.contents()

        arch = meta("general.architecture")
        types = Counter(t.tensor_type.name for t in reader.tensors)
        types_total.update(types)
        file_bytes += path.stat().st_size
        entry = {"file": path.name, "architecture": arch, "tensors": len(reader.tensors), "types": dict(types),
                 "file_type": meta("general.file_type")}
        if arch == "llama":
            tokens = reader.fields.get("tokenizer.ggml.tokens")
            arch_info = {"layers": meta("llama.block_count"), "hidden_size": meta("llama.embedding_length"),
                         "intermediate_size": meta("llama.feed_forward_length"),
                         "heads": meta("llama.attention.head_count"),
                         "kv_heads": meta("llama.attention.head_count_kv"),
                         "vocab_size": None if tokens is None else len(tokens.data)}
            entry["chat_template"] = "tokenizer.chat_template" in reader.fields
        elif arch == "clip":
            projector = meta("clip.projector_type")
            entry.update(projector_type=projector, vision_layers=meta("clip.vision.block_count"),
                         image_size=meta("clip.vision.image_size"))
        described.append(entry)
    archs = [d["architecture"] for d in described]
    keys = ("layers", "hidden_size", "intermediate_size", "heads", "kv_heads", "vocab_size")
    info = {"path": str(folder), "format": "gguf", "layout": "llama.cpp",
            "architecture": {**{k: arch_info.get(k) for k in keys},
                             "vision_tower": "mmproj" if "clip" in archs else None, "projector": projector},
            "file_bytes": file_bytes, "files": described, "bytes_by_part": {}, "dtypes_by_part": {},
            "quantization": {"method": "gguf", "tensor_types": dict(types_total)} if types_total else None,
            "checks": {"has_llm": "llama" in archs, "has_mmproj": "clip" in archs}}
    info["ok"] = "llama" in archs
    return info


def _hf_layout(folder: Path) -> bool:
    import json

    from .llava.weights import is_llava_hf_config

    return is_llava_hf_config(json.loads((folder / "config.json").read_text(encoding="utf-8")))


def format_report(info: dict) -> str:
    lines = [f"{info['path']}", f"  format        {info['format']} ({info.get('layout', 'llava-original')} names)"]
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
