"""Model families: the contract each one provides, and how a checkpoint finds its family.

A family is one package ``gracevlm.models.<name>`` exposing ``FAMILY``, an instance of a ``Family`` subclass.
The engine and the front ends talk to a family only through this contract, never to its modules:

- ``recognises(raw)``: does this ``config.json`` dict belong to the family (``model_type`` / ``architectures``)?
- ``open(folder, fmt, raw)``: the checkpoint under the family's own key names: config, tensor store (a
  foreign layout renamed/repacked), and the quantized linears (``models.checkpoint.OpenedCheckpoint``).
- ``build(opened, options)``: the module tree on the meta device, filled from the store (``LoadedModel``).
- ``runtime(loaded, conv_mode)``: what the engine needs per loaded model: chat templates, prompt
  tokenization with image markers, image processing, context length (``Runtime``).
- ``describe(opened)`` and ``part_of(key)``: the architecture facts and weight parts ``inspect`` reports.
- ``benchmark_prompts()``: how ``gracevlm eval`` asks this family benchmark questions
  (``models.benchmark_prompts``; the base is LLaVA-1.5's protocol).
- ``export_formats`` (what ``gracevlm export --format`` may name for it), ``export_writer(fmt)`` (None: the LLaVA
  writers inside ``gracevlm.export``, which predate this hook), ``export_dtype(fmt)`` (the default dense dtype),
  ``export_card(fmt, out, source)`` (the model card's usage sections) and ``transformers_check(folder)`` (the
  ``export --check transformers`` peer); for training exports ``owns_model`` / ``checkpoint_key`` /
  ``checkpoint_tensor`` / ``config_for_model`` (+ ``qat_skip_keywords``, ``qat_fields``, ``release_dtype``); for
  training itself ``training_format`` / ``image_tokens`` / ``training_part`` / ``forward_batch``.

The family's model object is what the engine drives (``engine.generate``, ``engine.scheduler``), with no
family test in the engine: ``vision_tower`` (None: no images), ``compute_dtype``, ``new_cache(slots, max_len, pool=None)`` (``models.kv_cache``),
``language_model`` (``lm_head``, ``spec.hidden_size``), ``encode_images(preprocessed)`` -> image features,
``prompt_for(ids, features)`` -> a prompt with ``length``, ``embeds`` and ``decode_offset`` (rope position of
a decode token minus its cache index: 0 for LLaVA, Qwen3-VL's M-RoPE delta), ``forward_prompt(prompt, cache,
slot, start, end, logits_for)`` -> logits of one prefill chunk ("last", "all", or "none": the cache only), and
``forward_decode(tokens, cache_positions, offsets, cache, slots, rows_alone)`` -> one token per row with each
row's own offset. For ``gracevlm bench``:
``decode_read_bytes()`` -> the weight bytes one decode step reads, by kind (``models.loader.decode_read_bytes``).

Packages are imported only when a checkpoint asks for them.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from .benchmark_prompts import BenchmarkPrompts
    from .checkpoint import OpenedCheckpoint
    from .loader import LoadedModel, LoadOptions

# family name -> package; a new family is one line here plus its folder
FAMILY_PACKAGES = {"llava": "gracevlm.models.llava", "qwen3_vl": "gracevlm.models.qwen3_vl"}


class Runtime(ABC):
    """The per-model half of a family that the engine drives (prompts and images in, ids and pixels out).

    ``image_marker``: the id standing for one image in prompt ids (LLaVA: -200; the model's
    ``embed_prompt`` replaces it by that image's features). ``max_context``: positions the model takes."""

    image_marker: int
    max_context: int

    @abstractmethod
    def chat_prompt(self, messages: list[dict], conv_mode: str | None = None) -> tuple[str, list[Any]]:
        """OpenAI-style messages (content a string or text/image parts) -> (templated prompt text, images in
        prompt order). Raises InputError naming the message that cannot be rendered."""

    @abstractmethod
    def user_prompt(self, prompt: str, n_images: int, conv_mode: str | None = None, system: str | None = None) -> str:
        """A single-turn prompt with ``n_images`` images, templated (``system``: the system text to use)."""

    @abstractmethod
    def tokenize(self, prompt_text: str) -> list[int]:
        """Templated text -> ids, with ``image_marker`` at each image's place."""

    @abstractmethod
    def text_ids(self, text: str) -> list[int]:
        """A plain prompt with no template (no image markers): ids as the tokenizer reads ``text``."""

    @abstractmethod
    def preprocess(self, images: list[Any]) -> "torch.Tensor":
        """Images (paths, bytes, PIL, decoded images) -> the vision tower's input tensor."""

    @abstractmethod
    def image_positions(self) -> int:
        """The most prompt positions one image can take (admission checks run before any image is decoded)."""

    @abstractmethod
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes of text one token can stand for (a text longer than ``n`` times that cannot
        fit in ``n`` positions: refused before tokenizing)."""

    @abstractmethod
    def set_max_image_pixels(self, max_pixels: int) -> None:
        """Raise or lower the decompression-bomb cap of ``preprocess``."""

    @property
    @abstractmethod
    def max_image_pixels(self) -> int:
        """The current pixel cap."""


@dataclass
class ExportFacts:
    """What a family's export writer tells ``gracevlm.export`` about the folder it wrote: the quantized linears
    carried over, the dense-dequantization rounding (``{"dtype", "rule", "max_abs", "mean_abs"}``) and notes."""

    quantized_layers: int = 0
    group_size: int | None = None
    bits: int | None = None
    rounding: dict | None = None
    notes: list[str] = field(default_factory=list)


class Family(ABC):
    """One model family (see the module docstring for what each method promises)."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()
    export_formats: tuple[str, ...] = ()

    def recognises(self, raw: dict) -> bool:
        arch = raw.get("architectures")
        arch = arch if isinstance(arch, list) else []
        return raw.get("model_type") in self.model_types or any(a in self.architectures for a in arch)

    @abstractmethod
    def open(self, folder: Path, fmt: str, raw: dict) -> "OpenedCheckpoint": ...

    @abstractmethod
    def build(self, opened: "OpenedCheckpoint", options: "LoadOptions") -> "LoadedModel": ...

    @abstractmethod
    def runtime(self, loaded: "LoadedModel", conv_mode: str | None = None) -> Runtime: ...

    @abstractmethod
    def describe(self, opened: "OpenedCheckpoint") -> dict: ...

    def part_of(self, key: str) -> str:
        """Which part of the model a tensor belongs to (inspect's bytes by part)."""
        return "weights"

    def benchmark_prompts(self) -> "BenchmarkPrompts":
        """The benchmark prompt style of this family (default: LLaVA-1.5's protocol, the eval modules' own)."""
        from .benchmark_prompts import BenchmarkPrompts

        return BenchmarkPrompts()

    # training exports (gracevlm.train): models built in memory, written back in the family's layout.
    # ``qat_skip_keywords``: what config.json ``qat.skip_keywords`` records (GRACE's list for the family);
    # ``qat_fields``: the keys of that ``qat`` block GRACE's training script for the family writes;
    # ``release_dtype``: the dtype GRACE's releases store dense and baked tensors in (None: the trainer's
    # ``export_dtype`` for dense tensors, baked weights in the training dtype).
    qat_skip_keywords: tuple[str, ...] = ()
    qat_fields: tuple[str, ...] = ("bits", "group_size", "learn_scales", "skip_keywords", "num_replaced")
    release_dtype: str | None = None

    # gracevlm export: folders for other runtimes, written from an opened checkpoint
    def export_writer(self, fmt: str):
        """``write(opened, fmt, out_folder, dtype, progress) -> ExportFacts`` for ``fmt`` (one of
        ``export_formats``); raises InputError (one line) for a request it cannot write exactly."""
        return None

    def export_dtype(self, fmt: str) -> str:
        """The dense dtype an export of ``fmt`` gets by default: the family's release dtype, else float16."""
        return self.release_dtype or "float16"

    def export_card(self, fmt: str, out: str, source: str) -> dict | None:
        """The model card's family parts: ``{"what": "<one phrase: what the folder is>", "usage": "<markdown after
        the provenance list: how to load out in each engine>"}``."""
        return None

    def transformers_check(self, folder: Path):
        """The ``export --check transformers`` peer for export ``folder``: an object whose ``run(query, image,
        forced, n)`` (a one-turn question, a PIL image or None, gracevlm's tokens) returns (transformers' greedy
        tokens without the stop token, its teacher-forced logits rows ``[len(forced), V]``). None: LLaVA's peer
        in ``export.check``."""
        return None

    # training exports (gracevlm.train): models built in memory, written back in the family's layout
    def owns_model(self, model) -> bool:
        return False

    def checkpoint_key(self, name: str, model) -> str | None:
        raise NotImplementedError(f"family {self.name!r} has no training export")

    def checkpoint_tensor(self, key: str, tensor: "torch.Tensor", model) -> "torch.Tensor":
        """A state-dict tensor in the shape the checkpoint stores under ``key`` (default: unchanged)."""
        return tensor

    def config_for_model(self, model, conv_mode: str | None = None, max_length: int = 2048) -> dict:
        raise NotImplementedError(f"family {self.name!r} has no training export")

    # training (gracevlm.train): data format and the differentiable forward
    def training_format(self, loaded: "LoadedModel", conv_mode: str | None = None):
        """An object with ``tokenizer``, ``image_marker``, ``max_length`` (the positions the model takes),
        ``example(record, index) -> models.training.Example`` and ``pixels(path)`` (a tensor; formats whose image
        token count varies also give ``image_tokens(pixels)`` and ``collate_pixels(list)``)."""
        raise NotImplementedError(f"family {self.name!r} cannot be trained yet")

    def image_tokens(self, model) -> int | None:
        """Feature rows one image contributes (its markers are expanded to this many positions); None when the
        count depends on the image (the training format's ``image_tokens(pixels)`` then gives it)."""
        raise NotImplementedError(f"family {self.name!r} cannot be trained yet")

    def training_part(self, name: str) -> str:
        """Which part a parameter belongs to for training: ``"vision"`` (frozen unless ``train_vision``),
        ``"projector"`` (trained unless frozen, its own learning rate) or ``"language"``."""
        return "language"

    def forward_batch(self, model, batch: dict, hidden_layer: int | None = None):
        """Cache-free differentiable forward over a collated batch -> ``models.training.BatchOutput``."""
        raise NotImplementedError(f"family {self.name!r} cannot be trained yet")


def get_family(name: str) -> Family:
    """The family called ``name`` (imported on first use)."""
    package = FAMILY_PACKAGES.get(name)
    if package is None:
        raise CheckpointError(f"unknown model family {name!r}; gracevlm knows {sorted(FAMILY_PACKAGES)}")
    return importlib.import_module(package).FAMILY


def families() -> list[Family]:
    return [get_family(name) for name in FAMILY_PACKAGES]


def benchmark_prompt_styles() -> dict[str, "BenchmarkPrompts"]:
    """Every family's benchmark prompt style by its name (``llava-1.5``, ``grace-qwen3-vl``, ...)."""
    styles = {}
    for family in families():
        prompts = family.benchmark_prompts()
        styles.setdefault(prompts.style, prompts)
    return styles


def family_for_config(raw: dict, source: str = "config.json") -> Family:
    """The family a ``config.json`` dict belongs to. A config naming neither ``model_type`` nor
    ``architectures`` is read as LLaVA-original (older LLaVA training scripts wrote such configs)."""
    for family in families():
        if family.recognises(raw):
            return family
    if raw.get("model_type") is None and not raw.get("architectures"):
        return get_family("llava")
    found = raw.get("model_type") or raw.get("architectures")
    known = {f.name: f.model_types for f in families()}
    raise CheckpointError(f"{source}: model type {found!r} is not supported; gracevlm reads these families "
                          f"(model_type values): {known}")


def family_for_model(model) -> Family:
    """The family whose training export writes ``model`` (an in-memory module tree)."""
    for family in families():
        if family.owns_model(model):
            return family
    raise InputError(f"cannot export a {type(model).__name__}: no model family knows it (families: "
                     f"{sorted(FAMILY_PACKAGES)})")
