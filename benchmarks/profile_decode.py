"""Where a decode step's (or a prefill's) time goes: per-part wall time on a checkpoint.

    PYTHONPATH=src python benchmarks/profile_decode.py --model /work/models/llava-7b-awq [--steps 16]
    PYTHONPATH=src python benchmarks/profile_decode.py --model M --prefill 620 --chunk 64 --steps 2

Wraps the language model's modules with timers (perf_counter around each forward; the wrapping costs
~1 us per call, counted under "python + glue"): qkv / o / gate_up / down projections, attention (the
Attention forward minus its projections: rotary, K/V write, SDPA), RMSNorms, the MLP's silu * up,
lm_head, and the rest of the step (embedding, rotary tables, mask, residual adds, Python). Also measures
the memory read bandwidth in the same run and prints each part's share of the step and the bandwidth
limit, so the gap between the step and the limit is split into named parts.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import gracevlm  # noqa: E402
from gracevlm.bench import measure_bandwidth  # noqa: E402

TIMES: dict[str, float] = collections.defaultdict(float)


def timed(name, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        TIMES[name] += time.perf_counter() - t0
        return out
    return wrapper


def decoder(lm):
    """The module holding ``layers`` and the final ``norm`` (LLaVA's ``lm.model``, Qwen3-VL's ``lm`` itself)."""
    return lm.model if hasattr(lm, "model") else lm


def instrument(lm) -> None:
    for layer in decoder(lm).layers:
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj"):
            if hasattr(attn, name):
                getattr(attn, name).forward = timed(name, getattr(attn, name).forward)
        for name in ("gate_up_proj", "gate_proj", "up_proj", "down_proj"):
            if hasattr(mlp, name):
                getattr(mlp, name).forward = timed(name, getattr(mlp, name).forward)
        for name in ("q_norm", "k_norm"):  # Qwen3's QK-norm, inside the attention
            if hasattr(attn, name):
                getattr(attn, name).forward = timed("qk-norm", getattr(attn, name).forward)
        attn.forward = timed("attention (incl. projections)", attn.forward)
        mlp.forward = timed("mlp (incl. projections)", mlp.forward)
        layer.input_layernorm.forward = timed("rmsnorm", layer.input_layernorm.forward)
        layer.post_attention_layernorm.forward = timed("rmsnorm", layer.post_attention_layernorm.forward)
    decoder(lm).norm.forward = timed("rmsnorm", decoder(lm).norm.forward)
    lm.lm_head.forward = timed("lm_head", lm.lm_head.forward)


def breakdown(t: dict[str, float], total: float) -> dict[str, float]:
    proj = ["qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj"]
    mproj = ["gate_up_proj", "gate_proj", "up_proj", "down_proj"]
    parts = {k: t[k] for k in proj + mproj if k in t}
    parts["attention core (rotary, KV write, SDPA)"] = t["attention (incl. projections)"] - sum(
        t.get(k, 0) for k in proj) - t.get("qk-norm", 0)
    if "qk-norm" in t:
        parts["qk-norm"] = t["qk-norm"]
    parts["mlp silu*up"] = t["mlp (incl. projections)"] - sum(t.get(k, 0) for k in mproj)
    parts["rmsnorm"] = t["rmsnorm"]
    parts["lm_head"] = t["lm_head"]
    parts["python + glue (rest of the step)"] = total - sum(parts.values())
    return parts


def profile_prefill(args) -> int:
    """One prompt of ``--prefill`` random embeddings: one forward, then the same in ``--chunk``-position
    chunks (the prefix cache's cold path) with ``lm_head`` on every chunk (as before) and on the last chunk
    only (``logits_for="none"`` for the others, as ``prefill_chunks`` does now), alternated ``--steps``
    times; per-part seconds of each (the fastest run of each)."""
    vlm = gracevlm.load(args.model, device="cpu")
    lm = vlm.model.language_model
    if hasattr(lm, "prepare_kernels"):  # Qwen3-VL's loader prepares them itself
        lm.prepare_kernels()
    instrument(lm)
    n = args.prefill
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, n, lm.spec.hidden_size, generator=gen) * 0.02
    cache = vlm.model.new_cache(1, n + 8)
    runs = {"one-shot": [], f"chunks of {args.chunk}, lm_head per chunk (before)": [],
            f"chunks of {args.chunk}, lm_head on the last only": []}
    with torch.inference_mode():
        for _ in range(max(1, args.steps)):
            for label in runs:
                TIMES.clear()
                t0 = time.perf_counter()
                step = n if label == "one-shot" else args.chunk
                for s in range(0, n, step):
                    e = min(n, s + step)
                    last_only = "last only" in label and e < n
                    lm(embeds[:, s:e], torch.arange(s, e)[None], cache, torch.tensor([0]),
                       logits_for="none" if last_only else "last")
                total = time.perf_counter() - t0
                runs[label].append((total, breakdown(dict(TIMES), total)))
    print(f"prefill of {n} positions, {args.model}; load average {os.getloadavg()[0]:.1f}")
    best = {label: min(r, key=lambda x: x[0]) for label, r in runs.items()}
    base = best["one-shot"][0]
    for label, (total, parts) in best.items():
        print(f"{label}: {total:.2f} s (best of {len(runs[label])}; {total / base:.2f}x one-shot)")
        for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
            print(f"  {k:<42}{v:9.3f} s {v / total:6.1%}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=0,
                    help="instead: profile a prefill of this many positions, one-shot and in --chunk chunks")
    ap.add_argument("--chunk", type=int, default=64)
    args = ap.parse_args()
    if args.prefill:
        return profile_prefill(args)
    bw = measure_bandwidth()
    vlm = gracevlm.load(args.model, device="cpu")
    lm = vlm.model.language_model
    if hasattr(lm, "prepare_kernels"):  # Qwen3-VL's loader prepares them itself
        lm.prepare_kernels()
    decode_bytes = sum((m.cache_nbytes() or m.nbytes()) if hasattr(m, "kernel_cache") else
                       sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
                       for name, m in lm.named_modules() if not name.endswith("embed_tokens"))  # a tied head counts once
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        cache = vlm.model.new_cache(1, args.context + 2 * args.steps + 8)
        ids = torch.randint(3, lm.spec.vocab_size, (1, args.context), generator=gen)
        lm(lm.embed(ids, torch.float32), torch.arange(args.context)[None], cache)
        tok = torch.randint(3, lm.spec.vocab_size, (1, 1), generator=gen)
        plain = []
        for i in range(args.steps):  # uninstrumented steps first: the step time without the timers
            t0 = time.perf_counter()
            tok = lm(lm.embed(tok, torch.float32), torch.tensor([[args.context + i]]), cache).argmax(-1, keepdim=True)
            plain.append(time.perf_counter() - t0)
        instrument(lm)
        total = 0.0
        for i in range(args.steps):
            t0 = time.perf_counter()
            pos = args.context + args.steps + i
            tok = lm(lm.embed(tok, torch.float32), torch.tensor([[pos]]), cache).argmax(-1, keepdim=True)
            total += time.perf_counter() - t0
    n = args.steps
    step = sorted(plain)[n // 2]
    parts = breakdown({k: v / n for k, v in TIMES.items()}, total / n)
    limit = decode_bytes / (bw * 1e9)
    print(f"bandwidth {bw:.1f} GB/s; {decode_bytes / 1e9:.2f} GB read per token -> limit {limit * 1e3:.1f} ms "
          f"({1 / limit:.2f} tok/s); load average {os.getloadavg()[0]:.1f}")
    print(f"step (median of {n}, no timers): {step * 1e3:.1f} ms = {1 / step:.2f} tok/s = {limit / step:.0%} of "
          f"the limit; instrumented mean {total / n * 1e3:.1f} ms")
    for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<42}{v * 1e3:9.2f} ms {v / (total / n):6.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
