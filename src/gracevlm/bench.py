"""``gracevlm bench``: one run that measures the CPU path end to end and prints ratios.

Sections (each measured in this run, never assumed):
  bandwidth   memory read bandwidth (sum of a large fp32 tensor)
  kernels     INT4 matmul per backend on the LLaMA-7B shapes at M=1: ms, GB/s of packed bytes, fraction
              of the measured bandwidth; the GRACE-style dequantize-every-call path as the baseline
  model       a synthesized llava-1.5-7b checkpoint (or a --layers slice): load time, peak RSS, decode
              tok/s, prefill tok/s (512-token prompt), batched decode step time for M = 1, 2, 4, 8, 16,
              and the GRACE-style baseline estimated from its per-matrix time
  vision      CLIP-L/336 time per image in fp32, fp16 and bf16, and the feature and logits error of each
  ttft        time to first token of an image question: cold, warm (same image, new question: prefix
              cache), and with the cache off; KV bytes per position by dtype (``bench_ttft``)
  llama.cpp   the same shapes in llama.cpp (random Q4_0 GGUF written from our checkpoint) when
              ``llama_cpp`` is importable
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .bench_model import upper_median

LLAMA_SHAPES = {"q/k/v/o 4096x4096": (4096, 4096), "gate/up 11008x4096": (11008, 4096),
                "down 4096x11008": (4096, 11008)}
MAX_COPIES = 256  # layer copies cycled through to leave the cache (small test shapes stay in it)
PER_LAYER = {"q/k/v/o 4096x4096": 4, "gate/up 11008x4096": 2, "down 4096x11008": 1}


def _median_time(fn, repeats: int = 5, budget: float = 3.0) -> float:
    fn()
    times, end = [], time.perf_counter() + budget
    while len(times) < repeats and (not times or time.perf_counter() < end):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def measure_bandwidth(gib: float = 1.0) -> float:
    """Memory read bandwidth in GB/s over a ``gib`` GiB buffer: the best of a few passes of torch's
    ``sum`` and of the native library's streaming read (``gv_stream_read``, all threads, the kernels'
    prefetching), whichever is higher, so that "fraction of bandwidth" figures are not flattered."""
    from .kernels import native

    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    best = min(_timed(lambda: x.sum()) for _ in range(5))
    lib = native.load_library()
    if lib is not None:
        n = x.numel() * 4 // 64 * 64
        lib.gv_stream_read(x.data_ptr(), n, native.num_threads())
        best = min(best, min(_timed(lambda: lib.gv_stream_read(x.data_ptr(), n, native.num_threads()))
                             for _ in range(5)))
    return x.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bench_kernels(bandwidth: float, rows=(1,), backends=None, working_set: int = 768 << 20,
                  shapes: dict | None = None) -> list[dict]:
    """ms per call of each INT4 backend on ``shapes`` (label -> (out, in); default the LLaMA-7B shapes). Fast calls (< 20 ms) cycle through copies of the
    layer whose packed bytes add up to ``working_set`` (beyond the last-level cache, as in a real decode step,
    where each weight is read once per token); GB/s is packed bytes read per second."""
    from . import kernels
    from .formats.awq import dequantize_awq, pack_awq
    from .nn import Int4Linear

    gen = torch.Generator().manual_seed(0)
    out = []
    for label, (out_f, in_f) in (shapes or LLAMA_SHAPES).items():
        words = torch.randint(-2**31, 2**31, (in_f, out_f // 8), dtype=torch.int64, generator=gen).to(torch.int32)
        _, qzeros = pack_awq(torch.zeros(in_f // 128, out_f, dtype=torch.uint8),
                             torch.full((in_f // 128, out_f), 8, dtype=torch.uint8))
        scales = (torch.rand(in_f // 128, out_f, generator=gen) * 0.01 + 1e-3).half()
        layer = Int4Linear.from_awq(words, qzeros, scales)
        nbytes = layer.nbytes()
        copies = [layer] + [Int4Linear.from_awq(words.clone(), qzeros.clone(), scales.clone())
                            for _ in range(min(MAX_COPIES, working_set // nbytes) - 1)]
        for m in rows:
            x = torch.randn(m, in_f, generator=gen)
            base = _median_time(lambda: (x.half() @ dequantize_awq(words, qzeros, scales, 128, torch.float16)),
                                repeats=2)
            out.append(dict(shape=label, rows=m, method="grace-baseline", ms=base * 1e3,
                            gbps=nbytes / base / 1e9, of_bandwidth=nbytes / base / 1e9 / bandwidth, speedup=1.0))
            for name in backends or [b for b in kernels.backend_names() if b != "reference"]:
                backend = kernels.get_backend(name)
                if not backend.available(x.device):
                    continue
                sec = _median_time(lambda: backend.matmul(layer, x))
                if sec < 0.02:  # out of cache: one call per copy, in turn
                    for c in copies:
                        backend.matmul(c, x)
                    sec = _median_time(lambda: [backend.matmul(c, x) for c in copies]) / len(copies)
                out.append(dict(shape=label, rows=m, method=name, ms=sec * 1e3, gbps=nbytes / sec / 1e9,
                                of_bandwidth=nbytes / sec / 1e9 / bandwidth, speedup=base / sec))
    return out


def llava_vision_worker(path: str) -> dict:
    """CLIP tower + projector time per image in fp32, fp16 and bf16 (same weights), and what each costs in
    accuracy: relative L2 error of the image features and of the next-token logits of an image prompt
    (language model in fp32) against the fp32 tower, and whether the top token stays the same."""
    import gracevlm
    from PIL import Image

    from .engine.prepare import prepare_prompt

    vlm = gracevlm.load(path, device="cpu")
    gen = torch.Generator().manual_seed(0)
    noise = (torch.rand(336, 448, 3, generator=gen) * 255).to(torch.uint8).numpy()
    image = vlm.decode_image(Image.fromarray(noise))
    pixels = vlm.runtime.preprocess([image])
    ids = prepare_prompt(vlm, "What is shown in this image?", [image]).prompt_ids
    lm = vlm.model.language_model

    def next_logits(feats):
        embeds = vlm.model.embed_prompt(ids, feats)[None]
        cache = vlm.model.new_cache(1, embeds.shape[1] + 1)
        return lm(embeds, torch.arange(embeds.shape[1])[None], cache)[0]

    out = {}
    with torch.inference_mode():
        ref_feats = ref_logits = None
        for dtype in (torch.float32, torch.float16, torch.bfloat16):  # fp32 first: each cast is from exact values
            vlm.model.vision_tower.to(dtype)
            vlm.model.projector.to(dtype)
            sec = _median_time(lambda: vlm.model.encode_images(pixels), repeats=3, budget=20)
            feats = vlm.model.encode_images(pixels).float()
            logits = next_logits(feats)
            name = str(dtype).replace("torch.", "")
            if ref_feats is None:
                ref_feats, ref_logits = feats, logits
                out[name] = {"s": sec}
                continue
            out[name] = {"s": sec, "feature_rel_l2": float((feats - ref_feats).norm() / ref_feats.norm()),
                         "logits_rel_l2": float((logits - ref_logits).norm() / ref_logits.norm()),
                         "top1_same": bool(logits.argmax() == ref_logits.argmax())}
    return out


def _run_worker(kind: str, *args) -> dict:
    cmd = [sys.executable, "-m", "gracevlm.bench", f"--{kind}-worker", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_int8_kernels(bandwidth: float, shapes: dict, rows: int = 1, working_set: int = 768 << 20) -> list[dict]:
    """ms per call of each INT8 backend (``kernels.native_int8.INT8_BACKENDS`` but the slow reference) on
    ``shapes`` (label -> (out, in)) with random W8G128 codes; cycling through copies as ``bench_kernels`` does;
    GB/s is codes + scales read per second. ``speedup`` is against the ``dense`` backend (exact fp32 tiles)."""
    from .kernels.native_int8 import INT8_BACKENDS
    from .nn import Int8Linear

    gen = torch.Generator().manual_seed(0)
    out = []
    for label, (out_f, in_f) in shapes.items():
        q = torch.randint(-128, 128, (out_f, in_f), dtype=torch.int8, generator=gen)
        s = torch.rand(out_f, in_f // 128, generator=gen) * 1e-3 + 1e-4
        layers = [Int8Linear(q, s)]
        layers += [Int8Linear(q.clone(), s.clone())
                   for _ in range(min(MAX_COPIES, working_set // layers[0].nbytes()) - 1)]
        nbytes, x = layers[0].nbytes(), torch.randn(rows, in_f, generator=gen)
        base = None
        for name in ("dense", "native", "native-i16"):
            backend = INT8_BACKENDS[name]
            if not backend.available(x.device):
                continue
            sec = _median_time(lambda: backend.matmul(layers[0], x))
            if sec < 0.02:
                sec = _median_time(lambda: [backend.matmul(c, x) for c in layers]) / len(layers)
            base = base or sec
            out.append(dict(shape=label, rows=rows, method=f"int8 {name}", ms=sec * 1e3, gbps=nbytes / sec / 1e9,
                            of_bandwidth=nbytes / sec / 1e9 / bandwidth, speedup=base / sec))
    return out


def model_kernel_rows(bandwidth: float, shapes: list[dict]) -> list[dict]:
    """Kernel rows (M = 1) on a model's own quantized shapes (``linear_shapes`` from the model worker)."""
    rows = []
    for bits in (4, 8):
        chosen = {f"{d['out']}x{d['in']} ({d['per_step']}/step)": (d["out"], d["in"]) for d in shapes if d["bits"] == bits}
        if chosen:
            rows += bench_kernels(bandwidth, shapes=chosen) if bits == 4 else bench_int8_kernels(bandwidth, chosen)
    return rows


