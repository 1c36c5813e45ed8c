"""Export a checkpoint to the formats other runtimes load: ``llava-hf`` (transformers, dense),
``compressed-tensors`` (vLLM / SGLang / transformers, W4A16 pack-quantized) and ``gguf`` (llama.cpp).

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

FORMATS = ("llava-hf", "compressed-tensors", "gguf")
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


def export_model(model: str | os.PathLike, fmt: str, out: str | os.PathLike, force: bool = False,
                 allow_lossy: bool = False, dtype: str = "float16", progress: bool = False) -> ExportReport:
    """Export ``model`` (folder or Hub id) to ``fmt`` in folder ``out``; returns the report (also written
    to ``out/gracevlm_export.json``).

    ``dtype`` (llava-hf and compressed-tensors): dtype of the dense tensors. ``float16`` (default, what
    vLLM/SGLang serve) rounds each dequantized llava-hf weight ``(u - z) * s`` once to fp16, exactly as
    the AWQ fp16 kernels do; ``float32`` keeps it exact.
    """
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if dtype not in ("float16", "float32"):
        raise InputError(f"dtype {dtype!r} is not supported; choose float16 or float32")
    from .source import SourceModel

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise InputError(f"{out} exists and is not empty; pass --force to replace it")
    src = SourceModel(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_folder(out)  # stale ones from killed runs are removed first
    report = ExportReport(fmt, str(src.folder), src.format, str(out), quantized_layers=len(src.quantized),
                          group_size=src.group_size if src.quantized else None)
    try:
        err, reasons = WeightError(), []
        if fmt == "gguf":
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
