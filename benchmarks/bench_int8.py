"""Benchmark of the INT8 (W8G128) backends of ``nn.Int8Linear`` against the memory-bandwidth limit and torch's
dense fp32 matmul, all measured in the same run (printed, never asserted).

Bandwidth limit: the highest of ``gracevlm.bench.measure_bandwidth`` (best of torch ``sum`` and the native
``gv_stream_read`` over 1 GiB), ``gv_stream_read`` over the working set in chunks of one layer's bytes,
timed exactly as the kernels are (below), and the rate torch-fp32 reaches, all in the same run.
Per shape (in->out; Qwen3-VL-2B's 2048->6144 gate/up, 6144->2048 down, 2048->2048 q/o), rows M and method, the fastest of ``--rounds`` interleaved rounds; each round calls the
method once on each of N copies of the layer (together >= ``--working-set`` MiB, beyond the last-level
cache, as in a decode step where each weight is read once per token); a copy's time is its fastest call
over the rounds (the machine is shared: the minimum estimates the uncontended speed; the bandwidth is a
best-of-5 too), and the figure is the mean over the copies.
Columns: ms per call, GB/s of weight bytes read (codes + fp32 scales; fp32 weights for torch), the
fraction of the bandwidth limit (``of_bw``: limit time / measured time), the speed-up over torch-fp32.

Methods: ``native`` (gv8_matmul below its crossover, exact tiles + addmm above), ``native:kernel`` (gv8_matmul
at every M), ``dense`` (exact fp32 tiles + addmm), ``native-i16`` (approximate integer GEMM), ``torch-fp32``
(``x @ W^T`` with the fp32 weight ``q * s``, the baseline).

Usage: python benchmarks/bench_int8.py [--shapes 2048x6144 ...] [--rows 1 ...] [--rounds 5] [--working-set 320]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch

from gracevlm.bench import measure_bandwidth
from gracevlm.kernels import native, native_int8
from gracevlm.nn import Int8Linear

SHAPES = ["2048x6144", "6144x2048", "2048x2048"]  # in x out
METHODS = ["native", "dense", "torch-fp32"]


def random_layer(in_f, out_f, gen) -> Int8Linear:
    q = torch.randint(-128, 128, (out_f, in_f), dtype=torch.int8, generator=gen)
    s = torch.rand(out_f, in_f // 128, generator=gen) * 0.01 + 1e-4
    return Int8Linear(q, s, None, 128)


def chunked_bandwidth(chunk: int, total: int, rounds: int, threads: int) -> float:
    """GB/s of ``gv_stream_read`` over ``total`` bytes in chunks of ``chunk`` bytes, timed like the kernels: each
    chunk's fastest read over ``rounds`` passes, the mean over the chunks."""
    lib = native.load_library()
    chunk = chunk // 64 * 64
    n = max(1, total // chunk)
    buf = torch.ones(n * chunk // 4)
    best = [float("inf")] * n
    for _ in range(rounds + 1):
        for i in range(n):
            t0 = time.perf_counter()
            lib.gv_stream_read(buf.data_ptr() + i * chunk, chunk, threads)
            best[i] = min(best[i], time.perf_counter() - t0)
    return chunk / (sum(best) / n) / 1e9


def method_fn(name: str):
    if name == "torch-fp32":
        return lambda w, x: x @ w.t()
    base, _, path = name.partition(":")
    backend = native_int8.INT8_BACKENDS[base]
    if path == "kernel":
        backend = copy.copy(backend)
        backend.gemm_min_rows = 1 << 30
    return lambda layer, x: backend.matmul(layer, x)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=SHAPES, help="in x out")
    ap.add_argument("--rows", type=int, nargs="+", default=[1])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch and kernel threads (default: torch's)")
    ap.add_argument("--working-set", type=int, default=320, help="MiB of weights cycled through per method")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if native_int8.load_library() is None:
        print("native INT8 library unavailable", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    bw_pass = measure_bandwidth(1.0)
    bws = {}
    gen = torch.Generator().manual_seed(0)
    results = []
    for shape in args.shapes:
        in_f, out_f = (int(v) for v in shape.split("x"))
        layer = random_layer(in_f, out_f, gen)
        nbytes = layer.nbytes()
        bws[shape] = bw = max(bw_pass, chunked_bandwidth(nbytes, args.working_set << 20, args.rounds,
                                                         native.num_threads()))
        n8 = max(1, (args.working_set << 20) // nbytes)
        layers = [layer] + [Int8Linear(layer.qweight.clone(), layer.scales.clone(), None, 128) for _ in range(n8 - 1)]
        dense = layer.dequantize()
        n32 = max(1, (args.working_set << 20) // (dense.numel() * 4))
        denses = [dense] + [dense.clone() for _ in range(n32 - 1)]
        for m in args.rows:
            x = torch.randn(m, in_f, generator=gen)
            fns = {k: method_fn(k) for k in args.methods}
            objs = {k: denses if k == "torch-fp32" else layers for k in fns}
            best = {k: [float("inf")] * len(objs[k]) for k in fns}  # per copy: fastest call over the rounds
            for k in fns:  # warm-up (layouts, caches)
                fns[k](objs[k][0], x)
            for _ in range(args.rounds):
                for k, fn in fns.items():
                    for i, obj in enumerate(objs[k]):
                        t0 = time.perf_counter()
                        fn(obj, x)
                        best[k][i] = min(best[k][i], time.perf_counter() - t0)
            best = {k: sum(v) / len(v) for k, v in best.items()}
            base = best.get("torch-fp32")
            if base is not None:  # a limit below a rate torch reached is no limit: take the highest seen
                bws[shape] = max(bws[shape], dense.numel() * 4 / base / 1e9)
            for k in fns:
                read = dense.numel() * 4 if k == "torch-fp32" else nbytes
                results.append(dict(shape=shape, rows=m, method=k, ms=best[k] * 1e3, gbps=read / best[k] / 1e9,
                                    of_bw=read / best[k] / 1e9 / bws[shape],
                                    vs_torch_fp32=None if base is None else base / best[k]))
    if args.json:
        print(json.dumps(dict(bandwidth_gbps=bws, whole_pass_gbps=bw_pass, results=results), indent=1))
        return 0
    print(f"threads: {native.num_threads()}; memory read bandwidth (same run): whole 1 GiB pass {bw_pass:.1f} GB/s, "
          "limit per shape (the highest of that, the chunked probe and torch-fp32's rate): "
          + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bws.items()))
    print(f"{'shape':>10} {'M':>4} {'method':>14} {'ms':>8} {'GB/s':>6} {'of_bw':>6} {'x fp32':>7}")
    for r in results:
        vs = "" if r["vs_torch_fp32"] is None else f"{r['vs_torch_fp32']:7.2f}"
        print(f"{r['shape']:>10} {r['rows']:>4} {r['method']:>14} {r['ms']:8.3f} {r['gbps']:6.1f} {r['of_bw']:6.2f} {vs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
