"""LLaVA-1.5 conversation templates and image-placeholder tokenisation.

Templates are data (``Template``). Two separator styles are implemented:

* ``TWO`` (``vicuna_v1``/``v1``, ``llava_v1``): ``system + sep``, then for message i
  ``role + ": " + text + (sep if i is even else sep2)``. An empty message, which in practice is the final
  assistant slot, gives ``role + ":"`` with no separator. Single turn:
  ``"{system} USER: <image>\\n{query} ASSISTANT:"``. Earlier assistant turns end with ``</s>``.
* ``PLAIN`` (``plain``, LLaVA's ``conv_llava_plain``, used for projector pre-training): no system text
  and no roles. Each non-empty message adds ``text + "\\n"``, and the empty final assistant slot adds
  nothing, so a single turn renders as ``"<image>\\n{query}\\n"``. LLaVA's template leaves ``sep2``
  unset (None), so a non-empty assistant turn would crash there. Here ``sep2`` is ``"\\n"`` as well.

A leading ``{"role": "system", "content": text}`` message replaces the template's system text (the
``TWO`` style's system slot: ``text + sep`` comes first); ``PLAIN`` has no system slot and refuses one,
as do a second system message and one that is not first.

``tokenize_with_images`` is LLaVA's ``tokenizer_image_token``. Each ``<image>``-separated chunk is
encoded on its own (each gets the SentencePiece dummy prefix). The ids are joined with one BOS in
front and ``IMAGE_TOKEN_INDEX`` (-200) between chunks.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

from ...errors import InputError

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200

SYSTEM_VICUNA_V1 = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the user's questions.")
SYSTEM_LLAVA_V1 = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the human's questions.")


class SeparatorStyle(enum.Enum):
    TWO = "two"
    PLAIN = "plain"


@dataclass(frozen=True)
class Template:
    name: str
    system: str
    roles: tuple[str, str]
    sep_style: SeparatorStyle
    sep: str
    sep2: str


TEMPLATES: dict[str, Template] = {
    "vicuna_v1": Template("vicuna_v1", SYSTEM_VICUNA_V1, ("USER", "ASSISTANT"), SeparatorStyle.TWO, " ", "</s>"),
    "llava_v1": Template("llava_v1", SYSTEM_LLAVA_V1, ("USER", "ASSISTANT"), SeparatorStyle.TWO, " ", "</s>"),
    "plain": Template("plain", "", ("", ""), SeparatorStyle.PLAIN, "\n", "\n"),
}
ALIASES = {"v1": "vicuna_v1"}
DEFAULT_CONV_MODE = "vicuna_v1"


def template_names() -> list[str]:
    return sorted([*TEMPLATES, *ALIASES])


def get_template(name: str | Template) -> Template:
    """The template called ``name`` (``v1`` is an alias of ``vicuna_v1``); a Template passes through."""
    if isinstance(name, Template):
        return name
    template = TEMPLATES.get(ALIASES.get(name, name)) if isinstance(name, str) else None
    if template is None:
        raise InputError(f"unknown conversation template {name!r}; known templates: {', '.join(template_names())}")
    return template


def _check_messages(messages: Sequence[Mapping[str, object]]) -> list[tuple[str, str]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InputError("messages must be a list of {'role': 'user'|'assistant', 'content': str} dicts")
    if not messages:
        raise InputError("messages is empty; give at least one user message")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InputError(f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise InputError(f"message {i} has role {role!r}; roles must alternate user/assistant starting "
                             f"with user, so message {i} must be {expected!r}")
        content = message.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise InputError(f"message {i} ({role}) content must be a str, got {type(content).__name__}")
        last = i == len(messages) - 1
        if not content and not (last and role == "assistant"):
            raise InputError(f"message {i} ({role}) is empty; only the final assistant message may be empty "
                             f"(it marks the slot the model answers in)")
        turns.append((role, content))
    if turns[-1][0] == "user":
        turns.append(("assistant", ""))
    return turns


def split_system(messages: Sequence[Mapping[str, object]]) -> tuple[str | None, Sequence[Mapping[str, object]]]:
    """``(system text or None, the other messages)``; a system message is allowed only once, first."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        return None, messages
    roles = [m.get("role") if isinstance(m, Mapping) else None for m in messages]
    positions = [i for i, r in enumerate(roles) if r == "system"]
    if not positions:
        return None, messages
    if len(positions) > 1:
        raise InputError(f"messages {positions} are system messages; at most one system message is allowed")
    if positions[0] != 0:
        raise InputError(f"message {positions[0]} is a system message; the system message must come first")
    text = messages[0].get("content")
    text = "" if text is None else text
    if not isinstance(text, str):
        raise InputError(f"message 0 (system) content must be a str, got {type(text).__name__}")
    return text, messages[1:]


