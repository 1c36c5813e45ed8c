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
    x = torch.randn(4, 256, generator=gen)
    layer.backend = "reference"
    ref = layer(x)
    report = {}
    for name in kernels.backend_names():
        layer.backend = name
        err = float((layer(x) - ref).norm() / ref.norm())
        report[name] = err
        print(f"backend {name:<14} relative error vs reference {err:.2e}")
    print("pack/unpack round trip: exact")
    if args.json:
        print(json.dumps(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gracevlm", description="Run, serve and convert 4-bit GRACE VLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
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


if __name__ == "__main__":
    raise SystemExit(main())
