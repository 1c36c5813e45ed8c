"""Decode attention: the native kernel (``kernels.attention``) against torch's SDPA in the same run.

    PYTHONPATH=src python benchmarks/bench_attention.py [--threads 1] [--kv-dtype float32]
    PYTHONPATH=src python benchmarks/bench_attention.py --model /path/to/checkpoint --context 600 --kv-dtype bfloat16

Without ``--model``: microseconds per layer for Qwen3-VL-2B (16 query / 8 KV heads) and LLaMA-7B (32 / 32)
shapes, 28 layers' caches cycled so K/V come from memory as in a decode step, at 64, 300 and 1200 positions.
With ``--model``: whole decode steps of that checkpoint after a ``--context``-token random prompt, the two
attention paths alternated step by step in one process (median and min of each).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from gracevlm.kernels import attention  # noqa: E402
from gracevlm.models.llama import _attend  # noqa: E402


def per_layer(kv_dtype: torch.dtype, repeats: int = 5) -> None:
    for name, heads, kv_heads in (("qwen3-vl-2b", 16, 8), ("llama-7b", 32, 32)):
        for span in (64, 300, 1200):
            caches = [(torch.randn(kv_heads, span + 64, 128).to(kv_dtype), torch.randn(kv_heads, span + 64, 128).to(kv_dtype))
                      for _ in range(28)]
            q = torch.randn(1, heads, 1, 128)
            mask = torch.ones(1, 1, 1, span, dtype=torch.bool)
            groups = heads // kv_heads

            def run(native: bool) -> None:
                for kc, vc in caches:
                    if native:
                        attention.decode_attention(q, kc, vc, span, groups)
                    else:
                        _attend(q, kc[:, :span].unsqueeze(0).float(), vc[:, :span].unsqueeze(0).float(), mask, groups)

            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(repeats):
                for native in (False, True):
                    t0 = time.perf_counter()
                    run(native)
                    times[native].append((time.perf_counter() - t0) / len(caches))
            sdpa, ours = statistics.median(times[False]) * 1e6, statistics.median(times[True]) * 1e6
            print(f"{name:12s} {span:5d} positions: SDPA {sdpa:7.0f} us/layer, native {ours:7.0f} us/layer "
                  f"({sdpa / ours:.2f}x)")


def model_steps(path: str, context: int, steps: int, kv_dtype: torch.dtype) -> None:
    import gracevlm

    vlm = gracevlm.load(path, device="cpu")
    lm = vlm.model.language_model
    gen = torch.Generator().manual_seed(0)
    times: dict[bool, list[float]] = {False: [], True: []}
    with torch.inference_mode():
        cache = vlm.model.new_cache(1, context + 2 * steps + 8, dtype=kv_dtype)
        ids = torch.randint(3, lm.spec.vocab_size, (1, context), generator=gen)
        lm(lm.embed(ids, torch.float32), torch.arange(context)[None], cache)
        tok, pos = ids[:, -1:], context
        for _ in range(steps):
            for native in (False, True):
                attention.set_enabled(native)
                t0 = time.perf_counter()
                tok = lm(lm.embed(tok, torch.float32), torch.tensor([[pos]]), cache).argmax(-1, keepdim=True)
                times[native].append(time.perf_counter() - t0)
                pos += 1
    attention.set_enabled(True)
    for native, label in ((False, "SDPA"), (True, "native")):
        t = times[native][1:]
        print(f"{label:7s} decode step at ~{context} positions: median {statistics.median(t) * 1e3:.1f} ms, "
              f"min {min(t) * 1e3:.1f} ms")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kv-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--model")
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["GRACEVLM_NUM_THREADS"] = str(args.threads)
    kv_dtype = getattr(torch, args.kv_dtype)
    print(f"{args.threads} thread(s), KV {args.kv_dtype}, load average {os.getloadavg()[0]:.1f}")
    if args.model:
        model_steps(args.model, args.context, args.steps, kv_dtype)
    else:
        per_layer(kv_dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
