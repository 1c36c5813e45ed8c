"""The one checkpoint opener: ``open_checkpoint(model)`` gives config + tensor store + quantized linears under
the model family's own names, for every user of a checkpoint (loading, export, inspect, pack, train).

The container format comes from ``formats.checkpoint.detect_format``; the family (``models.registry``) reads
the config and presents foreign layouts (llava-hf, AutoAWQ, compressed-tensors) renamed and repacked, so
the rest of gracevlm sees one view of a model. A quantized linear is always handed out as its exact AWQ
GEMM triple (``awq_tensors``), whatever the file holds (AWQ, QAT sidecar, compressed-tensors).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, FormatError
from ..formats.checkpoint import TensorStore, detect_format, read_awq_modules, read_json_object
from ..formats.hub import resolve_model_path
from ..formats.mapped import MappedStore
from ..formats.qat import SIDECAR_NAME, AwqTensors, QatLayer, qat_to_awq, read_qat_sidecar
from ..formats.w8 import Int8Codes, from_compressed_tensors_w8, qat_to_int8
from .checks import check_folder_readable
from .registry import Family, family_for_config


@dataclass
class QuantizedLinears:
    """The quantized linears of a checkpoint. ``method``: ``grace-awq``, ``grace-qat``, ``awq``,
    ``compressed-tensors`` or None (dense); ``names``: module names in the family's layout (sorted);
    ``sidecar``: the QAT layers (``grace-qat`` only); ``symmetric``: False when zero points may differ from 8."""

    method: str | None = None
    bits: int = 4
    group_size: int = 128
    names: list[str] = field(default_factory=list)
    symmetric: bool = True
    sidecar: dict[str, QatLayer] | None = None


@dataclass
class OpenedCheckpoint:
    """A checkpoint folder as the family reads it. ``format``: the container (``detect_format``) or the
    family's name for a dense layout of its own (e.g. ``llava-hf``); ``layout``: the key-name layout on
    disk; ``store`` answers with the family's key names; ``raw_config``: ``config.json`` as stored;
    ``quantization_config``: a foreign checkpoint's own ``quantization_config`` (None for GRACE)."""

    folder: Path
    format: str
    family: Family
    config: Any
    raw_config: dict
    store: TensorStore | MappedStore
    quantized: QuantizedLinears
    layout: str = ""
    quantization_config: dict | None = None

    def awq_tensors(self, name: str) -> AwqTensors:
        """The exact AWQ GEMM tensors of quantized linear ``name`` (QAT codes recovered, refused unless exact)."""
        q = self.quantized
        if q.bits != 4:
            raise CheckpointError(f"{self.folder}: {name} is a W{q.bits} layer; only 4-bit layers have an AWQ GEMM form")
        if q.sidecar is not None:
            layer = q.sidecar[name]
            try:
                return qat_to_awq(layer.weight, layer.log_scale, layer.bias, group_size=q.group_size, name=name)
            except FormatError as exc:
                raise CheckpointError(f"{self.folder / SIDECAR_NAME}: {exc}") from exc
        keys = [f"{name}.{s}" for s in ("qweight", "qzeros", "scales")]
        missing = [k for k in keys if k not in self.store]
        if missing:
            raise CheckpointError(f"{self.folder}: quantized module {name!r} has no {missing[0]!r}; the checkpoint "
                                  "is incomplete or its module list is wrong")
        bias = self.store.get(f"{name}.bias") if f"{name}.bias" in self.store else None
        return AwqTensors(*(self.store.get(k) for k in keys), bias, q.group_size)

    def int8_codes(self, name: str) -> Int8Codes:
        """The exact int8 codes and fp32 scales of W8 linear ``name``: recovered from a QAT sidecar (refused unless
        they reproduce the baked weight) or read from compressed-tensors 8-bit ``pack-quantized`` tensors."""
        q = self.quantized
        if q.bits != 8:
            raise CheckpointError(f"{self.folder}: {name} is a W{q.bits} layer, not W8")
        try:
            if q.sidecar is not None:
                layer = q.sidecar[name]
                return qat_to_int8(layer.weight, layer.log_scale, layer.bias, q.group_size, name)
            tensors = {s: self.store.get(f"{name}.{s}") for s in ("weight_packed", "weight_scale", "weight_shape")
                       if f"{name}.{s}" in self.store}
            bias = self.store.get(f"{name}.bias") if f"{name}.bias" in self.store else None
            return from_compressed_tensors_w8(tensors, q.group_size, bias, name)
        except FormatError as exc:
            raise CheckpointError(f"{self.folder}: {exc}") from exc

    def linear_shape(self, name: str) -> tuple[int, int]:
        """(out_features, in_features) of quantized linear ``name``, from metadata only."""
        if self.quantized.sidecar is not None:
            return tuple(self.quantized.sidecar[name].weight.shape)
        if f"{name}.weight_packed" in self.store:
            return tuple(int(v) for v in self.store.get(f"{name}.weight_shape").tolist())
        in_f, words = self.store.get_slice_shape(f"{name}.qweight")
        return words * 8, in_f

    def file_bytes(self) -> int:
        return self.store.file_bytes()


def grace_quantized(folder: Path, fmt: str, raw: dict) -> QuantizedLinears:
    """The quantized linears GRACE's own files declare: ``awq_quantized_modules.json`` (grace-awq) or the QAT
    sidecar (grace-qat, bits and group size from ``config.qat``); an empty set for other formats."""
    if fmt == "grace-awq":
        bits, group, names = read_awq_modules(folder)
        return QuantizedLinears("grace-awq", bits, group, names)
    if fmt == "grace-qat":
        qat = raw.get("qat") if isinstance(raw.get("qat"), dict) else {}
        try:
            layers = read_qat_sidecar(folder / SIDECAR_NAME)
        except FormatError as exc:
            raise CheckpointError(str(exc)) from exc
        return QuantizedLinears("grace-qat", int(qat.get("bits", 4)), int(qat.get("group_size", 128)),
                                sorted(layers), sidecar=layers)
    return QuantizedLinears()


def open_checkpoint(model: str | os.PathLike) -> OpenedCheckpoint:
    """Open a checkpoint folder or Hub id of any supported family and format (no model is built)."""
    folder = resolve_model_path(model)
    check_folder_readable(folder)
    fmt = detect_format(folder)
    if fmt == "gguf":
        raise CheckpointError(f"{folder} holds GGUF files, which are for llama.cpp; gracevlm loads the checkpoint "
                              "they were exported from (GRACE AWQ/QAT, AutoAWQ, compressed-tensors, llava-hf)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} not found: a checkpoint folder needs its config.json")
    raw = read_json_object(config_file)
    family = family_for_config(raw, str(config_file))
    return family.open(folder, fmt, raw)
