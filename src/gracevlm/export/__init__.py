"""Export a checkpoint to the formats other runtimes load. LLaVA: ``llava-hf`` (transformers, dense),
``compressed-tensors`` (vLLM / SGLang / transformers, W4A16 pack-quantized) and ``gguf`` (llama.cpp); Qwen3-VL:
``qwen3-vl-hf`` (transformers, dense) and ``compressed-tensors`` (W4A16 / W8A16). Each family says which formats it
writes and writes them (``models.registry.Family.export_writer``; LLaVA's writers live here, in ``hf`` and ``gguf``).

``export_model(model, fmt, out)`` reads the checkpoint tensors (any layout ``gracevlm.load`` reads), writes
into a temporary folder next to ``out`` and renames it into place only when complete, so a failed export
leaves nothing behind; every export folder gets a ``README.md`` model card (``export.card``).
Conversions that cannot keep the integer codes and scales exactly raise ``LossyExportError`` with the
reason; with ``allow_lossy=True`` they proceed and the report carries the max and mean absolute weight
error. See ``ExportReport``. ``export.check`` compares an export in its peer engine with gracevlm.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import GraceVLMError, InputError
from ..formats.checkpoint import replace_folder, write_json_atomic
from ..formats.publish import discard_temp_folder, new_temp_folder

FORMATS = ("llava-hf", "qwen3-vl-hf", "compressed-tensors", "gguf")  # the union; each family writes a subset
REPORT_NAME = "gracevlm_export.json"


class LossyExportError(GraceVLMError, ValueError):
    """The source quantization cannot be represented exactly in the target format."""


@dataclass
class WeightError:
    """Running max / mean absolute difference between written and exact weights."""

    max_abs: float = 0.0
    total_abs: float = 0.0
    count: int = 0

    def add(self, written, exact) -> None:
        diff = (written.double() - exact.double()).abs()
        self.max_abs = max(self.max_abs, float(diff.max()) if diff.numel() else 0.0)
        self.total_abs += float(diff.sum())
        self.count += diff.numel()

    @property
    def mean_abs(self) -> float:
        return self.total_abs / self.count if self.count else 0.0


@dataclass
class ExportReport:
    format: str
    source: str
    source_format: str
    out: str
    exact: bool = True                 # integer codes and scales carried over unchanged
    quantized_layers: int = 0
    group_size: int | None = None
    family: str = "llava"
    bits: int | None = None
    files: list[str] = field(default_factory=list)
    bytes: int = 0
    lossy: dict | None = None          # {"reasons": [...], "max_abs_weight_error", "mean_abs_weight_error"}
    rounding: dict | None = None       # dense dequantization rounding (llava-hf fp16), max/mean abs
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _finish_error(report: ExportReport, reasons: list[str], err: WeightError, allow_lossy: bool) -> None:
    if not reasons:
        return
    if not allow_lossy:
        raise LossyExportError("cannot export exactly: " + "; ".join(reasons) +
                               ". Pass --allow-lossy to convert anyway (the report gives the weight error)")
    report.exact = False
    report.lossy = {"reasons": reasons, "max_abs_weight_error": err.max_abs,
                    "mean_abs_weight_error": err.mean_abs}


def _check_bits(opened, fmt: str, bits: int | None) -> None:
    if bits is None:
        return
    if fmt != "compressed-tensors":
        raise InputError(f"--bits applies to compressed-tensors exports, not {fmt}")
    q = opened.quantized
    if q.method is None:
        if bits != 4:
            raise InputError(f"{opened.folder} is dense: only a W4 round-to-nearest export (--allow-lossy) is possible "
                             f"from it, not W{bits}")
        return
    if bits != q.bits:
        raise InputError(f"{opened.folder} holds W{q.bits} codes; a compressed-tensors export keeps them exactly "
                         f"(W{q.bits}A16) and cannot turn them into W{bits} (drop --bits, or export a W{bits} checkpoint)")


def export_model(model: str | os.PathLike, fmt: str, out: str | os.PathLike, force: bool = False,
                 allow_lossy: bool = False, dtype: str | None = None, progress: bool = False,
                 bits: int | None = None) -> ExportReport:
    """Export ``model`` (folder or Hub id) to ``fmt`` in folder ``out``; returns the report (also written
    to ``out/gracevlm_export.json``).

    ``dtype``: dtype of the dense tensors (default: the family's, ``Family.export_dtype``). LLaVA ``float16``
    (what vLLM/SGLang serve) rounds each dequantized llava-hf weight ``(u - z) * s`` once to fp16, exactly as the
    AWQ fp16 kernels do; ``float32`` keeps it exact. Qwen3-VL: ``bfloat16`` (as the releases), ``float16`` or
    ``float32``. ``bits`` (compressed-tensors): must be the source's (a request for other bits is refused).
    """
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    from ..models.checkpoint import open_checkpoint

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise InputError(f"{out} exists and is not empty; pass --force to replace it")
    opened = open_checkpoint(model)
    family = opened.family
    if fmt not in family.export_formats:
        raise InputError(f"{opened.folder} is a {family.name} checkpoint: it exports to "
                         f"{', '.join(family.export_formats) or 'no format yet'}, not {fmt!r}")
    dtype = dtype or family.export_dtype(fmt)
    _check_bits(opened, fmt, bits)
    writer = family.export_writer(fmt)
    if writer is None and dtype not in ("float16", "float32"):
        raise InputError(f"dtype {dtype!r} is not supported; choose float16 or float32")
    if writer is None:
        from .source import SourceModel

        src = SourceModel(model)
        report = ExportReport(fmt, str(src.folder), src.format, str(out), quantized_layers=len(src.quantized),
                              group_size=src.group_size if src.quantized else None, family=family.name)
    else:
        src = None
        report = ExportReport(fmt, str(opened.folder), opened.format, str(out), family=family.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_folder(out)  # stale ones from killed runs are removed first
    try:
        err, reasons = WeightError(), []
        if writer is not None:
            facts = writer(opened, fmt, tmp, dtype, progress)
            report.quantized_layers, report.group_size, report.bits = facts.quantized_layers, facts.group_size, \
                facts.bits
            report.rounding, report.notes = facts.rounding, list(facts.notes)
        elif fmt == "gguf":
            from .gguf import write_gguf

            write_gguf(src, tmp, report, err, reasons, allow_lossy, progress)
        else:
            from .hf import write_llava_hf

            write_llava_hf(src, tmp, report, err, reasons, allow_lossy, fmt == "compressed-tensors", dtype,
                           progress)
        _finish_error(report, reasons, err, allow_lossy)
        from .card import write_model_card

        write_model_card(tmp, report.as_dict())
        report.files = sorted(p.name for p in tmp.iterdir()) + [REPORT_NAME]
        report.bytes = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
        write_json_atomic(tmp / REPORT_NAME, report.as_dict())
        replace_folder(tmp, out)
    except BaseException:
        discard_temp_folder(tmp)
        raise
    return report


__all__ = ["FORMATS", "ExportReport", "LossyExportError", "export_model"]
