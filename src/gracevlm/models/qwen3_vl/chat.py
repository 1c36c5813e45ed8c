"""Qwen3-VL prompts: the checkpoint's own chat template rendered as transformers renders it, each
``<|image_pad|>`` expanded to its image's token count, then tokenized.

Rendering: Jinja2 ``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with the
``loopcontrols`` extension, ``tojson`` = ``json.dumps(ensure_ascii=False)``, ``raise_exception`` and
``strftime_now``; messages are reduced to plain JSON data first (an image object in a content part
becomes a placeholder string: templates only test for the key). Template sources, first found:
``chat_template.jinja``, ``chat_template.json``, ``tokenizer_config.json``'s ``chat_template``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import numpy as np
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ...errors import CheckpointError, InputError
from ...formats.checkpoint import read_json_object
from .config import Qwen3VLConfig
from .processing import ImageProcessorConfig, image_token_count, process_images
from .tokenizer import QwenTokenizer

IMAGE_PAD = "<|image_pad|>"


def load_chat_template(folder: str | os.PathLike) -> str:
    """The checkpoint's chat template text (see the module docstring for the search order)."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            tpl = read_json_object(path).get("chat_template")
            if isinstance(tpl, list):  # named templates: [{"name": ..., "template": ...}]
                tpl = next((t.get("template") for t in tpl if isinstance(t, dict) and t.get("name") == "default"),
                           None)
            if isinstance(tpl, str):
                return tpl
            if tpl is not None:
                raise CheckpointError(f"{path}: chat_template must be a string")
    raise CheckpointError(f"{folder}: no chat template (chat_template.jinja, chat_template.json or "
                          "tokenizer_config.json's chat_template)")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise CheckpointError(f"the chat template does not compile: {exc}") from exc


def _plain(value):
    """JSON-only copy of template input; any other object (a PIL image, bytes) becomes ``"<TypeName>"``."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True,
                tools: list[dict] | None = None, **variables) -> str:
    """The prompt text of ``messages`` (OpenAI-style dicts, content a string or a list of parts)."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise InputError("messages must be a list of {'role': ..., 'content': ...} objects")
    try:
        return _compile(template).render(messages=_plain(messages), tools=_plain(tools), documents=None,
                                         add_generation_prompt=add_generation_prompt, **_plain(variables))
    except jinja2.exceptions.TemplateError as exc:
        raise InputError(f"the chat template rejected these messages: {exc}") from exc


def expand_image_pads(text: str, grids: list, merge_size: int) -> str:
    """Each ``<|image_pad|>`` -> ``t*h*w / m^2`` copies for its image, in order; the counts must match."""
    parts = text.split(IMAGE_PAD)
    if len(parts) - 1 != len(grids):
        raise InputError(f"the prompt has {len(parts) - 1} image placeholder(s) but {len(grids)} image(s) "
                         "were given")
    out = [parts[0]]
    for grid, tail in zip(grids, parts[1:]):
        out.append(IMAGE_PAD * image_token_count(grid, merge_size))
        out.append(tail)
    return "".join(out)


@dataclass
class ChatPrompt:
    """The checkpoint's template + tokenizer + the token ids the model config names."""

    template: str
    tokenizer: QwenTokenizer
    config: Qwen3VLConfig

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, config: Qwen3VLConfig | None = None) -> "ChatPrompt":
        config = config or Qwen3VLConfig.from_file(Path(folder) / "config.json")
        out = cls(load_chat_template(folder), QwenTokenizer.from_folder(folder), config)
        out.check_token_ids()
        return out

    def check_token_ids(self) -> None:
        """The config's image/vision token ids must be the tokenizer's ids of those tokens."""
        for attr, token in (("image_token_id", IMAGE_PAD), ("vision_start_token_id", "<|vision_start|>"),
                            ("vision_end_token_id", "<|vision_end|>")):
            got = self.tokenizer.token_id(token)
            if got != getattr(self.config, attr):
                raise CheckpointError(f"config.json {attr} is {getattr(self.config, attr)} but the tokenizer "
                                      f"gives {token} id {got}")

    def text(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
        return render_chat(self.template, messages, add_generation_prompt,
                           **{**self.tokenizer.special_tokens(), **variables})

    def ids(self, messages: list[dict], grids: list = (), add_generation_prompt: bool = True,
            **variables) -> list[int]:
        """Token ids of ``messages`` with the image pads expanded for ``grids`` (one ``(t, h, w)`` per image,
        in the order the images appear)."""
        text = expand_image_pads(self.text(messages, add_generation_prompt, **variables), list(grids),
                                 self.config.vision.spatial_merge_size)
        return self.tokenizer.encode(text)


def message_images(messages: list[dict]) -> list:
    """The ``image`` values of the content parts, in prompt order (what the processor's chat path loads)."""
    found = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            found += [part["image"] for part in content if isinstance(part, dict) and part.get("image") is not None]
    return found


@dataclass
class PromptInputs:
    """Model inputs of one conversation: ``ids``, ``pixel_values [n_patches, C*T*P*P]`` float32 and
    ``grid_thw [n_images, 3]`` (both ``None`` without images)."""

    ids: list[int]
    pixel_values: np.ndarray | None
    grid_thw: np.ndarray | None


def build_inputs(prompt: ChatPrompt, image_config: ImageProcessorConfig, messages: list[dict],
                 images: list | None = None, add_generation_prompt: bool = True) -> PromptInputs:
    """Template, images and ids in one step, as ``Qwen3VLProcessor.apply_chat_template(..., tokenize=True)``:
    ``images`` default to the content parts' ``image`` values (PIL images, bytes or paths)."""
    images = message_images(messages) if images is None else list(images)
    if not images:
        return PromptInputs(prompt.ids(messages, (), add_generation_prompt), None, None)
    pixels, grids = process_images(images, image_config)
    return PromptInputs(prompt.ids(messages, grids.tolist(), add_generation_prompt), pixels, grids)
