"""INT4 matmul benchmark on the LLaMA-7B linear shapes (not a test; numbers are printed, never asserted).

For each shape (out x in) and rows M it prints milliseconds, effective GB/s of packed weight bytes
(qweight + qzeros + scales) and the speed-up over the baseline measured in the same run:
  baseline   what the GRACE release does on CPU: unpack + dequantize the whole matrix to fp16 on every
             call, then an fp16 matmul (our own re-implementation of that approach)
  <backend>  every registered gracevlm backend
  dense-fp32 / dense-bf16   a plain torch matmul with an already dense weight (no quantization)

Usage: python benchmarks/bench_int4.py [--rows 1 8 64 512] [--shapes 4096x4096 ...] [--budget 2.0] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from gracevlm import kernels
from gracevlm.formats.awq import dequantize_awq, pack_awq
from gracevlm.nn import Int4Linear

SHAPES = ["4096x4096", "11008x4096", "4096x11008"]  # out x in: q/k/v/o, gate/up, down


def grace_style_baseline(layer: Int4Linear, x: torch.Tensor) -> torch.Tensor:
    w = dequantize_awq(layer.qweight, layer.qzeros, layer.scales, layer.group_size, dtype=torch.float16)
    return (x.to(torch.float16) @ w).to(x.dtype)


def timeit(fn, budget: float) -> float:
    """Median seconds of ``fn`` over repeats that fit in ``budget`` seconds (at least one, after a warm-up)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > budget:
        return first
    times = []
    end = time.perf_counter() + budget
    while len(times) < 50 and (not times or time.perf_counter() < end):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 512])
    ap.add_argument("--shapes", nargs="+", default=SHAPES)
    ap.add_argument("--budget", type=float, default=1.5, help="seconds of repeats per measurement")
    ap.add_argument("--skip-slower-than", type=float, default=3.0,
                    help="skip a method at larger M once it is this many times slower than the baseline "
                         "and takes over 2 s")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    gen = torch.Generator().manual_seed(0)
    results = []
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}", file=sys.stderr)
    for shape in args.shapes:
        out_f, in_f = map(int, shape.split("x"))
        codes = torch.randint(0, 16, (in_f, out_f), dtype=torch.uint8, generator=gen)
        qweight, qzeros = pack_awq(codes, torch.full((in_f // 128, out_f), 8, dtype=torch.uint8))
        scales = (torch.rand(in_f // 128, out_f, generator=gen) * 0.01 + 1e-3).half()
        layer = Int4Linear.from_awq(qweight, qzeros, scales)
        nbytes = layer.nbytes()
        dense32 = dequantize_awq(qweight, qzeros, scales, 128)
        dense16 = dense32.to(torch.bfloat16)
        slow: set[str] = set()
        for m in args.rows:
            x = torch.randn(m, in_f, generator=gen)
            xb = x.to(torch.bfloat16)
            methods = {"baseline": lambda: grace_style_baseline(layer, x)}
            for name in kernels.backend_names():
                methods[name] = (lambda n=name: kernels.get_backend(n).matmul(layer, x))
            methods["dense-fp32"] = lambda: x @ dense32
            methods["dense-bf16"] = lambda: xb @ dense16
            base = None
            for name, fn in methods.items():
                if name in slow:
                    continue
                sec = timeit(fn, args.budget)
                base = sec if name == "baseline" else base
                row = dict(shape=shape, rows=m, method=name, ms=sec * 1e3, gbps=nbytes / sec / 1e9,
                           speedup=base / sec)
                results.append(row)
                if name != "baseline" and sec > max(args.skip_slower_than, 2.0 / base) * base:
                    slow.add(name)  # hopeless at this M; larger M only gets worse
                if not args.json:
                    print(f"{shape:>11} M={m:<4} {name:<14} {row['ms']:10.2f} ms {row['gbps']:8.2f} GB/s "
                          f"{row['speedup']:8.2f}x vs baseline", flush=True)
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
