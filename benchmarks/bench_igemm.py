"""Benchmark of the integer prefill GEMM for INT4 layers (``native-igemm``, csrc/gv_igemm.c) against torch's
dense fp32 GEMM of the same shape, measured in the same run (printed, never asserted).

Per shape (in->out, GRACE zeros = 8, group 128) and rows M: the fastest of ``--rounds`` interleaved rounds
(each method once per round, so that load from other processes hits all methods alike) of
  torch-fp32   ``torch.mm(x, W^T)`` on the dequantized fp32 weight (the baseline; weights already dense)
  native       the current prefill path: exact fp32 tiles (gv_dequant) + torch.addmm
  native-igemm gv_igemm4: int16 weight panels x 16-bit fixed-point activations (vpmaddwd)
with the ratio ``torch-fp32 / method`` and the relative L2 error against the exact product in float64.

Usage: python benchmarks/bench_igemm.py [--shapes 4096x11008 ...] [--rows 512 ...] [--threads 1 2] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent / "tests"))
from int4_helpers import random_int4_layer  # noqa: E402

from gracevlm.formats.awq import dequantize_awq  # noqa: E402
from gracevlm.kernels import native, native_int8  # noqa: E402


def once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["4096x11008"], help="in x out")
    ap.add_argument("--rows", type=int, nargs="+", default=[512])
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if native_int8.load_library() is None or native.load_library() is None:
        print("native libraries unavailable", file=sys.stderr)
        return 1
    results = []
    for shape in args.shapes:
        in_f, out_f = (int(v) for v in shape.split("x"))
        layer = random_int4_layer(in_f, out_f, 128, False, True, torch.Generator().manual_seed(0))
        wt = dequantize_awq(layer.qweight, layer.qzeros, layer.scales, 128).contiguous()  # [I, O] fp32
        nat, ig = native.NativeBackend(), native_int8.NativeIGemmBackend()
        ig.gemm_min_rows = 1
        for threads in args.threads:
            torch.set_num_threads(threads)
            for m in args.rows:
                x = torch.randn(m, in_f, generator=torch.Generator().manual_seed(m))
                exact = (x.double() @ wt.double())
                methods = {"torch-fp32": lambda: torch.mm(x, wt), "native": lambda: nat.matmul(layer, x),
                           "native-igemm": lambda: ig.matmul(layer, x)}
                errs = {k: float((f().double() - exact).norm() / exact.norm()) for k, f in methods.items()}
                best = {k: float("inf") for k in methods}
                for _ in range(args.rounds):
                    for k, f in methods.items():
                        best[k] = min(best[k], once(f))
                for k in methods:
                    results.append(dict(shape=shape, threads=threads, rows=m, method=k, ms=best[k] * 1e3,
                                        vs_torch_fp32=best["torch-fp32"] / best[k], rel_err=errs[k]))
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"{'shape':>11} {'thr':>3} {'M':>5} {'method':>13} {'ms':>9} {'x torch':>8} {'rel err':>9}")
    for r in results:
        print(f"{r['shape']:>11} {r['threads']:>3} {r['rows']:>5} {r['method']:>13} {r['ms']:9.1f} "
              f"{r['vs_torch_fp32']:8.2f} {r['rel_err']:9.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
