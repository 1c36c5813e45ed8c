"""Benchmark of the native C INT4 backends against the torch CPU backends (printed, never asserted).

For each shape (out x in, LLaMA-7B linears, GRACE zeros = 8, group 128), thread count and rows M it prints
the median and minimum milliseconds, effective GB/s of packed weight bytes (qweight + qzeros + scales) at
the median, the speed-up over ``dense`` and the relative L2 error against ``reference``. On a shared
machine the minimum is the better estimate of the uncontended speed.

Methods: registered backends by name (``native``, ``native-f32``, ``native-i8x2``, ``dense``,
``int4pack-bf16``, ...) and, for the native ones, ``<name>:kernel`` / ``<name>:gemm`` to force the small-M
kernel or the dequantize + GEMM path (to measure the crossover ``gemm_min_rows``).
``--copies N`` cycles through N copies of each layer so that the weights come from DRAM, as in a model,
rather than from the last-level cache.

Usage: python benchmarks/bench_native.py [--shapes 4096x11008 ...] [--rows 1 2 4 ...] [--threads 1 2]
       [--methods native native:gemm dense ...] [--copies 16] [--budget 1.0] [--json]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch

from gracevlm import kernels
from gracevlm.formats.awq import dequantize_awq, pack_awq
from gracevlm.kernels import native
from gracevlm.nn import Int4Linear

SHAPES = ["4096x4096", "11008x4096", "4096x11008"]  # out x in: q/k/v/o, gate/up, down
ROWS = [1, 2, 4, 8, 16, 64, 512]
METHODS = ["native", "native-f32", "native-i8x2", "native:gemm", "dense", "int4pack-bf16"]


def timeit(fn, budget: float) -> tuple[float, float]:
    """(median, min) seconds of ``fn`` over the repeats that fit in ``budget`` (3..300, after a warm-up)."""
    fn()
    times: list[float] = []
    end = time.perf_counter() + budget
    while len(times) < 300 and (len(times) < 3 or time.perf_counter() < end):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], times[0]


def make_method(name: str):
    """``(layer, x) -> y`` for a backend name, optionally suffixed ``:kernel`` or ``:gemm``."""
    base, _, path = name.partition(":")
    backend = kernels.get_backend(base)
    if path:
        if not isinstance(backend, native.NativeBackend):
            raise SystemExit(f"{name}: only native backends take :kernel / :gemm")
        backend = copy.copy(backend)
        backend.gemm_min_rows = 1 if path == "gemm" else 1 << 30
    return backend.matmul


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=SHAPES)
    ap.add_argument("--rows", type=int, nargs="+", default=ROWS)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--max-kernel-rows", type=int, default=64, help="largest M for the forced :kernel methods")
    ap.add_argument("--copies", type=int, default=1, help="layer copies cycled through (weights from DRAM)")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of repeats per measurement")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    lib = native.load_library()
    if lib is None:
        print("native library unavailable", file=sys.stderr)
        return 1
    methods = {name: make_method(name) for name in args.methods}
    gen = torch.Generator().manual_seed(0)
    results = []
    print(f"torch {torch.__version__}, native isa={lib.gv_isa()} openmp={lib.gv_has_openmp()}, "
          f"copies={args.copies}", file=sys.stderr)
    for shape in args.shapes:
        out_f, in_f = map(int, shape.split("x"))
        codes = torch.randint(0, 16, (in_f, out_f), dtype=torch.uint8, generator=gen)
        qweight, qzeros = pack_awq(codes, torch.full((in_f // 128, out_f), 8, dtype=torch.uint8))
        scales = (torch.rand(in_f // 128, out_f, generator=gen) * 0.01 + 1e-3).half()
        layers = [Int4Linear.from_awq(qweight, qzeros, scales) for _ in range(args.copies)]
        w_ref = dequantize_awq(qweight, qzeros, scales, 128)  # what `reference` multiplies by
        nbytes = layers[0].nbytes()
        for nt in args.threads:
            torch.set_num_threads(nt)
            for m in args.rows:
                x = torch.randn(m, in_f, generator=gen)
                y_ref = x @ w_ref
                rows = []
                for name, fn in methods.items():
                    if name.endswith(":kernel") and m > args.max_kernel_rows:
                        continue
                    turn = iter(range(1 << 62))
                    med, low = timeit(lambda: fn(layers[next(turn) % len(layers)], x), args.budget)
                    err = float((fn(layers[0], x).float() - y_ref).norm() / y_ref.norm())
                    rows.append(dict(shape=shape, threads=nt, rows=m, method=name, ms=med * 1e3, min_ms=low * 1e3,
                                     gbps=nbytes / med / 1e9, rel_err=err))
                dense = next((r["ms"] for r in rows if r["method"] == "dense"), float("nan"))
                for row in rows:
                    row["vs_dense"] = dense / row["ms"]
                    if not args.json:
                        print(f"{shape:>11} t={nt} M={m:<4} {row['method']:<19} {row['ms']:9.3f} ms "
                              f"(min {row['min_ms']:8.3f}) {row['gbps']:6.2f} GB/s {row['vs_dense']:7.2f}x dense  "
                              f"err {row['rel_err']:.1e}", flush=True)
                results += rows
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
