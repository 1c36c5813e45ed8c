"""Request and response bodies of the OpenAI API subset we serve (pydantic models in OpenAI's shapes).

Requests ignore fields they do not know (clients send many optional ones); fields we know but cannot
honour (``tools``/``functions``, penalties, ``suffix`` ...) are refused with a clear 400 by
``serving.py``. Types are strict, as OpenAI's: ``max_tokens: "5"``, ``max_tokens: true`` or
``stream: "yes"`` are refused (an integer is accepted where a number is expected). Responses are built as plain dicts in ``serving.py`` with the helpers below, so that
their JSON is exactly OpenAI's (``null`` where OpenAI writes ``null``).
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


class _Lenient(BaseModel):
    """Unknown fields ignored; known fields strictly typed (no "5" -> 5, no true -> 1)."""

    model_config = ConfigDict(extra="ignore", strict=True)


# -- requests ----------------------------------------------------------------------------------------

class ImageURL(_Lenient):
    url: str
    detail: Optional[str] = None


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: Union[ImageURL, str]

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class _SamplingFields(_Lenient):
    model: str
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: Optional[int] = Field(default=None, ge=0)  # extension (not in OpenAI's API)
    seed: Optional[int] = Field(default=None, ge=SEED_MIN, le=SEED_MAX)  # what torch's generators accept
    stop: Union[str, list[str], None] = None
    n: Optional[int] = Field(default=None, ge=1)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    functions: Optional[list[Any]] = None
    function_call: Optional[Any] = None
    response_format: Optional[dict[str, Any]] = None


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]  # text(s) or token ids (used as given, no BOS)
    max_tokens: Optional[int] = Field(default=16, ge=1)
    echo: Optional[bool] = False
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    suffix: Optional[str] = None
    best_of: Optional[int] = None


# -- responses ---------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage; ``cached_tokens``: prompt positions served from a prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def chat_choice(index: int, text: str, finish: str, logprobs: dict | None = None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": logprobs, "finish_reason": finish}


def chat_completion(rid: str, created: int, model: str, choices: list[dict], use: dict) -> dict:
    """``choices``: ``chat_choice`` dicts."""
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": use, "system_fingerprint": None}


def chat_chunk(rid: str, created: int, model: str, delta: dict | None, finish: str | None,
               include_usage: bool, use: dict | None = None, index: int = 0, logprobs: dict | None = None) -> dict:
    """One ``chat.completion.chunk``; ``delta=None`` gives the usage-only chunk (empty ``choices``)."""
    choices = [] if delta is None else [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish}]
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": choices, "system_fingerprint": None}
    if include_usage:
        chunk["usage"] = use
    return chunk


def text_choice(index: int, text: str, finish: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def text_completion(rid: str, created: int, model: str, choices: list[dict], use: dict) -> dict:
    """``choices``: ``text_choice`` dicts."""
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": use, "system_fingerprint": None}


def text_chunk(rid: str, created: int, model: str, text: str | None, finish: str | None,
               include_usage: bool, use: dict | None = None, index: int = 0, logprobs: dict | None = None) -> dict:
    """One streamed ``text_completion``; ``text=None`` gives the usage-only chunk (empty ``choices``)."""
    choices = [] if text is None else [text_choice(index, text, finish, logprobs)]
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
             "system_fingerprint": None}
    if include_usage:
        chunk["usage"] = use
    return chunk


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "gracevlm"}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
