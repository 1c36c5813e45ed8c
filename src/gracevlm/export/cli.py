"""``gracevlm export --model M --format {llava-hf,qwen3-vl-hf,compressed-tensors,gguf} --out DIR [--force]
[--allow-lossy] [--dtype D] [--bits B] [--check ENGINE ...]`` (each family writes its own formats).

With ``--check``, an ``--out`` that already holds a gracevlm export of ``--format`` is checked as it is (no
re-export unless ``--force``); otherwise the export is written first. See ``export.check``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import FORMATS
from .check import ENGINES


def _existing_export(out: Path, fmt: str) -> dict | None:
    from . import REPORT_NAME

    report = out / REPORT_NAME
    if not report.is_file():
        return None
    data = json.loads(report.read_text(encoding="utf-8"))
    return data if data.get("format") == fmt else None


def _run_checks(args, out: Path) -> list:
    from .card import write_model_card
    from .check import check_export

    results = [check_export(out, engine, model=args.model, vllm_url=args.vllm_url) for engine in args.check]
    write_model_card(out, checks=[r.as_dict() for r in results])
    return results


def cmd_export(args) -> int:
    from . import ExportReport, export_model

    out = Path(args.out)
    existing = _existing_export(out, args.format) if args.check and not args.force else None
    if existing is not None:
        report = ExportReport(**existing)
        if not args.json:
            print(f"checking the existing {args.format} export in {out} (pass --force to export again)")
    else:
        report = export_model(args.model, args.format, args.out, force=args.force, allow_lossy=args.allow_lossy,
                              dtype=args.dtype, progress=not args.json, bits=args.bits)
    checks = _run_checks(args, out) if args.check else []
    if args.json:
        print(json.dumps({**report.as_dict(), "checks": [c.as_dict() for c in checks]} if checks else report.as_dict()))
        return 0
    if existing is not None:
        for c in checks:
            for line in c.lines():
                print(f"  check {line}")
        return 0
    state = "exact (codes and scales unchanged)" if report.exact else "LOSSY"
    print(f"exported {report.source} ({report.source_format}) -> {report.out} [{report.format}]: {state}")
    if report.lossy:
        print(f"  lossy: {'; '.join(report.lossy['reasons'])}")
        print(f"  weight error: max {report.lossy['max_abs_weight_error']:.3g}, "
              f"mean {report.lossy['mean_abs_weight_error']:.3g}")
    if report.rounding:
        print(f"  dense weights: {report.rounding['rule']}; max abs rounding {report.rounding['max_abs']:.3g}")
    for note in report.notes:
        print(f"  {note}")
    print(f"  files: {', '.join(report.files)} ({report.bytes / 2**20:.1f} MiB)")
    for c in checks:
        for line in c.lines():
            print(f"  check {line}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help="export to transformers (llava-hf, qwen3-vl-hf), compressed-tensors "
                                             "(vLLM/SGLang) or GGUF (llama.cpp)")
    p.add_argument("--model", required=True, help="checkpoint folder or Hugging Face Hub id")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--allow-lossy", action="store_true",
                   help="convert even when the target cannot hold the quantization exactly; reports the error")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="dense tensors of the transformers / compressed-tensors folders (default: LLaVA float16, "
                        "Qwen3-VL bfloat16; float32 keeps dequantized weights exact)")
    p.add_argument("--bits", type=int, default=None, choices=[4, 8],
                   help="compressed-tensors: the bit width to write; must be the source's (default: the source's)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--check", action="append", default=[], choices=ENGINES, metavar="ENGINE",
                   help="after exporting (or on an existing export in --out), greedy-decode fixed prompts in a "
                        "peer engine and compare tokens with gracevlm: transformers, llama_cpp (if "
                        "llama-cpp-python is installed), vllm (with --vllm-url); repeatable")
    p.add_argument("--vllm-url", help="base URL of a vLLM OpenAI server serving the export (for --check vllm)")
    p.set_defaults(func=cmd_export)
    return p