def checkpoint_family(folder: Path) -> str:
    """The family name of the checkpoint in ``folder`` (from its config.json)."""
    from .models.registry import family_for_config

    return family_for_config(json.loads((Path(folder) / "config.json").read_text())).name


def read_files_seconds(folder: Path) -> float:
    """Seconds to read the checkpoint's safetensors once (whatever the page cache holds)."""
    t0 = time.perf_counter()
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    return time.perf_counter() - t0


def _llamacpp_repack_overrides():
    """``tensor_buft_overrides`` that put every transformer-block weight into llama.cpp's CPU_REPACK buffer
    (its interleaved Q4_0 layout for AVX2/AVX-512 GEMV/GEMM), without the AMX buffer, which traps on some
    virtual machines (SIGILL). Returns (keep-alive array, pointer) or None when the build lacks CPU_REPACK."""
    import ctypes

    import llama_cpp

    libdir = Path(llama_cpp.__file__).parent / "lib"
    libs = [ctypes.CDLL(str(libdir / n)) for n in ("libggml.so", "libggml-base.so") if (libdir / n).exists()]

    def fn(name, restype, *argtypes):
        for lib in libs:
            f = getattr(lib, name, None)
            if f is not None:
                f.restype, f.argtypes = restype, list(argtypes)
                return f
        raise AttributeError(name)

    vp = ctypes.c_void_p
    try:
        dev = fn("ggml_backend_dev_by_type", vp, ctypes.c_int)(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
        reg = fn("ggml_backend_dev_backend_reg", vp, vp)(dev)
        addr = fn("ggml_backend_reg_get_proc_address", vp, vp, ctypes.c_char_p)(reg, b"ggml_backend_dev_get_extra_bufts")
        buft_name = fn("ggml_backend_buft_name", ctypes.c_char_p, vp)
    except AttributeError:
        return None
    if not addr:
        return None
    extra = ctypes.CFUNCTYPE(ctypes.POINTER(vp), vp)(addr)(dev)
    repack, i = None, 0
    while extra and extra[i]:
        if buft_name(extra[i]) == b"CPU_REPACK":
            repack = extra[i]
        i += 1
    if repack is None:
        return None

    class Override(ctypes.Structure):
        _fields_ = [("pattern", ctypes.c_char_p), ("buft", vp)]

    arr = (Override * 2)(Override(rb"blk\.[0-9]+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight", repack),
                         Override(None, None))
    return arr, ctypes.cast(arr, vp)


def llamacpp_worker(gguf_path: str, threads: int, decode_steps: int, prefill_tokens: int) -> dict:
    """Decode and prefill speed of llama.cpp (llama-cpp-python) on a GGUF of the same shapes, in its
    fastest configuration that runs here: Q4_0 weights repacked (CPU_REPACK), no AMX buffer."""
    import llama_cpp
    import llama_cpp.llama as llama_module
    from llama_cpp import Llama

    default_params = llama_cpp.llama_model_default_params
    overrides = _llamacpp_repack_overrides()

    def params():
        p = default_params()
        p.use_extra_bufts = False  # the AMX buffer type: illegal instruction on some sandboxes
        if overrides is not None:
            p.tensor_buft_overrides = overrides[1]
        return p

    llama_module.llama_cpp.llama_model_default_params = params
    llm = Llama(model_path=gguf_path, n_ctx=prefill_tokens + decode_steps + 80, n_threads=threads,
                n_threads_batch=threads, n_batch=512, verbose=False, logits_all=False)
    vocab = llm.n_vocab()
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (prefill_tokens,), generator=gen).tolist()
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - t
    times = []
    for i in range(decode_steps):
        t = time.perf_counter()
        llm.eval([int(torch.randint(3, vocab, (1,), generator=gen))])
        times.append(time.perf_counter() - t)
    times.sort()
    step = times[len(times) // 2]
    return {"prefill_s": prefill_s, "prefill_tok_s": prefill_tokens / prefill_s, "decode_step_s": step,
            "decode_tok_s": 1.0 / step, "weights": "CPU_REPACK" if overrides is not None else "plain"}


def ensure_checkpoint(model: str | None, layers: int) -> Path:
    if model:
        return Path(model)
    from .synth.checkpoint import synthesize

    folder = Path(os.environ.get("GRACEVLM_BENCH_DIR", Path.home() / ".cache" / "gracevlm" / "bench")) \
        / f"llava-1.5-7b-{layers}l"
    if not (folder / "config.json").is_file():
        print(f"synthesizing {folder} ...", file=sys.stderr)
        synthesize(folder, "llava-1.5-7b", "awq", seed=0, force=True, layers=layers)
    return folder


def run(model: str | None = None, layers: int = 32, decode_steps: int = 8, prefill_tokens: int = 512,
        batch_sizes=(1, 2, 4, 8, 16), sections=("bandwidth", "kernels", "model", "vision", "ttft", "llama.cpp"),
        prefix_block_tokens: int = 64, image_size: tuple[int, int] = (640, 480)) -> dict:
    """The report dict. LLaVA checkpoints: kernel rows on the LLaMA-7B INT4 shapes, CLIP in three dtypes, llama.cpp.
    Other families (Qwen3-VL): kernel rows on the model's own quantized shapes and bits (after the model section),
    the vision tower's seconds per ``image_size`` image, llama.cpp "n/a"."""
    report: dict = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                                "torch": torch.__version__, "python": platform.python_version()}}
    bw = measure_bandwidth()
    report["bandwidth_gbps"] = bw
    folder = ensure_checkpoint(model, layers) if {"model", "vision", "ttft", "llama.cpp"} & set(sections) else None
    family = checkpoint_family(folder) if folder is not None else "llava"
    report["family"] = family
    if "kernels" in sections and family == "llava":
        report["kernels"] = bench_kernels(bw)
    if "model" in sections:
        report["read_files_s"] = read_files_seconds(folder)
        m = _run_worker("model", folder, decode_steps, prefill_tokens, ",".join(map(str, batch_sizes)),
                        int(family == "llava"))
        m["bandwidth_limit_tok_s"] = bw * 1e9 / max(1, m["decode_bytes"])
        report["model"] = m
        if "kernels" in sections and family != "llava":
            report["kernels"] = model_kernel_rows(bw, m["linear_shapes"])
        if "kernels" in sections and family == "llava":  # from the LLaMA-7B shapes' per-matrix times
            per_layer = sum(PER_LAYER[r["shape"]] * r["ms"] for r in report["kernels"]
                            if r["method"] == "grace-baseline" and r["rows"] == 1) / 1e3
            report["grace_baseline_decode_tok_s"] = 1.0 / (per_layer * m["layers"])
    if "vision" in sections:
        report["vision"] = (_run_worker("vision", folder) if family == "llava" else
                            _run_worker("image", folder, *image_size))
    if "ttft" in sections:
        report["ttft"] = _run_worker("ttft", folder, prefix_block_tokens)
    if "llama.cpp" in sections:
        report["llama.cpp"] = (_llamacpp_section(folder, decode_steps, prefill_tokens) if family == "llava" else
                               {"skipped": f"n/a for {family} (the comparison covers LLaVA's LLaMA shapes)"})
    return report


