"""``VLM``: the Python API over one loaded model (``gracevlm.load``)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from ..errors import InputError
from ..model.loader import LoadedModel, load_checkpoint
from ..model.preprocess import ImageSpec, preprocess_images
from ..model.prompts import get_template, prepare_user_text, render_prompt, tokenize_with_images
from ..model.prompts import default_conv_mode
from .devices import parse_device
from .generate import Generation, stream_generate
from .sampling import SamplingParams

_SAMPLING_KEYS = {"max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop"}


def _sampling(kwargs: dict) -> SamplingParams:
    unknown = set(kwargs) - _SAMPLING_KEYS
    if unknown:
        raise InputError(f"unknown generation arguments {sorted(unknown)}; expected {sorted(_SAMPLING_KEYS)}")
    return SamplingParams(**kwargs)


class VLM:
    """A loaded LLaVA-1.5 model with its tokenizer, template and image preprocessing."""

    def __init__(self, loaded: LoadedModel, conv_mode: str | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = loaded.config
        self.conv_mode = conv_mode or default_conv_mode(loaded.config.raw)
        get_template(self.conv_mode)  # validate early
        tower = self.model.vision_tower
        size = tower.config.image_size if tower is not None else 336
        self.image_spec = ImageSpec.from_llava_config(loaded.config.raw, size=size)
        self.max_context = min(loaded.config.tokenizer_model_max_length, loaded.config.max_position_embeddings)

    # -- preparation -------------------------------------------------------------------------------
    def encode_images(self, images: Iterable[Any]) -> tuple[torch.Tensor | None, float]:
        """Images (paths, bytes, PIL) -> projected features ``[N, patches, hidden]`` and seconds spent."""
        images = list(images)
        if not images:
            return None, 0.0
        if self.model.vision_tower is None:
            raise InputError("this model has no vision tower; it cannot take images")
        t0 = time.perf_counter()
        pixels = preprocess_images(images, self.image_spec)
        device = self.model.language_model.lm_head.weight.device
        return self.model.encode_images(pixels.to(device)), time.perf_counter() - t0

    def build_prompt(self, messages: list[dict], conv_mode: str | None = None) -> str:
        return render_prompt(messages, get_template(conv_mode or self.conv_mode))

    def _chat_inputs(self, messages: list[dict]) -> tuple[list[dict], list[Any]]:
        """Normalize OpenAI-style messages: content str or list of text/image parts; images collected in order."""
        out, images = [], []
        for i, msg in enumerate(messages):
            role, content = msg.get("role"), msg.get("content")
            if role == "system":
                raise InputError("system messages are not supported: LLaVA-1.5's template has a fixed system "
                                 "prompt (choose another with conv_mode)")
            if isinstance(content, str):
                out.append({"role": role, "content": content})
                continue
            if not isinstance(content, list):
                raise InputError(f"message {i}: content must be a string or a list of parts")
            texts, n_img = [], 0
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    texts.append(part.get("text", ""))
                elif kind in ("image", "image_url"):
                    if role != "user":
                        raise InputError(f"message {i}: images are only allowed in user messages")
                    images.append(part.get("image") if kind == "image" else part["image_url"])
                    n_img += 1
                else:
                    raise InputError(f"message {i}: unknown content part {part!r}")
            text = "\n".join(t for t in texts if t)
            out.append({"role": role, "content": prepare_user_text(text, n_img) if n_img else text})
        return out, images

    # -- generation --------------------------------------------------------------------------------
    def _stream_prompt(self, prompt_text: str, images: list, result: Generation | None, sampling: dict,
                       started: float) -> Iterator[str]:
        """The one path every entry point takes: templated text -> ids -> image features -> generation."""
        params = _sampling(sampling)
        ids = tokenize_with_images(prompt_text, self.tokenizer)
        features, enc_s = self.encode_images(images)
        res = result if result is not None else Generation("", [], ids, "length")
        res.prompt = prompt_text
        res.timings.image_encode_s = enc_s
        yield from stream_generate(self.model, self.tokenizer, ids, features, params, self.max_context, res,
                                   started)

    def stream_chat(self, messages: list[dict], result: Generation | None = None, conv_mode: str | None = None,
                    **sampling) -> Iterator[str]:
        """Multi-turn generation; yields text deltas and fills ``result``."""
        started = time.perf_counter()
        msgs, images = self._chat_inputs(messages)
        yield from self._stream_prompt(self.build_prompt(msgs, conv_mode), images, result, sampling, started)

    def chat(self, messages: list[dict], conv_mode: str | None = None, **sampling) -> Generation:
        res = Generation("", [], [], "length")
        for _ in self.stream_chat(messages, res, conv_mode, **sampling):
            pass
        return res

    def stream(self, prompt: str, images=None, result: Generation | None = None, conv_mode: str | None = None,
               **sampling) -> Iterator[str]:
        """Single-turn generation for ``prompt`` (an ``<image>`` placeholder per image is added in front
        when the prompt has none); yields text deltas."""
        started = time.perf_counter()
        images = [] if images is None else (list(images) if isinstance(images, (list, tuple)) else [images])
        msgs = [{"role": "user", "content": prepare_user_text(prompt, len(images))}]
        yield from self._stream_prompt(self.build_prompt(msgs, conv_mode), images, result, sampling, started)

    def generate(self, prompt: str, images=None, conv_mode: str | None = None, **sampling) -> Generation:
        """Generate an answer; returns ``Generation(text, token_ids, prompt_token_ids, finish_reason, timings)``."""
        res = Generation("", [], [], "length")
        for _ in self.stream(prompt, images, res, conv_mode, **sampling):
            pass
        return res

    def generate_raw(self, prompt_text: str, images=None, result: Generation | None = None,
                     **sampling) -> Iterator[str]:
        """Generate from an already templated prompt (``<image>`` markers included); yields deltas."""
        started = time.perf_counter()
        yield from self._stream_prompt(prompt_text, [] if images is None else list(images), result, sampling,
                                       started)

    # -- facts ---------------------------------------------------------------------------------------
    def memory(self) -> dict:
        """Resident bytes by component (weights only; KV caches are allocated per generation)."""
        return dict(self.loaded.stats.bytes_by_part)

    @property
    def path(self) -> Path:
        return self.loaded.path


def load(model: str | Path, device: str = "auto", backend: str | None = None, dtype: torch.dtype | None = None,
         quantize: str | None = None, conv_mode: str | None = None,
         vision_dtype: torch.dtype | str | None = None, keep_awq: bool | None = None) -> VLM:
    """Load a GRACE AWQ / GRACE QAT / plain LLaVA-1.5 checkpoint (folder or Hub id) as a ``VLM``.

    ``device``: "auto" (CUDA if available, else CPU), "cpu" or "cuda[:n]". ``dtype`` defaults to float32
    on CPU (exact) and float16 on CUDA. ``backend`` forces an INT4 kernel (see ``gracevlm.kernels``).
    ``quantize="rtn"`` quantizes a plain fp16 checkpoint to W4G128 at load (round to nearest).
    ``vision_dtype`` runs the CLIP tower and projector in another dtype than ``dtype`` (e.g. "bfloat16":
    ~3x faster per image on CPUs with AMX/AVX512-BF16, image features ~1e-2 relative off fp32; README).
    ``keep_awq``: keep the AWQ buffers beside the CPU kernels' layout (default: only off the CPU, where the
    model is moved after loading; see ``load_checkpoint``).
    """
    if isinstance(vision_dtype, str):
        names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        if vision_dtype not in names:
            raise InputError(f"vision_dtype must be one of {sorted(names)}, got {vision_dtype!r}")
        vision_dtype = names[vision_dtype]
    dev = parse_device(device)
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    if keep_awq is None:
        keep_awq = dev.type != "cpu"
    loaded = load_checkpoint(model, dtype=dtype, backend=backend, quantize=quantize, vision_dtype=vision_dtype,
                             keep_awq=keep_awq)
    if dev.type != "cpu":
        loaded.model.to(dev)
    return VLM(loaded, conv_mode)