def render_prompt(messages: Sequence[Mapping[str, object]], template: str | Template = DEFAULT_CONV_MODE) -> str:
    """Renders ``[{"role": "system"?}, {"role": "user"|"assistant", "content": str}, ...]`` with a template.
    A leading system message replaces the template's system text. A trailing user message gets an empty
    assistant slot. User texts are used as given, so pass them through ``prepare_user_text`` first to
    place ``<image>``."""
    t = get_template(template)
    system, messages = split_system(messages)
    if system is not None:
        if t.sep_style is not SeparatorStyle.TWO:
            raise InputError(f"the {t.name!r} template has no system slot; send no system message with it")
        t = replace(t, system=system)
    turns = _check_messages(messages)
    seps = (t.sep, t.sep2)
    if t.sep_style is SeparatorStyle.TWO:
        out = [t.system + t.sep]
        for i, (role, text) in enumerate(turns):
            name = t.roles[0 if role == "user" else 1]
            out.append(f"{name}: {text}{seps[i % 2]}" if text else f"{name}:")
        return "".join(out)
    if t.sep_style is SeparatorStyle.PLAIN:
        return t.system + "".join(text + seps[i % 2] for i, (_, text) in enumerate(turns) if text)
    raise InputError(f"template {t.name!r} has unsupported separator style {t.sep_style!r}")


def prepare_user_text(text: str, n_images: int) -> str:
    """Places the image placeholders in a user message the way LLaVA does. If the text has no ``<image>``,
    one ``"<image>\\n"`` per image goes in front of it. If it does, there must be exactly one per image."""
    if not isinstance(text, str):
        raise InputError(f"user text must be a str, got {type(text).__name__}")
    if not isinstance(n_images, int) or n_images < 0:
        raise InputError(f"n_images must be a non-negative int, got {n_images!r}")
    count = text.count(IMAGE_TOKEN)
    if count == 0:
        return (IMAGE_TOKEN + "\n") * n_images + text
    if count != n_images:
        raise InputError(
            f"prompt has {count} {IMAGE_TOKEN} placeholder{'s' if count != 1 else ''} but {n_images} "
            f"image{' was' if n_images == 1 else 's were'} given; use one {IMAGE_TOKEN} per image, or none "
            f"to put the images before the text")
    return text


def tokenize_with_images(prompt: str, tokenizer) -> list[int]:
    """LLaVA's ``tokenizer_image_token``. Splits on ``<image>`` and encodes every chunk separately with
    BOS. The result has one BOS, then each chunk's ids without their BOS, with ``IMAGE_TOKEN_INDEX``
    between chunks. An empty chunk (the prompt starts with ``<image>``, or two are adjacent) adds no
    ids. A prompt without ``<image>`` gives plain ``encode(prompt)``."""
    if not isinstance(prompt, str):
        raise InputError(f"prompt must be a str, got {type(prompt).__name__}")
    ids = [tokenizer.bos_id]
    for k, chunk in enumerate(prompt.split(IMAGE_TOKEN)):
        if k:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(tokenizer.encode(chunk, add_bos=True)[1:])
    return ids


def default_conv_mode(config: Mapping[str, object]) -> str:
    """The template a checkpoint should be prompted with:

    1. ``config["conv_mode"]`` if present (a GRACE config may carry it); it must name a known template;
    2. ``plain`` if the config comes from projector pre-training (``tune_mm_mlp_adapter: true``);
    3. otherwise ``vicuna_v1``, LLaVA's own eval default for LLaVA-1.5.

    Returns the canonical name (``v1`` becomes ``vicuna_v1``)."""
    mode = config.get("conv_mode")
    if mode is not None:
        return get_template(mode).name
    if config.get("tune_mm_mlp_adapter") is True:
        return "plain"
    return DEFAULT_CONV_MODE
