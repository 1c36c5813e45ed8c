"""Command-line interface: ``gracevlm <command> ...``. Each command parses its flags and calls a typed function."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import GraceVLMError


def cmd_selfcheck(args) -> int:
    """Pack random codes, run every INT4 backend and compare with the exact reference."""
    import torch

    from . import kernels
    from .formats.awq import pack_awq, unpack_awq
    from .nn import Int4Linear

    gen = torch.Generator().manual_seed(args.seed)
    codes = torch.randint(0, 16, (256, 96), dtype=torch.uint8, generator=gen)
    zeros = torch.full((2, 96), 8, dtype=torch.uint8)
    qweight, qzeros = pack_awq(codes, zeros)
    assert torch.equal(unpack_awq(qweight, qzeros)[0], codes), "pack/unpack round trip failed"
    layer = Int4Linear.from_awq(qweight, qzeros, (torch.rand(2, 96, generator=gen) * 0.01).half())
    xs = {rows: torch.randn(rows, 256, generator=gen) for rows in (4, 64)}  # decode-like and prefill-like
    layer.backend = "reference"
    refs = {rows: layer(x) for rows, x in xs.items()}
    report = {}
    for name in kernels.backend_names():
        if not kernels.get_backend(name).available(layer.device):
            print(f"backend {name:<14} not available on {layer.device.type} (see gracevlm doctor)")
            continue
        layer.backend = name
        errs = {rows: float((layer(x) - refs[rows]).norm() / refs[rows].norm()) for rows, x in xs.items()}
        report[name] = {f"rows_{rows}": e for rows, e in errs.items()}
        print(f"backend {name:<14} relative error vs reference: "
              + ", ".join(f"{rows} rows {e:.2e}" for rows, e in errs.items()))
    print("pack/unpack round trip: exact")
    if args.json:
        print(json.dumps(report))
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from .demo import MODEL_DIR

    p.add_argument("--model", default=str(MODEL_DIR),
                   help="checkpoint folder or Hugging Face Hub id (default: the bundled GRACE W4 demo model)")
    p.add_argument("--backend", default=None, help="INT4 kernel: auto (default), reference, dense, int4pack, ...")
    p.add_argument("--quantize", choices=["rtn"], default=None,
                   help="quantize a plain fp16 checkpoint at load (round-to-nearest W4G128)")
    p.add_argument("--device", default="auto")
    p.add_argument("--conv-mode", default=None, help="conversation template (default: from the checkpoint)")
    p.add_argument("--vision-dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="dtype of the vision tower and projector (default: the model's; bfloat16 is ~3x faster "
                        "per image on CPUs with AMX/AVX512-BF16, features ~1e-2 relative off fp32)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed, stop=args.stop)


def _load(args):
    from .engine.vlm import load

    return load(args.model, device=args.device, backend=args.backend, quantize=args.quantize,
                conv_mode=args.conv_mode, vision_dtype=getattr(args, "vision_dtype", None),
                prefix_cache_gib=getattr(args, "prefix_cache_gib", 0.0), kv_dtype=getattr(args, "kv_dtype", None),
                kv_cache_gib=getattr(args, "kv_cache_gib", None))


def _load_summary(vlm) -> dict:
    stats = vlm.loaded.stats
    return {"format": stats.format, "seconds": round(stats.load_seconds, 3), "bytes_by_part": stats.bytes_by_part}


def cmd_run(args) -> int:
    vlm = _load(args)
    summary = _load_summary(vlm)
    if args.json:
        gen = vlm.generate(args.query, images=args.image or None, **_sampling_kwargs(args))
        print(json.dumps({**gen.as_dict(), "load": summary}, ensure_ascii=False))
        return 0
    parts = ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in summary["bytes_by_part"].items())
    print(f"[loaded {summary['format']} in {summary['seconds']:.1f}s: {parts}]", file=sys.stderr)
    from .engine.generate import Generation

    res = Generation("", [], [], "length")
    for delta in vlm.stream(args.query, images=args.image or None, result=res, **_sampling_kwargs(args)):
        print(delta, end="", flush=True)
    print()
    t = res.timings
    print(f"[{len(res.token_ids)} tokens, prefill {t.prefill_tokens} tok in {t.prefill_s:.2f}s "
          f"({t.prefill_tok_s:.1f} tok/s), decode {t.decode_tok_s:.2f} tok/s, first token {t.ttft_s:.2f}s, "
          f"finish={res.finish_reason}]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from .engine.generate import Generation

    vlm = _load(args)
    print(f"gracevlm chat - {vlm.path.name} ({vlm.conv_mode}). Commands: /image PATH, /reset, /quit",
          file=sys.stderr)
    messages: list[dict] = []
    pending: list = []  # images decoded once, as attached
    while True:
        try:
            line = input("USER: ")
        except EOFError:
            print()
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            messages, pending = [], []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                pending.append(vlm.decode_image(path))
            except GraceVLMError as exc:
                print(f"error: {exc}", file=sys.stderr)
                continue
            print(f"(image attached: {path})", file=sys.stderr)
            continue
        content = [{"type": "image", "image": p} for p in pending] + [{"type": "text", "text": line}]
        messages.append({"role": "user", "content": content})
        pending = []
        res = Generation("", [], [], "length")
        print("ASSISTANT: ", end="", flush=True)
        try:
            for delta in vlm.stream_chat(messages, res, **_sampling_kwargs(args)):
                print(delta, end="", flush=True)
        except GraceVLMError as exc:
            messages.pop()
            print(f"\nerror: {exc}", file=sys.stderr)
            continue
        print()
        messages.append({"role": "assistant", "content": res.text})


def cmd_inspect(args) -> int:
    from .formats.hub import resolve_model_path
    from .models.inspect import format_report, inspect_checkpoint

    from pathlib import Path
    path = Path(args.path)
    info = inspect_checkpoint(path if path.is_file() else resolve_model_path(args.path))
    print(json.dumps(info, indent=1) if args.json else format_report(info))
    return 0 if info["ok"] else 1


def cmd_synth(args) -> int:
    from .errors import InputError
    from .synth.checkpoint import synthesize
    from .synth.qwen3_vl import QWEN_PRESETS, synthesize_qwen3_vl

    if args.preset in QWEN_PRESETS:
        out = synthesize_qwen3_vl(args.out, args.preset, args.format, seed=args.seed, force=args.force,
                                  layers=args.layers, bits=args.bits)
    else:
        if args.bits != 4:
            raise InputError(f"--bits {args.bits}: LLaVA presets are W4 only")
        out = synthesize(args.out, args.preset, args.format, seed=args.seed, force=args.force, layers=args.layers)
    print(out)
    return 0


def cmd_pack(args) -> int:
    from .errors import CheckpointError
    from .formats.pack import pack_qat_checkpoint
    from .models.checkpoint import open_checkpoint

    opened = open_checkpoint(args.qat)  # a checkpoint of a known family, config and sidecar readable
    if opened.quantized.method != "grace-qat":
        raise CheckpointError(f"{opened.folder} is a {opened.format!r} checkpoint; gracevlm pack converts GRACE QAT "
                              "checkpoints (with qat_quantized_weights.bin)")
    if opened.quantized.bits != 4:
        raise CheckpointError(f"{opened.folder} is a W{opened.quantized.bits} QAT checkpoint; GRACE AWQ (what pack "
                              "writes) is 4-bit only: `gracevlm export --format compressed-tensors` writes it as "
                              f"W{opened.quantized.bits}A16 pack-quantized, codes exact")
    report = pack_qat_checkpoint(opened.folder, args.out, force=args.force)
    print(json.dumps(report.as_dict()) if args.json else
          f"packed {report.layers} layers into {args.out}: codes exact (max code error {report.max_code_error}), "
          f"{report.qat_bytes / 2**20:.1f} MiB -> {report.awq_bytes / 2**20:.1f} MiB")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .engine.prefix_cache import DEFAULT_PREFIX_CACHE_GIB

    parser = argparse.ArgumentParser(prog="gracevlm", description="Run, serve and convert 4-bit GRACE VLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="answer one question about images")
    _add_model_args(p)
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--query", required=True)
    p.add_argument("--json", action="store_true", help="print one JSON object with text, ids and timings")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive multi-turn chat (/image PATH, /reset, /quit)")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--prefix-cache-gib", type=float, default=DEFAULT_PREFIX_CACHE_GIB,
                   help="KV blocks of prompt prefixes and image features kept across requests, in GiB (default 2; 0: off). Exact: with it on, prefill runs in 64-position block-aligned chunks, so a hit gives the same bits as a miss")
    p.add_argument("--kv-dtype", choices=["float32", "float16", "bfloat16"], default=None, help="dtype K/V are stored in (default: the compute dtype, float32 on CPU, exact; half types halve KV memory, logits move ~1e-3 relative, README)")
    p.add_argument("--kv-cache-gib", type=float, default=None, help="KV pool in GiB: the KV of every request and the prefix cache share it; a request reserves prompt + max_tokens positions when admitted and waits in the queue while they do not fit (default: half the memory available after loading)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("inspect", help="describe a checkpoint folder")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("synth", help="write a random-weight checkpoint in the exact GRACE layout")
    p.add_argument("--preset", default="tiny",
                   choices=["tiny", "small", "llava-1.5-7b", "qwen3-vl-tiny", "qwen3-vl-2b"])
    p.add_argument("--format", default="awq", choices=["awq", "qat", "qat8", "fp16", "bf16"],
                   help="LLaVA presets: awq, qat, fp16; Qwen3-VL presets: awq, qat (W4), qat8 (W8), bf16")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=None, help="override the preset's number of LLM layers")
    p.add_argument("--bits", type=int, default=4, choices=[4, 8],
                   help="quantized bits (8: Qwen3-VL --format qat only, GRACE W8G128)")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("pack", help="QAT checkpoint -> GRACE AWQ checkpoint (verified bit-exact)")
    p.add_argument("--qat", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_pack)

    from .eval.cli import register as register_eval
    from .export.cli import register as register_export
    from .server.cli import register as register_serve
    from .train.cli import register as register_train
    from .demo.cli import register as register_demo
    register_demo(sub)
    register_train(sub)
    register_eval(sub)
    register_export(sub)
    register_serve(sub)

    p = sub.add_parser("bench", help="measure kernels, decode/prefill speed, memory (vs baselines, same run)")
    from .bench import add_arguments, run_cli
    add_arguments(p)
    p.set_defaults(func=run_cli)

    p = sub.add_parser("doctor", help="which kernel path each layer uses here and why; what to install for faster")
    from .doctor import add_arguments as doctor_arguments, run_cli as doctor_cli
    doctor_arguments(p)
    p.set_defaults(func=doctor_cli)

    p = sub.add_parser("selfcheck", help="check the INT4 kernels against the exact reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_selfcheck)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except GraceVLMError as exc:
        print(f"gracevlm: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from .diskfull import no_space_message

        message = no_space_message(exc, *(getattr(args, k, None) for k in ("out", "answers_file", "output")))
        if message is None:
            raise
        print(f"gracevlm: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
