"""``VLM``: the Python API over one loaded model (``gracevlm.load``)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from ..errors import InputError
from ..models.benchmark_prompts import BenchmarkPrompts
from ..models.images import RGBImage, decode_image
from ..models.loader import LoadedModel, load_checkpoint
from .devices import parse_device
from ..models.kv_cache import KVPool
from .generate import Generation, generate_choices, stream_generate
from .kv_slots import default_kv_cache_bytes, parse_gib
from .prefix_cache import DEFAULT_BLOCK_TOKENS, DEFAULT_PREFIX_CACHE_GIB, PrefixCache, image_key
from .prepare import PreparedPrompt, prepare_chat, prepare_prompt, prepare_templated
from .sampling import SamplingParams

KV_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAMPLING_KEYS = {"max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "logprobs", "response_format"}


def _sampling(kwargs: dict) -> SamplingParams:
    unknown = set(kwargs) - _SAMPLING_KEYS
    if unknown:
        raise InputError(f"unknown generation arguments {sorted(unknown)}; expected {sorted(_SAMPLING_KEYS)}")
    return SamplingParams(**kwargs)


class VLM:
    """A loaded model with its tokenizer and its family's runtime (templates, tokenization, image processing)."""

    def __init__(self, loaded: LoadedModel, conv_mode: str | None = None,
                 prefix_cache_gib: float | None = DEFAULT_PREFIX_CACHE_GIB, kv_cache_gib: float | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = loaded.config
        self.runtime = loaded.family.runtime(loaded, conv_mode)
        self.max_context = self.runtime.max_context
        self.prefix_cache = None
        self.set_kv_cache(kv_cache_gib)
        self.set_prefix_cache(prefix_cache_gib)

    @property
    def conv_mode(self) -> str | None:
        return getattr(self.runtime, "conv_mode", None)

    @property
    def benchmark_prompts(self) -> BenchmarkPrompts:
        """How this model's family is asked benchmark questions (``engine.benchmark``)."""
        return self.loaded.family.benchmark_prompts()

    # -- images ------------------------------------------------------------------------------------------
    @property
    def max_image_pixels(self) -> int:
        return self.runtime.max_image_pixels

    def set_max_image_pixels(self, max_pixels: int) -> None:
        """Raise or lower the pixel cap every image of this model is checked against (before decoding)."""
        self.runtime.set_max_image_pixels(max_pixels)

    def decode_image(self, source) -> RGBImage:
        """Decode an image once (path, bytes, file object, PIL) under this model's pixel cap; the result is
        used as it is by ``generate``/``chat``/the scheduler."""
        return decode_image(source, self.max_image_pixels)

    def encode_images(self, images: Iterable[Any]) -> tuple[torch.Tensor | None, float]:
        """Images (paths, bytes, PIL, decoded) -> projected features ``[N, tokens, hidden]`` and seconds spent."""
        features, seconds, _ = self.encode_images_keyed(images)
        return features, seconds

    def encode_images_keyed(self, images: Iterable[Any]) -> tuple[torch.Tensor | None, float, list[bytes] | None]:
        """``encode_images`` plus one content key per image when the prefix cache is on (else None). With
        the cache on, each image is encoded alone (so a cached feature is bitwise a fresh one) and images
        whose features are cached skip the vision tower."""
        images = list(images)
        if not images:
            return None, 0.0, ([] if self._prefix_on() else None)
        if self.model.vision_tower is None:
            raise InputError("this model has no vision tower; it cannot take images")
        t0 = time.perf_counter()
        pixels = self.runtime.preprocess(images)
        device = self.model.language_model.lm_head.weight.device
        if not self._prefix_on():
            return self.model.encode_images(pixels.to(device)), time.perf_counter() - t0, None
        keys, feats = [image_key(p) for p in pixels], []
        for key, p in zip(keys, pixels):
            f = self.prefix_cache.get_features(key)
            if f is None:
                f = self.model.encode_images(p.unsqueeze(0).to(device))[0]
                self.prefix_cache.put_features(key, f)
            feats.append(f)
        return torch.stack(feats), time.perf_counter() - t0, keys

    # -- prefix cache ------------------------------------------------------------------------------
    def set_prefix_cache(self, gib: float | None = DEFAULT_PREFIX_CACHE_GIB,
                         block_tokens: int = DEFAULT_BLOCK_TOKENS) -> None:
        """Keep prompt-prefix KV blocks and image features across calls, up to ``gib`` GiB within the KV pool
        (0 or None: off; see ``engine.prefix_cache`` for exactness). Replaces (empties) the current cache."""
        if gib is None:
            gib = 0.0
        if isinstance(gib, bool) or not isinstance(gib, (int, float)) or not 0 <= gib < 1 << 20:
            raise InputError(f"prefix cache size must be a number of GiB >= 0, got {gib!r}")
        if self.prefix_cache is not None:
            self.prefix_cache.close()
        self.prefix_cache = PrefixCache(int(gib * (1 << 30)), block_tokens, self.kv_pool)

    def set_kv_cache(self, gib: float | None = None) -> None:
        """A new KV pool of ``gib`` GiB (None: half the memory available now; ``engine.kv_slots``) for every
        generation and every scheduler created from now on; the prefix cache moves to it, emptied."""
        if gib is None:
            budget = default_kv_cache_bytes(self.model.language_model.lm_head.weight.device)
        else:
            budget = parse_gib(gib, "kv_cache_gib")
            if budget == 0:
                raise InputError("kv_cache_gib must be > 0: every request needs KV memory")
        self.kv_pool = KVPool(budget)  # every KV byte of this model: live requests and the prefix cache
        if self.prefix_cache is not None:
            self.set_prefix_cache(self.prefix_cache.budget_bytes / (1 << 30), self.prefix_cache.block_tokens)

    def set_kv_dtype(self, dtype: "torch.dtype | str | None") -> None:
        """Store K/V in ``dtype`` ("float32", "float16", "bfloat16"; None: the compute dtype) in every cache
        made from now on (``generate``, schedulers created afterwards); empties the prefix cache. Half K/V
        halves KV memory and moves logits slightly (README, Prefix cache); attention still computes in fp32."""
        if isinstance(dtype, str):
            if dtype not in KV_DTYPES:
                raise InputError(f"kv dtype must be one of {sorted(KV_DTYPES)}, got {dtype!r}")
            dtype = KV_DTYPES[dtype]
        if dtype is not None and dtype not in KV_DTYPES.values():
            raise InputError(f"kv dtype must be one of {sorted(KV_DTYPES)}, got {dtype!r}")
        self.model.kv_dtype = dtype
        self.prefix_cache.clear()

    def _prefix_on(self) -> bool:
        return self.prefix_cache.enabled and getattr(self.model, "supports_prefix_cache", False)

    # -- generation --------------------------------------------------------------------------------
    def _stream_prepared(self, prepared: PreparedPrompt, result: Generation | None, sampling: dict) -> Iterator[str]:
        """The one path every entry point takes: prepared ids + image features -> generation."""
        params = _sampling(sampling)
        res = result if result is not None else Generation("", [], prepared.prompt_ids, "length")
        res.prompt = prepared.prompt_text
        res.timings.image_encode_s = prepared.image_encode_s
        yield from stream_generate(self.model, self.tokenizer, prepared.prompt_ids, prepared.image_features, params,
                                   self.max_context, res, prepared.started, self.prefix_cache, prepared.image_keys,
                                   self.kv_pool)

    def stream_chat(self, messages: list[dict], result: Generation | None = None, conv_mode: str | None = None,
                    **sampling) -> Iterator[str]:
        """Multi-turn generation; yields text deltas and fills ``result``."""
        _sampling(sampling)
        yield from self._stream_prepared(prepare_chat(self, messages, conv_mode), result, sampling)

    def _choices(self, prepared: PreparedPrompt, sampling: dict, n: int) -> list[Generation]:
        """``n`` > 1 samples of one prepared prompt: one prefill (``generate.generate_choices``)."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InputError(f"n must be a positive integer, got {n!r}")
        params = _sampling(sampling)
        gens = generate_choices(self.model, self.tokenizer, prepared.prompt_ids, prepared.image_features, params, n,
                                self.max_context, prepared.started, self.prefix_cache, prepared.image_keys,
                                self.kv_pool)
        for g in gens:
            g.prompt, g.timings.image_encode_s = prepared.prompt_text, prepared.image_encode_s
        return gens

    def chat(self, messages: list[dict], conv_mode: str | None = None, n: int = 1,
             **sampling) -> Generation | list[Generation]:
        """Multi-turn generation (a leading system message replaces the template's system text).
        ``logprobs=k`` (0-20) fills ``Generation.logprobs``; ``n > 1`` returns a list of ``n`` choices."""
        if n != 1:
            _sampling(sampling)
            return self._choices(prepare_chat(self, messages, conv_mode), sampling, n)
        res = Generation("", [], [], "length")
        for _ in self.stream_chat(messages, res, conv_mode, **sampling):
            pass
        return res

    def stream(self, prompt: str, images=None, result: Generation | None = None, conv_mode: str | None = None,
               system: str | None = None, **sampling) -> Iterator[str]:
        """Single-turn generation for ``prompt`` (an image placeholder per image is added in front when the
        prompt has none; ``system`` replaces the template's system text); yields text deltas."""
        _sampling(sampling)
        yield from self._stream_prepared(prepare_prompt(self, prompt, images, conv_mode, system), result, sampling)

    def generate(self, prompt: str, images=None, conv_mode: str | None = None, system: str | None = None,
                 n: int = 1, **sampling) -> Generation | list[Generation]:
        """Generate an answer; returns ``Generation(text, token_ids, prompt_token_ids, finish_reason, timings)``.
        ``system`` replaces the template's system text; ``logprobs=k`` (0-20) fills ``Generation.logprobs``
        (see ``engine.sampling`` for which distribution); ``n > 1`` returns a list of ``n`` independent
        choices from one prefill, choice i seeded with ``sampling.choice_seed(seed, i)``."""
        if n != 1:
            _sampling(sampling)
            return self._choices(prepare_prompt(self, prompt, images, conv_mode, system), sampling, n)
        res = Generation("", [], [], "length")
        for _ in self.stream(prompt, images, res, conv_mode, system, **sampling):
            pass
        return res

    def generate_raw(self, prompt_text: str, images=None, result: Generation | None = None,
                     **sampling) -> Iterator[str]:
        """Generate from an already templated prompt (image markers included); yields deltas."""
        _sampling(sampling)
        yield from self._stream_prepared(prepare_templated(self, prompt_text, images), result, sampling)

    # -- facts ---------------------------------------------------------------------------------------
    def memory(self) -> dict:
        """Resident bytes by component (weights only; KV memory: ``kv_memory``)."""
        return dict(self.loaded.stats.bytes_by_part)

    def kv_memory(self) -> dict:
        """The KV pool now: bytes in use (live requests + cached prefixes), budget, peak, cached bytes."""
        pool = self.kv_pool
        return {"kv_pool_bytes": pool.in_use, "kv_pool_budget_bytes": pool.budget_bytes,
                "kv_pool_peak_bytes": pool.peak_bytes, "prefix_cache_bytes": self.prefix_cache.nbytes}

    @property
    def path(self) -> Path:
        return self.loaded.path


def load(model: str | Path, device: str = "auto", backend: str | None = None, dtype: torch.dtype | None = None,
         quantize: str | None = None, conv_mode: str | None = None,
         vision_dtype: torch.dtype | str | None = None, keep_awq: bool | None = None,
         prefix_cache_gib: float | None = DEFAULT_PREFIX_CACHE_GIB, kv_dtype: torch.dtype | str | None = None,
         kv_cache_gib: float | None = None) -> VLM:
    """Load a checkpoint of any supported family and format (folder or Hub id) as a ``VLM``.

    ``device``: "auto" (CUDA if available, else CPU), "cpu" or "cuda[:n]". ``dtype`` defaults to float32
    on CPU (exact) and float16 on CUDA. ``backend`` forces an INT4 kernel (see ``gracevlm.kernels``).
    ``quantize="rtn"`` quantizes a plain fp16 checkpoint to W4G128 at load (round to nearest).
    ``vision_dtype`` runs the CLIP tower and projector in another dtype than ``dtype`` (e.g. "bfloat16":
    ~3x faster per image on CPUs with AMX/AVX512-BF16, image features ~1e-2 relative off fp32; README; on a
CPU without them bf16 is emulated and slower: a RuntimeWarning says so, as for ``backend="native-bf16"``).
    ``keep_awq``: keep the AWQ buffers beside the kernels' own layout (default: no; see ``load_checkpoint``).
    On CUDA every tensor is copied from the file straight to the GPU (no CPU copy of the model) and the INT4
    layers use the ``triton`` backend when triton is installed (``gracevlm doctor`` says which path runs).
    ``prefix_cache_gib``: cap of the prefix cache kept across calls, within the KV pool (0: off;
    ``engine.prefix_cache``). ``kv_cache_gib``: the KV pool's budget, shared by every request's KV and the
    prefix cache (default: half the memory available after loading; ``engine.kv_slots``).
    ``kv_dtype``: dtype K/V are stored in (``VLM.set_kv_dtype``; default the compute dtype, exact).
    """
    if isinstance(vision_dtype, str):
        names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        if vision_dtype not in names:
            raise InputError(f"vision_dtype must be one of {sorted(names)}, got {vision_dtype!r}")
        vision_dtype = names[vision_dtype]
    dev = parse_device(device)
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    if dev.type == "cpu" and torch.bfloat16 in (vision_dtype, dtype):
        from ..kernels import warn_emulated_bf16

        warn_emulated_bf16("the vision tower" if vision_dtype == torch.bfloat16 else "the model")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    loaded = load_checkpoint(model, dtype=dtype, backend=backend, quantize=quantize, vision_dtype=vision_dtype,
                             keep_awq=bool(keep_awq), device=dev)
    vlm = VLM(loaded, conv_mode, prefix_cache_gib, kv_cache_gib)
    if kv_dtype is not None:
        vlm.set_kv_dtype(kv_dtype)
    return vlm
