"""``gracevlm bench --device cuda``: the GPU path measured end to end, INT4 against fp16 dense in the same run.

Sections (each measured, never assumed):
  bandwidth  device memory bandwidth (best device-to-device copy, bytes read + written)
  kernels    each LLaMA-7B linear shape at M = 1, 16, 512: the INT4 backend chosen for the device
             (``triton``), the same weights in fp16 through ``F.linear`` (cuBLAS), and the dequantize-every-
             call ``dense`` backend; ms, GB/s of the bytes each reads, share of the bandwidth, speedup vs fp16
  model      a synthesized llava-1.5-7b (or ``--layers`` slice) loaded straight to the device: load time,
             memory, decode tok/s at batch 1 and 16, prefill tok/s; then the same model with every INT4
             layer replaced by its exact fp16 dense weight (``nn.Linear``), measured the same way. Peak
             memory of each is that of the language model's run alone (vision tower freed first)
  vision     CLIP tower + projector per image in the model's dtype

Timings synchronize the device around each measured call (median of repeats). Kernels cycle through copies
of a layer adding up to ``working_set`` bytes, so weights come from HBM, not the 50 MB L2 cache. ``device``
may be "cpu" (tests run this path on a tiny model; figures on CPU mean little).
"""
from __future__ import annotations

import time

import torch
from torch import nn

from .bench import LLAMA_SHAPES, cpu_name, ensure_checkpoint

