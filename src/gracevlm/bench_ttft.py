"""``gracevlm bench`` section ``ttft``: time to first token of an image question, cold and warm.

Measured through ``VLM.generate`` (one new token), in one process:
  cold        a new image, prefix cache on and empty: image encode + block-aligned chunked prefill
  warm        the same image, a new question: image features and the system + image prefix come from the
              prefix cache; only the question's positions are prefilled
  no_cache    the same first request with the prefix cache off (one-shot prefill), the reference
and the KV bytes one position costs in each ``kv dtype`` (layers x 2 x kv_heads x head_dim x element size).
"""
from __future__ import annotations

import time

import torch

KV_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def kv_bytes_per_token(spec) -> dict[str, int]:
    """Bytes of K and V of one position, all layers, per dtype."""
    per = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim
    return {name: per * torch.empty((), dtype=dt).element_size() for name, dt in KV_DTYPES.items()}


def ttft_worker(path: str, block_tokens: int = 64) -> dict:
    import gracevlm
    from PIL import Image

    vlm = gracevlm.load(path, device="cpu", prefix_cache_gib=4.0)
    gen = torch.Generator().manual_seed(1)
    noise = (torch.rand(336, 448, 3, generator=gen) * 255).to(torch.uint8).numpy()
    image = vlm.decode_image(Image.fromarray(noise))
    vlm.generate("Warm up the kernels.", max_new_tokens=1)  # first-call costs (thread pools, layouts) out
    vlm.set_prefix_cache(4.0, block_tokens)

    def ask(question: str) -> dict:
        t0 = time.perf_counter()
        g = vlm.generate(question, images=[image], max_new_tokens=1)
        t = g.timings
        return {"ttft_s": t.ttft_s, "wall_s": time.perf_counter() - t0, "image_encode_s": t.image_encode_s,
                "prefill_s": t.prefill_s, "prefill_tokens": t.prefill_tokens, "cached_tokens": t.cached_tokens}

    out = {"cold": ask("What is shown in this image?"), "warm": ask("Which colours dominate the picture?")}
    vlm.set_prefix_cache(0)
    out["no_cache"] = ask("What is shown in this image?")
    out["kv_bytes_per_token"] = kv_bytes_per_token(vlm.model.language_model.spec)
    out["kv_dtype_error"] = kv_dtype_error(vlm, image)
    return out


def kv_dtype_error(vlm, image) -> dict:
    """What storing K/V in each half dtype costs on 8 greedy tokens of an image question: whether they stay
    those of fp32 K/V, and the largest change of a chosen token's log-probability while they agree."""
    question = "Describe the picture in detail."
    vlm.set_kv_dtype(None)
    ref = vlm.generate(question, images=[image], max_new_tokens=8, logprobs=1)
    out = {}
    for name in ("float16", "bfloat16"):
        vlm.set_kv_dtype(name)
        g = vlm.generate(question, images=[image], max_new_tokens=8, logprobs=1)
        agree = next((i for i, (x, y) in enumerate(zip(ref.token_ids, g.token_ids)) if x != y),
                     min(len(ref.token_ids), len(g.token_ids)))
        a = torch.tensor([e.logprob for e in ref.logprobs[:agree]])
        b = torch.tensor([e.logprob for e in g.logprobs[:agree]])
        out[name] = {"same_tokens": g.token_ids == ref.token_ids,
                     "max_abs_logprob_diff": float((a - b).abs().max()) if agree else 0.0}
    vlm.set_kv_dtype(None)
    return out


def format_ttft(r: dict) -> list[str]:
    lines = ["time to first token, image question (1 new token):"]
    for name in ("no_cache", "cold", "warm"):
        s = r[name]
        lines.append(f"  {name:<9}{s['ttft_s']:8.2f} s  (image {s['image_encode_s']:.2f} s, prefill "
                     f"{s['prefill_tokens']} positions in {s['prefill_s']:.2f} s, {s['cached_tokens']} cached)")
    lines.append("  KV bytes per position: " + ", ".join(f"{k} {v / 2**10:.0f} KiB"
                                                       for k, v in r["kv_bytes_per_token"].items()))
    for name, e in r.get("kv_dtype_error", {}).items():
        lines.append(f"  K/V in {name}: same 8 greedy tokens as float32: {e['same_tokens']}, max |logprob "
                     f"difference| of the chosen tokens {e['max_abs_logprob_diff']:.1e}")
    return lines
