"""A ``TensorStore`` seen through a rename (and repack) plan: how a foreign checkpoint layout is presented
under a model family's own key names with AWQ triples for its quantized linears. Pure: the plan comes from
the family (``models/<family>/weights.py``)."""
from __future__ import annotations

import torch

from ..errors import CheckpointError, FormatError
from .checkpoint import TensorStore
from .checkpoint import awq_settings
from .compressed_tensors import CT_SUFFIXES, ct_scheme, ct_to_awq

AWQ_SUFFIXES = ("qweight", "qzeros", "scales")


class MappedStore:
    """``TensorStore`` interface over renamed (and, for compressed-tensors, repacked) tensors.

    ``plan`` maps an original key to ``("copy", source_key)`` or ``("ct", module, suffix)``; repacked
    modules are converted once and the last one is cached (readers fetch qweight/qzeros/scales in turn).
    ``bits``: the quantized linears' width (8: their compressed-tensors tensors are presented as stored, under the
    module's new name; AWQ GEMM holds only 4 bits)."""

    def __init__(self, base: TensorStore, plan: dict[str, tuple], group_size: int = 128, bits: int = 4):
        self.base = base
        self.folder = base.folder
        self.plan = plan
        self.group_size = group_size
        self.bits = bits
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


def mapped_view(base: TensorStore, rename, fmt: str, quantization_config: dict | None,
                source: str, ct_bits: tuple[int, ...] = (4,)) -> tuple[MappedStore, list[str], int, bool]:
    """Present ``base`` under new key names (``rename(key)`` -> new name, or None to drop the tensor) with AWQ
    triples for the quantized linears of an ``awq`` or ``compressed-tensors`` checkpoint (``fmt``; any other
    value: renaming only). ``ct_bits``: the compressed-tensors widths the caller reads (an 8-bit checkpoint keeps
    its ``weight_packed``/``weight_scale``/``weight_shape``, renamed; see ``MappedStore.bits``). Returns (store,
    sorted quantized module names, group size, symmetric)."""
    qc = quantization_config or {}
    group, symmetric, bits = 128, True, 4
    if fmt == "awq":
        group, _ = awq_settings(qc, source)
    elif fmt == "compressed-tensors":
        bits, group, symmetric = ct_scheme(qc, source, ct_bits)
    plan: dict[str, tuple] = {}
    modules: set[str] = set()
    for key in base.keys():
        new = rename(key)
        if new is None:
            continue
        if fmt == "compressed-tensors" and key.rsplit(".", 1)[-1] in CT_SUFFIXES:
            foreign_module, suffix = key.rsplit(".", 1)
            module = new.rsplit(".", 1)[0]
            if bits == 8:
                if suffix in ("weight_zero_point", "weight_g_idx"):
                    raise CheckpointError(f"{base.folder}: {key}: 8-bit layers with zero points or activation "
                                          "reordering are not supported (symmetric W8A16 only)")
                plan[new] = ("copy", key)
                if suffix == "weight_packed":
                    modules.add(module)
                continue
            if suffix == "weight_packed":
                modules.add(module)
                for s in AWQ_SUFFIXES:
                    plan[f"{module}.{s}"] = ("ct", module, s, foreign_module)
            continue
        if new in plan:
            raise CheckpointError(f"{base.folder}: tensors {plan[new][1]!r} and {key!r} both map to {new!r}")
        plan[new] = ("copy", key)
        if fmt == "awq" and new.endswith(".qweight"):
            modules.add(new[: -len(".qweight")])
    if fmt == "awq":
        for m in modules:
            if f"{m}.qzeros" not in plan:
                raise CheckpointError(f"{base.folder}: AWQ layer {m} has no qzeros; zero_point=false AWQ checkpoints "
                                      "are not supported")
    if fmt in ("awq", "compressed-tensors") and not modules:
        raise CheckpointError(f"{base.folder}: quantization_config says {fmt!r} but no quantized tensors were found")
    return MappedStore(base, plan, group, bits), sorted(modules), group, symmetric
