"""``gracevlm bench`` sections ``model`` and (for families other than LLaVA) ``vision``, through the family contract.

Both run in a fresh process (``gracevlm.bench`` starts them), so peak-RSS figures are those of this model alone.

``model_worker``: load time, resident and peak RSS, the weight bytes one decode step reads (the model's
``decode_read_bytes``: quantized linears in their kernels' layout, ``lm_head`` once even when tied to the
embedding, norms; not the embedding table), then through ``prompt_for`` / ``forward_prompt`` / ``forward_decode``
(the calls the engine makes): decode tok/s of one sequence after a 64-token context, a breakdown of one decode step
(quantized linears, dense linears, ``lm_head``, the rest: attention, norms, rope, Python), each decode step's
share of the read bandwidth measured just before it (``paired_decode_shares``), batched decode steps,
and prefill tok/s of one text prompt in a single chunk (plus, for INT4 models and when asked, with the
approximate ``native-bf16`` prefill GEMM: ``gracevlm bench`` asks for LLaVA, as its report always had it).

``vision_worker``: seconds per image of the model's ``encode_images`` at its compute dtype, for a ``width x height``
noise image (the family's own processing decides the patch grid), median of a few runs.
"""
from __future__ import annotations

import resource
import time
from pathlib import Path

import torch


def rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_now_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _random_ids(n: int, vocab: int, marker: int, gen: torch.Generator) -> list[int]:
    """``n`` random text ids in [3, vocab) with no image marker among them."""
    ids = torch.randint(3, vocab, (n,), generator=gen)
    ids[ids == marker] = 3
    return ids.tolist()


def upper_median(times: list[float]) -> float:
    """The middle value (the upper of the two middle ones for an even count): always one of the measurements."""
    times = sorted(times)
    return times[len(times) // 2]


def step_breakdown(model, step) -> dict:
    """Seconds of one decode step (``step()``) spent in each kind of linear, timed by forward hooks (the CPU
    kernels run synchronously in the calling thread); ``rest_s`` is the remainder (attention, norms, rope,
    elementwise ops and Python). The hooks make the step run layer by layer (``models.decode_stack`` steps
    aside for them), so this is the breakdown of that path."""
    from .nn import HalfLinear, Int4Linear, Int8Linear

    head = model.language_model.lm_head
    kinds = {"quantized_linears_s": (Int4Linear, Int8Linear), "dense_linears_s": (torch.nn.Linear, HalfLinear)}
    spent = {"quantized_linears_s": 0.0, "dense_linears_s": 0.0, "lm_head_s": 0.0}
    handles, starts = [], {}

    def pre(mod, _inp):
        starts[id(mod)] = time.perf_counter()

    def post_for(kind):
        def post(mod, _inp, _out):
            spent[kind] += time.perf_counter() - starts.pop(id(mod))
        return post

    for module in model.language_model.modules():
        kind = "lm_head_s" if module is head else next((k for k, c in kinds.items() if isinstance(module, c)), None)
        if kind is not None:
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post_for(kind))]
    try:
        t0 = time.perf_counter()
        step()
        total = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    return {"step_s": total, **spent, "rest_s": total - sum(spent.values())}


def _largest_tensor(module) -> torch.Tensor:
    """The module's largest CPU parameter or buffer (e.g. the embedding or ``lm_head`` matrix)."""
    return max((t for t in list(module.parameters()) + list(module.buffers()) if t.is_cpu),
               key=lambda t: t.numel() * t.element_size())


def paired_decode_shares(step, steps: int, decode_bytes: int, probe: torch.Tensor,
                         window: int = 256 << 20) -> list[float]:
    """Each decode step's share of the read bandwidth measured just before it: ``steps`` times, a streaming read
    of up to ``window`` bytes of ``probe`` (a weight tensor larger than the caches: no extra memory) then
    ``step(i)``; share = (``decode_bytes`` / step seconds) / (bytes read / read seconds). On a shared machine
    whose bandwidth swings within seconds this pairs each step with the bandwidth of its moment. [] without the
    native library."""
    from .kernels import native

    lib = native.load_library()
    if lib is None:
        return []
    n = min(window, probe.numel() * probe.element_size()) // 64 * 64
    shares = []
    for i in range(steps):
        t = time.perf_counter()
        lib.gv_stream_read(probe.data_ptr(), n, native.num_threads())
        read_s = time.perf_counter() - t
        t = time.perf_counter()
        step(i)
        step_s = time.perf_counter() - t
        shares.append((decode_bytes / step_s) / (n / read_s))
    return shares


def quantized_shapes(lm) -> list[dict]:
    """The quantized linears' distinct (out, in, bits) and how many of each a decode step runs."""
    from .nn import Int4Linear, Int8Linear

    count: dict[tuple[int, int, int], int] = {}
    for m in lm.modules():
        if isinstance(m, (Int4Linear, Int8Linear)):
            key = (m.out_features, m.in_features, 8 if isinstance(m, Int8Linear) else 4)
            count[key] = count.get(key, 0) + 1
    return [{"out": o, "in": i, "bits": b, "per_step": n} for (o, i, b), n in sorted(count.items())]


