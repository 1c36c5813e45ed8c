"""``gracevlm export --model M --format {llava-hf,compressed-tensors,gguf} --out DIR [--force] [--allow-lossy]``."""
from __future__ import annotations

import argparse
import json

from . import FORMATS


def cmd_export(args) -> int:
    from . import export_model

    report = export_model(args.model, args.format, args.out, force=args.force, allow_lossy=args.allow_lossy,
                          dtype=args.dtype, progress=not args.json)
    if args.json:
        print(json.dumps(report.as_dict()))
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
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help="export to llava-hf (transformers), compressed-tensors (vLLM/SGLang) "
                                             "or GGUF (llama.cpp)")
    p.add_argument("--model", required=True, help="checkpoint folder or Hugging Face Hub id")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--allow-lossy", action="store_true",
                   help="convert even when the target cannot hold the quantization exactly; reports the error")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                   help="dense tensors of llava-hf / compressed-tensors (float32 keeps llava-hf weights exact)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_export)
    return p
