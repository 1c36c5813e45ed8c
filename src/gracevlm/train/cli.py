"""``gracevlm train``: GRACE QAT + distillation (or plain QAT / full-precision training) of a LLaVA-1.5 or Qwen3-VL
model (student and teacher of the same family).

Data parallel: ``torchrun --nproc-per-node N -m gracevlm.train.cli --data ... --model ... --out ...``
(the same flags as ``gracevlm train``; gloo on CPU, nccl on CUDA).
"""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .trainer import METHODS, TrainConfig

    d = TrainConfig(data="", model="", out="")
    g = p.add_argument_group("data and models")
    g.add_argument("--data", required=True, help="LLaVA/ShareGPT4V conversation file (JSON list or JSON Lines)")
    g.add_argument("--image-folder", default=None, help="folder the records' 'image' paths are relative to")
    g.add_argument("--model", required=True, help="initial model: a dense LLaVA-1.5 or Qwen3-VL checkpoint folder")
    g.add_argument("--teacher", default=None,
                   help="teacher of the same family (grace; default: --model); may be quantized")
    g.add_argument("--out", required=True, help="output folder (log.jsonl, loss.png, checkpoints/, qat/, awq/)")
    g.add_argument("--method", choices=METHODS, default=d.method,
                   help="grace: LSQ + GDKD + RCKA + IB controller; qat: LSQ with CE only; fp: CE, no quantization")
    g.add_argument("--conv-mode", default=d.conv_mode,
                   help="LLaVA conversation template (default vicuna_v1); Qwen3-VL uses the checkpoint's template")
    g.add_argument("--max-length", type=int, default=None)
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default: from --epochs)")
    g.add_argument("--epochs", type=float, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="per process and micro-step")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--scale-lr", type=float, default=d.scale_lr, help="learning rate of the LSQ log-scales")
    g.add_argument("--vision-lr", type=float, default=None, help="vision tower learning rate (default: --lr)")
    g.add_argument("--projector-lr", type=float, default=None, help="projector learning rate (default: --lr)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    g.add_argument("--schedule", choices=["cosine", "constant"], default=d.schedule)
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    g.add_argument("--train-vision", action="store_true", help="also train the vision tower (frozen by default)")
    g.add_argument("--freeze-projector", action="store_true")
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("quantization and distillation")
    g.add_argument("--bits", type=int, default=d.bits)
    g.add_argument("--group-size", type=int, default=d.group_size)
    g.add_argument("--scale-init", choices=["mse", "max"], default=d.scale_init)
    g.add_argument("--temperature", type=float, default=d.temperature)
    g.add_argument("--dkd-alpha", type=float, default=d.dkd_alpha)
    g.add_argument("--dkd-beta", type=float, default=d.dkd_beta)
    g.add_argument("--ib-tau", type=float, default=d.ib_tau)
    g.add_argument("--ib-eta", type=float, default=d.ib_eta)
    g.add_argument("--ib-beta-init", type=float, default=d.ib_beta_init)
    g.add_argument("--ib-beta-min", type=float, default=d.ib_beta_min)
    g.add_argument("--ib-beta-max", type=float, default=d.ib_beta_max)
    g.add_argument("--ib-ema-decay", type=float, default=d.ib_ema_decay)
    g.add_argument("--rcka-weight", type=float, default=d.rcka_weight)
    g.add_argument("--rcka-warmup", type=int, default=d.rcka_warmup)
    g.add_argument("--rcka-layer", type=int, default=d.rcka_layer)
    g = p.add_argument_group("checkpoints and output")
    g.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps (0: at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from the latest checkpoint in --out (or from the given checkpoint folder)")
    g.add_argument("--stop-after", type=int, default=None, help="run at most N steps now, checkpoint and exit")
    g.add_argument("--no-export", action="store_true", help="do not write the final model folders")
    g.add_argument("--export-dtype", choices=["float16", "bfloat16", "float32"], default=d.export_dtype,
                   help="dtype of the exported tensors (default: the family's release dtype: Qwen3-VL bfloat16, "
                        "LLaVA float16)")
    g.add_argument("--log-every", type=int, default=d.log_every)
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--no-plot", action="store_true", help="do not draw loss.png")
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--device", default=d.device)
    g.add_argument("--json", action="store_true", help="print the summary as JSON")


def config_from_args(args) -> "TrainConfig":
    from .trainer import TrainConfig

    return TrainConfig(
        data=args.data, model=args.model, out=args.out, image_folder=args.image_folder, method=args.method,
        teacher=args.teacher, steps=args.steps, epochs=args.epochs, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, scale_lr=args.scale_lr,
        vision_lr=args.vision_lr, projector_lr=args.projector_lr, weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio, schedule=args.schedule, max_grad_norm=args.max_grad_norm,
        bits=args.bits, group_size=args.group_size, scale_init=args.scale_init, temperature=args.temperature,
        dkd_alpha=args.dkd_alpha, dkd_beta=args.dkd_beta, ib_tau=args.ib_tau, ib_eta=args.ib_eta,
        ib_beta_init=args.ib_beta_init, ib_beta_min=args.ib_beta_min, ib_beta_max=args.ib_beta_max,
        ib_ema_decay=args.ib_ema_decay, rcka_weight=args.rcka_weight, rcka_warmup=args.rcka_warmup,
        rcka_layer=args.rcka_layer, train_vision=args.train_vision, train_projector=not args.freeze_projector,
        conv_mode=args.conv_mode, max_length=args.max_length, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, resume=args.resume, stop_after=args.stop_after, seed=args.seed,
        log_every=args.log_every, progress=not args.no_progress, plot=not args.no_plot, export=not args.no_export,
        export_dtype=args.export_dtype, threads=args.threads, device=args.device)


def cmd_train(args) -> int:
    from .trainer import train

    summary = train(config_from_args(args))
    if summary.get("out") and _is_main():
        if args.json:
            print(json.dumps(summary))
        else:
            last = summary.get("last") or {}
            state = "finished" if summary["finished"] else "stopped (resume with --resume)"
            print(f"{state} at step {summary['steps']}/{summary['total_steps']}, last loss "
                  f"{last.get('loss', float('nan')):.4f}; outputs in {summary['out']}", file=sys.stderr)
            for key in ("model", "qat", "awq"):
                if key in summary:
                    print(f"{key}: {summary[key]}")
    return 0


def _is_main() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``train`` to the ``gracevlm`` sub-command parsers."""
    p = subparsers.add_parser("train", help="GRACE QAT + distillation training (LSQ W4G128, GDKD, RCKA, IB)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m gracevlm.train.cli`` (what torchrun launches)."""
    from ..errors import GraceVLMError

    parser = argparse.ArgumentParser(prog="gracevlm train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_train(args)
    except GraceVLMError as exc:
        print(f"gracevlm train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
