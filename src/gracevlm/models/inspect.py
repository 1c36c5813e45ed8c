"""Describe a checkpoint folder without loading a model: format, quantization, footprint, sanity checks."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from ..errors import CheckpointError
from ..formats.awq import GRACE_ZERO_WORD
from ..formats.checkpoint import detect_format
from .checkpoint import open_checkpoint


def inspect_checkpoint(folder: str | os.PathLike) -> dict:
    """A JSON-able description of the checkpoint in ``folder`` (or of one ``.gguf`` file)."""
    folder = Path(folder)
    if folder.is_file() and folder.suffix == ".gguf":
        return _inspect_gguf(folder.parent, [folder])
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    if detect_format(folder) == "gguf":
        return _inspect_gguf(folder, sorted(folder.glob("*.gguf")))
    opened = open_checkpoint(folder)
    store, family, q = opened.store, opened.family, opened.quantized
    bytes_by_part: Counter = Counter()
    dtypes_by_part: dict[str, set] = {}
    for key in store.keys():
        _, dtype, nbytes = store.meta(key)
        part = family.part_of(key)
        bytes_by_part[part] += nbytes
        dtypes_by_part.setdefault(part, set()).add(dtype)
    info = {
        "path": str(folder), "format": opened.format, "family": family.name, "layout": opened.layout,
        "architecture": family.describe(opened),
        "file_bytes": store.file_bytes(),
        "bytes_by_part": dict(bytes_by_part),
        "dtypes_by_part": {k: sorted(v) for k, v in dtypes_by_part.items()},
        "quantization": None,
        "checks": {},
    }
    dense_parts = sorted({p for p in bytes_by_part if p != family.part_of(q.names[0])} | {"norms"}) if q.names else []
    kinds = dict(Counter(m.rsplit(".", 1)[-1] for m in q.names))
    if q.method in ("grace-awq", "awq"):
        missing = [m for m in q.names if f"{m}.qweight" not in store]
        other = [m for m in q.names if f"{m}.qzeros" in store
                 and not bool((store.get(f"{m}.qzeros") == GRACE_ZERO_WORD).all())]
        if q.method == "grace-awq":
            info["quantization"] = {"method": "awq-gemm", "bits": q.bits, "group_size": q.group_size, "zero_point": 8,
                                    "packed_modules": len(q.names), "by_kind": kinds, "fp16_parts": dense_parts}
            info["checks"] = {"modules_missing_tensors": missing, "qzeros_all_0x88888888": not other,
                              "layers_with_other_zero_points": other[:10]}
        else:
            info["quantization"] = {"method": "awq-gemm (AutoAWQ quantization_config)", "bits": 4,
                                    "group_size": q.group_size, "zero_point": 8 if not other else "asymmetric",
                                    "packed_modules": len(q.names), "by_kind": kinds}
            info["checks"] = {"modules_missing_tensors": [m for m in q.names if f"{m}.scales" not in store],
                              "symmetric_zero_point_8": not other, "layers_with_other_zero_points": other[:10]}
    elif q.method == "compressed-tensors":
        asym = [] if q.symmetric else list(q.names)
        present = "weight_packed" if q.bits == 8 else "scales"  # W8 tensors are presented as stored
        info["quantization"] = {"method": f"compressed-tensors pack-quantized W{q.bits}A16", "bits": q.bits,
                                "group_size": q.group_size,
                                "zero_point": 2 ** (q.bits - 1) if not asym else "asymmetric",
                                "packed_modules": len(q.names), "by_kind": kinds}
        info["checks"] = {"modules_missing_tensors": [m for m in q.names if f"{m}.{present}" not in store],
                          "symmetric_zero_point_8": not asym, "layers_with_other_zero_points": asym[:10]}
    elif q.method == "grace-qat":
        info["quantization"] = {"method": "grace-qat (fake-quantized weights + sidecar)", "bits": q.bits,
                                "group_size": q.group_size, "quantized_modules": len(q.names), "by_kind": kinds}
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


def format_report(info: dict) -> str:
    lines = [f"{info['path']}", f"  format        {info['format']} ({info.get('layout')} names)"]
    a = dict(info["architecture"])
    family = a.pop("family", info.get("family", "?"))
    lines.append(f"  model         {family}: " + ", ".join(f"{k} {v}" for k, v in a.items()))
    q = info["quantization"]
    if q:
        lines.append("  quantization  " + ", ".join(f"{k}={v}" for k, v in q.items()))
    for part, n in sorted(info["bytes_by_part"].items()):
        lines.append(f"  {part:<14}{n / 2**20:10.1f} MiB  {'/'.join(info['dtypes_by_part'][part])}")
    lines.append(f"  on disk       {info['file_bytes'] / 2**20:10.1f} MiB")
    for k, v in info["checks"].items():
        lines.append(f"  check {k}: {v}")
    return "\n".join(lines)