def _llamacpp_section(folder: Path, decode_steps: int, prefill_tokens: int) -> dict:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return {"skipped": "llama_cpp (llama-cpp-python) is not installed"}
    from .export import export_model

    gguf = folder.parent / f"{folder.name}-q4_0.gguf"  # beside, not inside: a .gguf inside reads as GGUF
    if not gguf.is_file():
        with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
            export_model(folder, "gguf", Path(tmp) / "out")
            model_file = [p for p in (Path(tmp) / "out").glob("*.gguf") if "mmproj" not in p.name][0]
            os.replace(model_file, gguf)
    return _run_worker("llamacpp", gguf, torch.get_num_threads(), decode_steps, prefill_tokens)


def format_report(r: dict) -> str:
    lines = [f"machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, torch {r['machine']['torch']}, "
             f"{r['machine']['threads']} threads", f"memory read bandwidth: {r['bandwidth_gbps']:.1f} GB/s", ""]
    if "kernels" in r:
        lines.append(f"{'matmul, M=1':<22}{'method':<16}{'ms':>9}{'GB/s':>8}{'of bw':>7}{'speedup':>10}")
        for k in r["kernels"]:
            lines.append(f"{k['shape']:<22}{k['method']:<16}{k['ms']:9.2f}{k['gbps']:8.2f}"
                         f"{k['of_bandwidth']:7.0%}{k['speedup']:9.1f}x")
        lines.append("  (speedup: INT4 vs the GRACE-style dequantize-every-call path, INT8 vs the dense backend)")
        lines.append("")
    if "model" in r:
        m = r["model"]
        gib = 2**30
        kinds = m.get("decode_bytes_by_kind", {})
        head = m.get("lm_head", {})
        lines += [f"model: {m.get('family', 'llava')} {m.get('format', '')}, {m['layers']} layers",
                  f"  load {m['load_s']:.1f} s (reading the files once: {r['read_files_s']:.1f} s); peak RSS during "
                  f"load {m['peak_rss_load'] / gib:.2f} GiB, resident after load {m['rss_after_load'] / gib:.2f} GiB "
                  f"(ratio {m['peak_rss_load'] / max(1, m['rss_after_load']):.2f}); peak RSS of the whole run "
                  f"{m['peak_rss'] / gib:.2f} GiB",
                  f"  decode   {m['decode_tok_s']:.2f} tok/s  (bandwidth limit: {m['decode_bytes'] / 1e9:.3f} GB read "
                  f"per token -> {m['bandwidth_limit_tok_s']:.2f} tok/s; "
                  f"{m['decode_tok_s'] / m['bandwidth_limit_tok_s']:.0%} of it)",
                  *([f"  decode paired with the bandwidth (a read of up to 256 MB of weights before each step): median "
                     f"{upper_median(m['decode_paired_shares']):.0%} of it (steps {min(m['decode_paired_shares']):.0%}-"
                     f"{max(m['decode_paired_shares']):.0%})"] if m.get("decode_paired_shares") else []),
                  "  bytes per decode step: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in kinds.items() if v),
                  f"  lm_head: {head.get('class')} {head.get('dtype')} {head.get('shape')}, shares the embedding "
                  f"matrix: {head.get('shares_embedding')}, native row kernel: {head.get('row_kernel')}"]
        if "decode_breakdown" in m:
            b = m["decode_breakdown"]
            one_call = (f"; the decode step above, all layers in one native call: {m['decode_step_s'] * 1e3:.1f} ms"
                        if m.get("decode_one_call") else "")
            lines.append("  one decode step, layer by layer (timed by hooks): " + ", ".join(
                f"{k[:-2]} {v * 1e3:.1f} ms" for k, v in b.items() if k != "step_s" and v > 0)
                + f" (of {b['step_s'] * 1e3:.1f} ms{one_call})")
        lines.append(f"  prefill  {m['prefill_tok_s']:.2f} tok/s  ({m['prefill_s']:.1f} s for the prompt)"
                     + (f"; with the approximate bf16 GEMM (native-bf16): {m['prefill_bf16_tok_s']:.2f} tok/s"
                        if "prefill_bf16_tok_s" in m else ""))
        if "grace_baseline_decode_tok_s" in r:
            lines.append(f"  GRACE-style dequantize-every-call decode (estimated from per-matrix times): "
                         f"{r['grace_baseline_decode_tok_s']:.4f} tok/s -> ours is "
                         f"{m['decode_tok_s'] / r['grace_baseline_decode_tok_s']:.0f}x faster")
        one = m["batched"][0]["step_s"]
        lines.append("  batched decode: " + ", ".join(
            f"M={b['batch']}: {b['step_s'] * 1e3:.0f} ms/step ({b['step_s'] / one:.2f}x of M=1, {b['tok_s']:.1f} tok/s)"
            for b in m["batched"]))
    if "vision" in r and "s" in r["vision"]:
        v = r["vision"]
        lines.append(f"vision tower per image ({v['image'][0]}x{v['image'][1]} -> {v['tokens']} tokens, {v['dtype']}): "
                     f"{v['s']:.2f} s (median of {v['runs']}; preprocessing {v['preprocess_s'] * 1e3:.0f} ms)")
    elif "vision" in r:
        v = r["vision"]
        lines.append("vision tower + projector per image: " + ", ".join(
            f"{name} {v[name]['s']:.2f} s" for name in ("float32", "float16", "bfloat16")))
        for name in ("float16", "bfloat16"):
            lines.append(f"  {name} vs float32: image features rel. L2 {v[name]['feature_rel_l2']:.1e}, next-token "
                         f"logits rel. L2 {v[name]['logits_rel_l2']:.1e}, same top token: {v[name]['top1_same']}")
    if "ttft" in r:
        from .bench_ttft import format_ttft

        lines += format_ttft(r["ttft"])
    if "llama.cpp" in r:
        c = r["llama.cpp"]
        if "skipped" in c:
            lines.append(f"llama.cpp: skipped ({c['skipped']})")
        else:
            lines.append(f"llama.cpp Q4_0 same shapes: decode {c['decode_tok_s']:.2f} tok/s, prefill "
                         f"{c['prefill_tok_s']:.2f} tok/s")
            if "model" in r:
                m = r["model"]
                lines.append(f"  gracevlm / llama.cpp: decode {m['decode_tok_s'] / c['decode_tok_s']:.2f}x, "
                             f"prefill {m['prefill_tok_s'] / c['prefill_tok_s']:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--model-worker":
        from .bench_model import model_worker

        print(json.dumps(model_worker(argv[1], int(argv[2]), int(argv[3]), [int(b) for b in argv[4].split(",")],
                                      bool(int(argv[5])) if len(argv) > 5 else True)))
        return 0
    if argv and argv[0] == "--vision-worker":
        print(json.dumps(llava_vision_worker(argv[1])))
        return 0
    if argv and argv[0] == "--image-worker":
        from .bench_model import vision_worker

        print(json.dumps(vision_worker(argv[1], int(argv[2]), int(argv[3]))))
        return 0
    if argv and argv[0] == "--ttft-worker":
        from .bench_ttft import ttft_worker

        print(json.dumps(ttft_worker(argv[1], int(argv[2]))))
        return 0
    if argv and argv[0] == "--llamacpp-worker":
        print(json.dumps(llamacpp_worker(argv[1], int(argv[2]), int(argv[3]), int(argv[4]))))
        return 0
    ap = argparse.ArgumentParser(prog="gracevlm bench")
    add_arguments(ap)
    return run_cli(ap.parse_args(argv))


DEFAULT_SECTIONS = ("bandwidth", "kernels", "model", "vision", "ttft", "llama.cpp")


def add_arguments(ap) -> None:
    ap.add_argument("--model", default=None, help="checkpoint to measure (default: synthesize llava-1.5-7b shapes)")
    ap.add_argument("--layers", type=int, default=32, help="layers of the synthesized checkpoint (quick: 4)")
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--sections", default=",".join(DEFAULT_SECTIONS))
    ap.add_argument("--batch-sizes", default="1,2,4,8,16",
                    help="model section: batched decode sizes (the KV cache is preallocated for the largest: "
                         "16 x ~600 positions of a 7B is ~9 GiB in fp32)")
    ap.add_argument("--prefix-block-tokens", type=int, default=64,
                    help="ttft section: positions per prefix-cache block (the engine's default: 64)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--device", default="cpu",
                    help="cpu (default) or cuda[:N]: the GPU bench (bench_cuda.py; sections bandwidth,kernels,model)")
    ap.add_argument("--out", default=None, help="also write the report as JSON to this file")


DEVICE_SECTIONS = ("bandwidth", "kernels", "model")


def check_device_args(args) -> "torch.device":
    """The device of ``--device`` (InputError with a one-line reason when unusable here)."""
    from .errors import InputError

    try:
        dev = torch.device(args.device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown --device {args.device!r}; use cpu or cuda[:N]") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"--device {args.device}: gracevlm bench measures cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda: CUDA is not available in this torch build or on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {args.device}: there are {torch.cuda.device_count()} CUDA devices")
        unknown = set(args.sections.split(",")) - set(DEVICE_SECTIONS)
        if unknown and args.sections != ",".join(DEFAULT_SECTIONS):
            raise InputError(f"--device cuda measures sections {','.join(DEVICE_SECTIONS)}; not {sorted(unknown)}")
    if args.decode_steps < 1 or args.prefill_tokens < 1 or args.layers < 1 or args.prefix_block_tokens < 1:
        raise InputError("--decode-steps, --prefill-tokens, --layers and --prefix-block-tokens must be >= 1")
    return dev


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """``--batch-sizes`` "1,2,4" -> (1, 2, 4); InputError for anything but positive integers."""
    from .errors import InputError

    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise InputError(f"--batch-sizes takes positive integers separated by commas, got {text!r}")
    return sizes


def run_cli(args) -> int:
    dev = check_device_args(args)
    parse_batch_sizes(args.batch_sizes)  # a bad value fails before any measurement
    if dev.type == "cuda":
        from . import bench_cuda

        sections = tuple(args.sections.split(",")) if args.sections != ",".join(DEFAULT_SECTIONS) else DEVICE_SECTIONS
        report = bench_cuda.run(str(dev), args.model, args.layers, args.decode_steps, args.prefill_tokens,
                                sections=sections)
        text = bench_cuda.format_report(report)
    else:
        report = run(args.model, args.layers, args.decode_steps, args.prefill_tokens,
                     batch_sizes=parse_batch_sizes(args.batch_sizes), sections=tuple(args.sections.split(",")),
                     prefix_block_tokens=args.prefix_block_tokens)
        text = format_report(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1) if args.json else text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
