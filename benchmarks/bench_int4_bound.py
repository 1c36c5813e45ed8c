"""Is the INT4 M = 1 kernel bound by memory or by its instructions? GB/s of packed weights with the weights in
cache (one 4096x1024 matrix called again and again) and out of cache (six 11008x4096 copies, called in
turn), for the exact ``native`` kernel and the approximate two-plane ``native-i8x2``, on 1 and 2 threads;
best of ``--rounds``, the variants alternated within each round. Also a plain read of a 1 GiB buffer
(``gv_stream_read``) for the bus's figure at the same moment.

    PYTHONPATH=src python benchmarks/bench_int4_bound.py [--rounds 7]

If in-cache and out-of-cache rates agree, the kernel is instruction-bound at that rate per thread.
"""
from __future__ import annotations

import argparse
import time

import torch

from gracevlm import kernels
from gracevlm.formats.awq import pack_awq
from gracevlm.kernels import native
from gracevlm.nn import Int4Linear


def random_int4(out_f: int, in_f: int, gen: torch.Generator) -> Int4Linear:
    codes = torch.randint(0, 16, (in_f, out_f), dtype=torch.uint8, generator=gen)
    qw, qz = pack_awq(codes, torch.full((in_f // 128, out_f), 8, dtype=torch.uint8))
    scales = (torch.rand(in_f // 128, out_f, generator=gen) * 0.01 + 1e-3).half()
    return Int4Linear.from_awq(qw, qz, scales)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    lib = native.load_library()
    if lib is None:
        raise SystemExit("bench_int4_bound: the native library is not available (see `gracevlm doctor`)")
    gen = torch.Generator().manual_seed(0)
    sets = {"in cache (4096x1024, x200)": ([random_int4(4096, 1024, gen)], 200),
            "out of cache (6 x 11008x4096)": ([random_int4(11008, 4096, gen) for _ in range(6)], 1)}
    buf = torch.ones((1 << 30) // 4)
    variants = [(b, t) for b in ("native", "native-i8x2") for t in (1, 2)]
    for name, (layers, reps) in sets.items():
        x = torch.randn(1, layers[0].in_features, generator=gen)
        nbytes = sum(layer.nbytes() for layer in layers) * reps
        best = {v: float("inf") for v in variants}
        for _ in range(args.rounds):
            for backend, threads in variants:
                torch.set_num_threads(threads)
                be = kernels.get_backend(backend)
                be.matmul(layers[0], x)
                t0 = time.perf_counter()
                for _ in range(reps):
                    for layer in layers:
                        be.matmul(layer, x)
                best[(backend, threads)] = min(best[(backend, threads)], time.perf_counter() - t0)
        row = ", ".join(f"{b} {t}t {nbytes / best[(b, t)] / 1e9:.1f}" for b, t in variants)
        print(f"{name}: {row} GB/s", flush=True)
    for threads in (1, 2):
        n = buf.numel() * 4
        t = min(_timed(lambda: lib.gv_stream_read(buf.data_ptr(), n, threads)) for _ in range(5))
        print(f"plain read, {threads} thread(s): {n / t / 1e9:.1f} GB/s", flush=True)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