def model_worker(path: str, decode_steps: int, prefill_tokens: int, batch_sizes: list[int],
                 bf16_prefill: bool = True) -> dict:
    """Load, decode, batched decode and prefill of the checkpoint at ``path`` (see the module docstring);
    ``bf16_prefill``: also time the prompt with the approximate INT4 ``native-bf16`` GEMM."""
    import gracevlm

    from . import kernels
    from .models import decode_stack
    from .nn import Int4Linear

    res: dict = {}
    t0 = time.perf_counter()
    vlm = gracevlm.load(path, device="cpu", prefix_cache_gib=0)
    model = vlm.model
    lm = model.language_model
    prepare = getattr(lm, "prepare_kernels", None)
    if prepare is not None:
        prepare()
    res["load_s"] = time.perf_counter() - t0
    res["rss_after_load"] = rss_now_bytes()
    res["peak_rss_load"] = rss_peak_bytes()
    res["bytes_by_part"] = vlm.memory()
    res["file_bytes"] = vlm.loaded.stats.file_bytes
    res["family"] = vlm.loaded.family.name
    res["format"] = vlm.loaded.stats.format
    res["layers"] = lm.spec.num_layers
    res["linear_shapes"] = quantized_shapes(lm)
    read = model.decode_read_bytes()
    res["decode_bytes"], res["decode_bytes_by_kind"], res["lm_head"] = read["total"], read["bytes"], read["lm_head"]
    gen = torch.Generator().manual_seed(0)
    vocab, marker = lm.spec.vocab_size, vlm.runtime.image_marker
    ctx = 64
    with torch.inference_mode():
        cache = model.new_cache(max(batch_sizes), max(ctx + 2 * decode_steps + 8, prefill_tokens + 1))
        prompt = model.prompt_for(_random_ids(ctx, vocab, marker, gen), None)
        offset = prompt.decode_offset
        model.forward_prompt(prompt, cache, 0)
        tok = torch.tensor(_random_ids(1, vocab, marker, gen))
        slot0 = torch.tensor([0])
        step_times = []
        for i in range(decode_steps):
            t = time.perf_counter()
            logits = model.forward_decode(tok, torch.tensor([ctx + i]), [offset], cache, slot0)
            tok = logits.argmax(-1)
            step_times.append(time.perf_counter() - t)
        res["decode_step_s"] = upper_median(step_times)
        res["decode_one_call"] = decode_stack.in_use(lm)
        res["decode_tok_s"] = 1.0 / res["decode_step_s"]
        paired = paired_decode_shares(lambda i: model.forward_decode(tok, torch.tensor([ctx + decode_steps + i]),
                                                                      [offset], cache, slot0),
                                      decode_steps, res["decode_bytes"], _largest_tensor(lm))
        if paired:
            res["decode_paired_shares"] = paired
        pos = ctx + 2 * decode_steps
        res["decode_breakdown"] = step_breakdown(
            model, lambda: model.forward_decode(tok, torch.tensor([pos]), [offset], cache, slot0))
        # batched decode: B sequences step together (rows past the 64-token context of slot 0's length)
        res["batched"] = []
        for b in batch_sizes:
            toks = torch.tensor(_random_ids(b, vocab, marker, gen))
            times = []
            for _ in range(3):
                t = time.perf_counter()
                model.forward_decode(toks, torch.full((b,), ctx), [offset] * b, cache, torch.arange(b))
                times.append(time.perf_counter() - t)
            step = upper_median(times)
            res["batched"].append({"batch": b, "step_s": step, "tok_s": b / step})
        # prefill: one text prompt of `prefill_tokens` tokens, one chunk
        long_prompt = model.prompt_for(_random_ids(prefill_tokens, vocab, marker, gen), None)
        t = time.perf_counter()
        model.forward_prompt(long_prompt, cache, 0)
        res["prefill_s"] = time.perf_counter() - t
        res["prefill_tok_s"] = prefill_tokens / res["prefill_s"]
        # the opt-in approximate bf16 GEMM, only where the CPU has bf16 instructions (elsewhere it is emulated,
        # several times slower, and the backend warns)
        if bf16_prefill and not kernels.cpu_has_fast_bf16():
            res["prefill_bf16_skipped"] = "no AVX512-BF16/AMX: bf16 is emulated on this CPU"
        elif bf16_prefill and any(isinstance(m, Int4Linear) for m in lm.modules()):
            backend_before = next(m.backend for m in lm.modules() if isinstance(m, Int4Linear))
            kernels.use_backend(lm, "native-bf16")
            try:
                t = time.perf_counter()
                model.forward_prompt(long_prompt, cache, 0)
                res["prefill_bf16_tok_s"] = prefill_tokens / (time.perf_counter() - t)
            except Exception as exc:  # noqa: BLE001 - e.g. native kernels unavailable
                res["prefill_bf16_error"] = str(exc)
            finally:
                kernels.use_backend(lm, backend_before)
    res["peak_rss"] = rss_peak_bytes()
    return res


def vision_worker(path: str, width: int = 640, height: int = 480, repeats: int = 3) -> dict:
    """Seconds per image of the vision tower (``encode_images``) at the model's compute dtype."""
    import gracevlm
    from PIL import Image

    vlm = gracevlm.load(path, device="cpu", prefix_cache_gib=0)
    gen = torch.Generator().manual_seed(0)
    noise = (torch.rand(height, width, 3, generator=gen) * 255).to(torch.uint8).numpy()
    image = vlm.decode_image(Image.fromarray(noise))
    t0 = time.perf_counter()
    pixels = vlm.runtime.preprocess([image])
    preprocess_s = time.perf_counter() - t0
    with torch.inference_mode():
        feats = vlm.model.encode_images(pixels)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            vlm.model.encode_images(pixels)
            times.append(time.perf_counter() - t)
    positions = getattr(feats, "positions", None)
    if positions is None:  # a plain feature tensor [images, tokens, D] or [tokens, D]
        positions = feats.shape[-2]
    return {"image": [width, height], "tokens": int(positions), "preprocess_s": preprocess_s,
            "dtype": str(vlm.model.compute_dtype).replace("torch.", ""), "s": upper_median(times), "runs": len(times)}