ROWS = (1, 16, 512)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(fn, device: torch.device, repeats: int = 7) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _random_layer(out_f: int, in_f: int, device: torch.device, gen: torch.Generator):
    from .formats.awq import GRACE_ZERO_WORD
    from .nn import Int4Linear

    words = torch.randint(-2**31, 2**31, (in_f, out_f // 8), dtype=torch.int64, generator=gen).to(torch.int32)
    qzeros = torch.full((in_f // 128, out_f // 8), GRACE_ZERO_WORD, dtype=torch.int32)
    scales = (torch.rand(in_f // 128, out_f, generator=gen) * 0.01 + 1e-3).half()
    return Int4Linear.from_awq(words.to(device), qzeros.to(device), scales.to(device))


def dense_weight(layer, dtype: torch.dtype) -> torch.Tensor:
    """The exact weight ``W [O, I]`` of an INT4 layer, in ``dtype`` (fp16 rounds ``(u - z) * s`` once)."""
    from .formats.awq import dequantize_awq

    qweight, qzeros, scales = layer.awq_tensors()
    return dequantize_awq(qweight, qzeros, scales, layer.group_size, torch.float32).t().to(dtype).contiguous()


def bench_kernels(device: torch.device, bandwidth: float, dtype: torch.dtype = torch.float16, rows=ROWS,
                  shapes=None, working_set: int = 512 << 20) -> list[dict]:
    from . import kernels

    gen = torch.Generator().manual_seed(0)
    out = []
    for label, (out_f, in_f) in (shapes or LLAMA_SHAPES).items():
        layer = _random_layer(out_f, in_f, device, gen)
        copies = max(1, working_set // max(1, layer.nbytes()))
        layers = [layer] + [_random_layer(out_f, in_f, device, gen) for _ in range(copies - 1)]
        auto = kernels.select_backend(device, 1)
        for m in layers:
            getattr(auto, "prepare", lambda _: None)(m)
        w16 = [dense_weight(m, dtype) for m in layers[:max(1, working_set // (out_f * in_f * 2))]]
        int4_bytes = layer.cache_nbytes() or layer.nbytes()
        for m_rows in rows:
            x = torch.randn(m_rows, in_f, generator=gen).to(dtype).to(device)
            backend = kernels.select_backend(device, m_rows)
            t_int4 = _median(lambda: [backend.matmul(c, x) for c in layers], device) / len(layers)
            t_fp16 = _median(lambda: [torch.nn.functional.linear(x, w) for w in w16], device) / len(w16)
            t_deq = _median(lambda: kernels.get_backend("dense").matmul(layer, x), device, repeats=3)
            for method, sec, nbytes in ((backend.name, t_int4, int4_bytes), ("fp16-dense", t_fp16, out_f * in_f * 2),
                                        ("dequantize-every-call", t_deq, layer.nbytes())):
                gbps = nbytes / sec / 1e9
                out.append(dict(shape=label, rows=m_rows, method=method, ms=sec * 1e3, gbps=gbps,
                                of_bandwidth=gbps / bandwidth, speedup_vs_fp16=t_fp16 / sec))
        layers = w16 = None  # free the copies before the next shape
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _decode_bytes(lm) -> int:
    """Bytes one decode step reads: INT4 layers in the layout their kernel reads, every other weight (not
    the embedding table: one row per token)."""
    total = 0
    for name, m in lm.named_modules():
        if name == "model.embed_tokens":
            continue
        if hasattr(m, "kernel_cache"):
            total += m.cache_nbytes() or m.nbytes()
        else:
            total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
    return total


def measure_lm(lm, new_cache, device: torch.device, dtype: torch.dtype, decode_steps: int, prefill_tokens: int,
               batch_sizes) -> dict:
    """Decode tok/s (one sequence after a 64-token context), batched decode steps, prefill tok/s."""
    gen = torch.Generator().manual_seed(0)
    vocab = lm.spec.vocab_size
    ctx = 64
    res: dict = {}
    with torch.inference_mode():
        cache = new_cache(max(batch_sizes), ctx + decode_steps + prefill_tokens + 8)
        ids = torch.randint(3, vocab, (1, ctx), generator=gen).to(device)
        lm(lm.embed(ids, dtype), torch.arange(ctx, device=device)[None], cache)
        tok = torch.randint(3, vocab, (1, 1), generator=gen).to(device)
        steps = []
        for i in range(decode_steps):
            _sync(device)
            t = time.perf_counter()
            logits = lm(lm.embed(tok, dtype), torch.tensor([[ctx + i]], device=device), cache)
            tok = logits.argmax(-1, keepdim=True)
            _sync(device)
            steps.append(time.perf_counter() - t)
        steps.sort()
        res["decode_step_s"] = steps[len(steps) // 2]
        res["decode_tok_s"] = 1.0 / res["decode_step_s"]
        res["batched"] = []
        for b in batch_sizes:
            toks = torch.randint(3, vocab, (b, 1), generator=gen).to(device)
            pos = torch.full((b, 1), ctx, device=device)
            slots = torch.arange(b, device=device)
            sec = _median(lambda: lm(lm.embed(toks, dtype), pos, cache, slots), device, repeats=5)
            res["batched"].append({"batch": b, "step_s": sec, "tok_s": b / sec})
        ids = torch.randint(3, vocab, (1, prefill_tokens), generator=gen).to(device)
        pos = torch.arange(prefill_tokens, device=device)[None]
        res["prefill_s"] = _median(lambda: lm(lm.embed(ids, dtype), pos, cache), device, repeats=3)
        res["prefill_tok_s"] = prefill_tokens / res["prefill_s"]
    return res


def to_dense(lm, dtype: torch.dtype) -> int:
    """Replace every INT4 layer of ``lm`` by ``nn.Linear`` holding its exact weight in ``dtype`` (layer by
    layer, freeing each INT4 layer); returns how many were replaced."""
    from .nn import Int4Linear

    names = [n for n, m in lm.named_modules() if isinstance(m, Int4Linear)]
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = lm.get_submodule(parent_name)
        old = getattr(parent, leaf)
        lin = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
        lin.weight = nn.Parameter(dense_weight(old, dtype), requires_grad=False)
        if old.bias is not None:
            lin.bias = nn.Parameter(old.bias.to(dtype), requires_grad=False)
        setattr(parent, leaf, lin)
        del old
    return len(names)


def _memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"allocated_bytes": torch.cuda.memory_allocated(device), "peak_bytes": torch.cuda.max_memory_allocated(device)}


def bench_model(folder, device: torch.device, decode_steps: int, prefill_tokens: int, batch_sizes) -> dict:
    import gracevlm

    _fresh_peak(device)
    t0 = time.perf_counter()
    vlm = gracevlm.load(folder, device=str(device))
    _sync(device)
    out: dict = {"load_s": time.perf_counter() - t0}
    lm, dtype = vlm.model.language_model, vlm.model.compute_dtype
    out["dtype"] = str(dtype).replace("torch.", "")
    out["int4_backend"] = {"decode": _backend_name(lm, device, 1), "prefill": _backend_name(lm, device, prefill_tokens)}
    out["memory_after_load"] = _memory(device)
    out["decode_bytes"] = _decode_bytes(lm)
    if vlm.model.vision_tower is not None:
        from PIL import Image

        pixels = vlm.runtime.preprocess([vlm.decode_image(Image.new("RGB", (448, 336), (90, 120, 200)))]).to(device)
        with torch.inference_mode():
            out["vision_s_per_image"] = _median(lambda: vlm.model.encode_images(pixels), device, repeats=3)
    vlm = None  # the language model alone from here: both peaks below count the same parts
    _fresh_peak(device)
    out["int4"] = measure_lm(lm, lambda b, n: _new_cache(lm, b, n, dtype, device), device, dtype, decode_steps,
                             prefill_tokens, batch_sizes)
    out["int4"]["memory"] = _memory(device)
    out["replaced_layers"] = to_dense(lm, dtype)
    out["dense_decode_bytes"] = _decode_bytes(lm)
    _fresh_peak(device)
    out["fp16_dense"] = measure_lm(lm, lambda b, n: _new_cache(lm, b, n, dtype, device), device, dtype, decode_steps,
                                   prefill_tokens, batch_sizes)
    out["fp16_dense"]["memory"] = _memory(device)
    return out


def _fresh_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _new_cache(lm, slots: int, max_len: int, dtype: torch.dtype, device: torch.device):
    from .models.llama import KVCache

    return KVCache(lm.spec, slots, max_len, dtype, device)


def _backend_name(lm, device: torch.device, rows: int) -> str:
    from . import kernels
    from .nn import Int4Linear

    layer = next((m for m in lm.modules() if isinstance(m, Int4Linear)), None)
    return "none" if layer is None else kernels.select_backend(device, rows, layer.backend).name


def run(device: str = "cuda", model: str | None = None, layers: int = 32, decode_steps: int = 16,
        prefill_tokens: int = 512, batch_sizes=(1, 16), sections=("bandwidth", "kernels", "model"),
        kernel_shapes=None, kernel_rows=ROWS) -> dict:
    """The report as a dict (module docstring)."""
    from .doctor import gpu_bandwidth, gpu_status
    from .bench import measure_bandwidth

    dev = torch.device(device)
    report: dict = {"device": str(dev), "machine": {"cpu": cpu_name(), "torch": torch.__version__, **gpu_status()}}
    if "bandwidth" in sections or "kernels" in sections or "model" in sections:
        report["bandwidth_gbps"] = gpu_bandwidth(dev) if dev.type == "cuda" else measure_bandwidth(0.25)
    if "kernels" in sections:
        report["kernels"] = bench_kernels(dev, report["bandwidth_gbps"], rows=kernel_rows, shapes=kernel_shapes,
                                          working_set=(512 << 20) if dev.type == "cuda" else (256 << 10))
    if "model" in sections:
        folder = ensure_checkpoint(model, layers)
        m = bench_model(folder, dev, decode_steps, prefill_tokens, list(batch_sizes))
        m["layers"] = layers if model is None else None
        bw = report["bandwidth_gbps"] * 1e9
        m["int4"]["share_of_bandwidth"] = m["decode_bytes"] * m["int4"]["decode_tok_s"] / bw
        m["fp16_dense"]["share_of_bandwidth"] = m["dense_decode_bytes"] * m["fp16_dense"]["decode_tok_s"] / bw
        m["ratios"] = {
            "decode_batch1_vs_fp16": m["int4"]["decode_tok_s"] / m["fp16_dense"]["decode_tok_s"],
            "prefill_vs_fp16": m["int4"]["prefill_tok_s"] / m["fp16_dense"]["prefill_tok_s"],
            **{f"decode_batch{b['batch']}_vs_fp16": b["tok_s"] / d["tok_s"]
               for b, d in zip(m["int4"]["batched"], m["fp16_dense"]["batched"])}}
        if dev.type == "cuda":
            m["ratios"]["peak_memory_vs_fp16"] = (m["int4"]["memory"]["peak_bytes"]
                                                  / max(1, m["fp16_dense"]["memory"]["peak_bytes"]))
        report["model"] = m
    return report


def format_report(r: dict) -> str:
    lines = [f"device: {r['device']}" + "".join(f", {g['name']}" for g in r["machine"].get("gpus", [])),
             f"memory bandwidth: {r['bandwidth_gbps']:.0f} GB/s"]
    if "kernels" in r:
        lines.append(f"{'linear':<22}{'rows':>5}  {'method':<22}{'ms':>9}{'GB/s':>9}{'of bw':>7}{'vs fp16':>9}")
        for k in r["kernels"]:
            lines.append(f"{k['shape']:<22}{k['rows']:>5}  {k['method']:<22}{k['ms']:9.3f}{k['gbps']:9.1f}"
                         f"{k['of_bandwidth']:7.0%}{k['speedup_vs_fp16']:8.2f}x")
    if "model" in r:
        m = r["model"]
        for label in ("int4", "fp16_dense"):
            x = m[label]
            lines.append(f"{label:<10} decode {x['decode_tok_s']:.1f} tok/s ({x['share_of_bandwidth']:.0%} of bw), "
                         + ", ".join(f"batch {b['batch']} {b['tok_s']:.1f} tok/s" for b in x["batched"])
                         + f", prefill {x['prefill_tok_s']:.0f} tok/s"
                         + (f", peak {x['memory']['peak_bytes'] / 2**30:.2f} GiB" if x.get("memory") else ""))
        lines.append("INT4 / fp16: " + ", ".join(f"{k} {v:.2f}x" for k, v in m["ratios"].items()))
    return "\n".join(lines)
