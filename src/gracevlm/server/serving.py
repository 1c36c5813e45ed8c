"""Request -> engine -> response / server-sent events. The only server module that talks to the engine.

Semantics worth knowing (documented for users in ``gracevlm serve --help`` and the README):

* Sampling defaults are the engine's, not OpenAI's: ``temperature`` 0 (greedy), ``top_p`` 1, so the
  server answers exactly what ``gracevlm run`` / ``VLM.generate`` answers for the same request.
  ``top_k`` is accepted as an extension.
* Chat: ``max_completion_tokens`` (or the older ``max_tokens``) defaults to the rest of the context.
  Completions: ``max_tokens`` defaults to 16 (as OpenAI's), and the prompt is used with NO template: BOS,
  then the prompt text tokenized as is.
* ``usage.prompt_tokens`` counts prompt positions (image positions included, see ``engine.scheduler``);
  ``completion_tokens`` the generated tokens (EOS not counted).
* A request that runs past ``--request-timeout`` gets HTTP 408 (non-streaming) or, once streaming,
  an ``{"error": ...}`` event followed by ``data: [DONE]``.
* ``n`` choices share one prefill (``BatchScheduler.submit_choices``); choice i samples with
  ``choice_seed(seed, i)``. A list of prompts gives choice ``p * n + i`` for prompt p. ``usage`` counts
  each prompt once. ``logprobs`` are those of the distribution each token was drawn from
  (``engine.sampling``); ``echo`` + ``logprobs`` give the prompt tokens' log-probabilities under the
  model (the first token has none). ``usage.prompt_tokens_details.cached_tokens`` is the engine's
  ``Timings.cached_tokens`` (prompt positions reused from the prefix cache, ``--prefix-cache-gib``). ``response_format: json_object`` decodes
  under a JSON grammar (``engine.json_grammar``): an answer that ends with "stop" always parses as an
  object; ``json_schema`` is refused.
* Admission (``engine.admission``): text size, image count (``--limit-images-per-prompt``) and context
  length are checked before any image is fetched or decoded and before anything is embedded; the
  model's id shown to clients is ``--served-model-name`` or the folder's name, never its path.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import pydantic
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from ..engine.admission import check_text_size, plan_chat, prepare_planned
from ..engine.generate import PromptTooLong
from ..engine.kv_slots import KVBudgetExceeded
from ..engine.sampling import SamplingParams
from ..engine.prepare import PreparedPrompt, prepare_ids, prepare_text
from ..engine.scheduler import BatchScheduler, QueueFull, RequestHandle, SchedulerClosed
from ..errors import GraceVLMError, InputError
from . import protocol as P
from .choices import ClientDisconnected, LogprobCursor, chat_logprobs, completion_logprobs, follow_choices
from .media import (DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_IMAGE_SIDE, MediaError,
                    MediaPolicy, load_image_url)
from .memory import pin_mmap_threshold, release_free_memory
from .metrics import Metrics
from .validation import describe_validation_error

log = logging.getLogger("gracevlm.server")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


@dataclass
class ServerConfig:
    model: str
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = field(default=None, repr=False)
    max_batch_size: int = 8
    max_queue: int = 64
    max_model_len: int | None = None
    prefill_chunk: int | None = None
    prefix_cache_gib: float = 2.0
    kv_dtype: str | None = None
    kv_cache_gib: float | None = None  # the KV pool (engine.kv_slots); None: half the memory available
    batch_invariant: bool = True
    request_timeout: float | None = 600.0
    max_body_bytes: int = 20 * 2**20
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    allowed_local_media_path: str | None = None
    allow_remote_images: bool = False
    image_fetch_timeout: float = 10.0
    allow_private_media_hosts: bool = False
    max_image_side: int = DEFAULT_MAX_IMAGE_SIDE
    limit_images_per_prompt: int = 8
    allowed_origins: tuple[str, ...] = ()  # browser origins besides the server's own ("*": any)
    allowed_hosts: tuple[str, ...] = ("*",)  # Host header values accepted ("*": any; the CLI narrows it)
    backend: str | None = None
    device: str = "auto"
    quantize: str | None = None
    vision_dtype: str | None = None
    conv_mode: str | None = None

    @property
    def model_name(self) -> str:
        """The id clients see and send: ``served_model_name``, else the folder's name (never its path)."""
        return self.served_model_name or public_model_name(self.model)

    def media_policy(self) -> MediaPolicy:
        local = Path(self.allowed_local_media_path) if self.allowed_local_media_path else None
        return MediaPolicy(allowed_local_path=local, allow_remote=self.allow_remote_images,
                           max_image_bytes=self.max_image_bytes, max_image_pixels=self.max_image_pixels,
                           fetch_timeout=self.image_fetch_timeout, allow_private_hosts=self.allow_private_media_hosts,
                           max_image_side=self.max_image_side)


def public_model_name(model: str) -> str:
    """A Hub id as is; a local path by its last component (the absolute path is not shown to clients)."""
    path = Path(str(model))
    if path.exists() or path.is_absolute() or str(model).startswith((".", "~")):
        return path.resolve().name or str(model)
    return str(model)


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type_: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type_ or ERROR_TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return P.error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def to_api_error(exc: BaseException, param: str = "messages") -> APIError:
    """Map engine / media errors to HTTP errors; anything else is a bug (500). ``param`` names the input
    field of the endpoint in use ("messages" or "prompt")."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, MediaError):
        return APIError(exc.status, exc.message, exc.code, param)
    if isinstance(exc, QueueFull):
        return APIError(429, str(exc), "queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, SchedulerClosed):
        return APIError(503, f"the server is shutting down ({exc})", "shutting_down")
    if isinstance(exc, PromptTooLong):
        return APIError(400, str(exc), "context_length_exceeded", param)
    if isinstance(exc, KVBudgetExceeded):
        return APIError(400, str(exc), "kv_cache_exceeded", "max_tokens")
    if isinstance(exc, (InputError, GraceVLMError)):
        return APIError(400, str(exc), "invalid_value")
    raise exc


class ServerState:
    """The loaded model, its scheduler and the server's metrics. Loading runs in a background thread so
    that the socket is bound (and ``/health`` answers 503) while the weights load."""

    def __init__(self, config: ServerConfig, loader: Callable[[ServerConfig], Any] | None = None):
        self.config = config
        self.metrics = Metrics()
        self.media = config.media_policy()
        self.created = P.now()
        self.vlm = None
        self.scheduler: BatchScheduler | None = None
        self.load_error: str | None = None
        self.on_load_failure: Callable[[], None] | None = None
        self._loader = loader or _default_loader
        self._thread: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        return self.scheduler is not None and self.scheduler.alive

    def start_loading(self) -> None:
        self._thread = threading.Thread(target=self._load, name="gracevlm-load", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        c = self.config
        try:
            t0 = time.perf_counter()
            vlm = self._loader(c)
            allowed = max(c.max_image_pixels, c.max_image_side ** 2)  # the padded square counts too
            if allowed > vlm.max_image_pixels:  # the engine must not refuse what we allow
                vlm.set_max_image_pixels(allowed)
            scheduler = BatchScheduler(vlm, max_batch_size=c.max_batch_size, max_queue=c.max_queue,
                                       max_model_len=c.max_model_len, request_timeout=c.request_timeout,
                                       prefill_chunk=c.prefill_chunk, batch_invariant=c.batch_invariant)
            self.vlm, self.scheduler = vlm, scheduler
            pin_mmap_threshold()  # big request buffers are returned to the OS when freed (memory.py)
            log.info("model %s loaded in %.1f s as %r; %d slots of up to %d positions (KV pool %.1f MiB)",
                     c.model, time.perf_counter() - t0, c.model_name, scheduler.max_batch_size,
                     scheduler.max_model_len, vlm.kv_pool.budget_bytes / 2**20)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("loading the model failed: %s", self.load_error)
            if self.on_load_failure is not None:
                self.on_load_failure()

    def shutdown(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown()

    # -- checks shared by the routes ----------------------------------------------------------------
    def require_ready(self) -> BatchScheduler:
        if self.scheduler is None:
            msg = f"the model failed to load: {self.load_error}" if self.load_error else "the model is still loading"
            raise APIError(503, msg, "model_not_ready", headers={"Retry-After": "5"})
        if not self.scheduler.alive:
            raise APIError(503, "the engine is shut down", "shutting_down")
        return self.scheduler

    def check_model(self, name: str) -> None:
        if name not in (self.config.model_name, self.config.model):  # the path itself still works
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.config.model_name!r}",
                           "model_not_found", "model")


def _default_loader(config: ServerConfig):
    from ..engine.vlm import load

    return load(config.model, device=config.device, backend=config.backend, quantize=config.quantize,
                conv_mode=config.conv_mode, vision_dtype=config.vision_dtype,
                prefix_cache_gib=config.prefix_cache_gib, kv_dtype=config.kv_dtype, kv_cache_gib=config.kv_cache_gib)


# -- request parsing -----------------------------------------------------------------------------------

async def parse_body(request: Request, model: type[pydantic.BaseModel]) -> Any:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc})", "invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", "invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", "invalid_json")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        param, message = describe_validation_error(exc)
        raise APIError(400, message, "invalid_value", param) from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", "invalid_json") from None


def _refuse(cond: bool, param: str, what: str) -> None:
    if cond:
        raise APIError(400, f"{param}: {what} is not supported by this server", "unsupported_parameter", param)


def _common_checks(req: P._SamplingFields, max_batch_size: int) -> None:
    if (req.n or 1) > max_batch_size:
        raise APIError(400, f"n: at most {max_batch_size} choices (the server's --max-batch-size), got {req.n}",
                       "invalid_value", "n")
    _refuse(bool(req.presence_penalty), "presence_penalty", "a non-zero presence penalty")
    _refuse(bool(req.frequency_penalty), "frequency_penalty", "a non-zero frequency penalty")
    _refuse(bool(req.logit_bias), "logit_bias", "logit_bias")


def sampling_params(req: P._SamplingFields, max_new_tokens: int, logprobs: int | None = None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    stop = req.stop if isinstance(req.stop, list) else ([req.stop] if req.stop else [])
    if len(stop) > 16:
        raise APIError(400, "stop: at most 16 stop strings are supported", "invalid_value", "stop")
    try:
        return SamplingParams(max_new_tokens=max_new_tokens,
                              temperature=0.0 if req.temperature is None else req.temperature,
                              top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
                              seed=req.seed, stop=stop, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    except InputError as exc:
        raise APIError(400, str(exc), "invalid_value") from None


def _chat_message_refs(req: P.ChatCompletionRequest) -> list[dict]:
    """Pydantic messages -> the engine's message dicts with each image left as its URL (not fetched yet:
    ``plan_chat`` checks image count and context first)."""
    out = []
    for msg in req.messages:
        role = "system" if msg.role == "developer" else msg.role
        if msg.content is None or isinstance(msg.content, str):
            out.append({"role": role, "content": msg.content or ""})
            continue
        out.append({"role": role, "content": [{"type": "text", "text": part.text} if isinstance(part, P.TextPart)
                                              else {"type": "image", "image": part.url} for part in msg.content]})
    return out


def _prepare_chat_checked(state: "ServerState", req: P.ChatCompletionRequest):
    """Plan (count, size and context checks), then fetch and decode the images, then encode them."""
    c = state.config
    plan = plan_chat(state.vlm, _chat_message_refs(req), c.conv_mode, state.scheduler.max_model_len,
                     c.limit_images_per_prompt)
    return prepare_planned(state.vlm, plan, lambda url: load_image_url(url, state.media))


def _prepare_text_checked(vlm, prompt: str, state: "ServerState"):
    check_text_size(prompt, vlm, state.scheduler.max_model_len)  # before tokenizing
    return prepare_text(vlm, prompt)


def _is_big(prepared) -> bool:
    return prepared.image_features is not None or len(prepared.prompt_ids) > 4096


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def _refuse_tools(req: P.ChatCompletionRequest) -> None:
    """``tools``, ``functions``, ``tool_choice`` and ``function_call`` are refused alike (no tool calling)."""
    for name in ("tools", "functions", "tool_choice", "function_call"):
        value = getattr(req, name)
        if value not in (None, [], "none"):
            raise APIError(400, f"{name}: tool and function calling is not supported by this server",
                           "unsupported_parameter", name)


def _response_format(req: P.ChatCompletionRequest) -> str:
    """"text" or "json_object" (grammar-constrained decoding); ``json_schema`` is refused."""
    rf = req.response_format or {}
    kind = rf.get("type", "text") if isinstance(rf, dict) else rf
    if kind in ("text", "json_object"):
        return kind
    if kind == "json_schema":
        raise APIError(400, "response_format: 'json_schema' is not supported (the grammar-constrained decoding "
                       "here knows JSON, not schemas); use {'type': 'json_object'} and describe the fields in the "
                       "prompt", "unsupported_parameter", "response_format")
    raise APIError(400, f"response_format: unknown type {kind!r}; expected 'text' or 'json_object'",
                   "invalid_value", "response_format")


def _completion_prompts(prompt, vocab: int) -> list[str | list[int]]:
    """``prompt`` as a list of texts or token-id lists (each id in ``[0, vocab)``)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt: the list of prompts is empty", "invalid_value", "prompt")
    prompts = [prompt] if isinstance(prompt[0], int) else list(prompt)
    for p in prompts:
        if isinstance(p, list):
            if not p:
                raise APIError(400, "prompt: a token-id prompt is empty", "invalid_value", "prompt")
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt: token ids must be in [0, {vocab}); got {bad[:5]}", "invalid_value",
                               "prompt")
    return prompts


# -- the two completion endpoints ------------------------------------------------------------------------

class Serving:
    def __init__(self, state: ServerState):
        self.state = state

    async def _submit(self, prepares: list[Callable[[], PreparedPrompt]], params: SamplingParams, n: int,
                      param: str) -> list[RequestHandle]:
        """Prepare (in a worker thread) and submit each prompt with ``n`` choices; all or nothing. Each
        prompt takes a place in the queue (429 when they do not all fit)."""
        scheduler = self.state.require_ready()
        stats = scheduler.stats()
        if len(prepares) > stats["max_queue"]:
            raise APIError(400, f"{param}: at most {stats['max_queue']} prompts per request (the server's "
                           f"--max-queue), got {len(prepares)}", "invalid_value", param)
        if stats["queue_depth"] + len(prepares) > stats["max_queue"]:  # refuse before spending time on images
            scheduler.note_rejected()
            raise to_api_error(QueueFull(f"{stats['queue_depth']} requests are waiting (max_queue="
                                         f"{stats['max_queue']}); retry later"))

        def work() -> list[RequestHandle]:
            handles: list[RequestHandle] = []
            prepared = None
            try:
                for prepare in prepares:
                    prepared = prepare()
                    handles += scheduler.submit_prepared_choices(prepared, params, n)
            except BaseException:
                for h in handles:
                    h.cancel()
                raise
            finally:
                if prepared is None or _is_big(prepared):  # a refused or big request: return its scratch
                    del prepared
                    release_free_memory()
            return handles

        try:
            return await run_in_threadpool(work)
        except Exception as exc:
            raise to_api_error(exc, param) from None

    @staticmethod
    def _usage(handles: list[RequestHandle], n: int) -> dict:
        """Each prompt (the first choice of each group of ``n``) counted once, every choice's tokens."""
        leaders = handles[::n]
        return P.usage(sum(h.prompt_tokens for h in leaders), sum(h.completion_tokens for h in handles),
                       sum(h.generation.timings.cached_tokens for h in leaders))

    def _observe(self, handle: RequestHandle) -> None:
        g = handle.generation
        if g.finish_reason in ("stop", "length"):
            self.state.metrics.observe_generation(g.timings.ttft_s, g.timings.total_s, handle.completion_tokens)

    def _timeout_error(self, handle: RequestHandle) -> APIError:
        return APIError(408, f"the request ran past the server's timeout after {handle.completion_tokens} tokens",
                        "request_timeout")

    async def _wait(self, handles: list[RequestHandle], request: Request, param: str) -> None:
        try:
            async for _ in follow_choices(handles, request):
                pass
        except ClientDisconnected:
            raise APIError(499, "the client closed the connection; the request was cancelled",
                           "client_closed_request") from None
        except Exception as exc:
            raise to_api_error(exc, param) from None
        for h in handles:
            if h.generation.finish_reason == "timeout":
                raise self._timeout_error(h)
        for h in handles:
            self._observe(h)

    async def chat(self, request: Request):
        state = self.state
        req = await parse_body(request, P.ChatCompletionRequest)
        scheduler = state.require_ready()
        state.check_model(req.model)
        _common_checks(req, scheduler.max_batch_size)
        _refuse_tools(req)
        response_format = _response_format(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs: true", "invalid_value", "top_logprobs")
        k = (req.top_logprobs or 0) if req.logprobs else None
        max_new = req.max_completion_tokens or req.max_tokens or scheduler.max_model_len
        params = replace(sampling_params(req, max_new, logprobs=k), response_format=response_format)
        vlm, n = state.vlm, req.n or 1

        def prepare():
            return _prepare_chat_checked(state, req)

        handles = await self._submit([prepare], params, n, "messages")
        rid, created, name = P.new_id("chatcmpl"), P.now(), state.config.model_name
        tok = vlm.tokenizer

        def logprobs(entries):
            return None if k is None else chat_logprobs(tok, entries)

        if not req.stream:
            await self._wait(handles, request, "messages")
            choices = [P.chat_choice(i, h.generation.text, h.generation.finish_reason,
                                     logprobs(h.generation.logprobs or [])) for i, h in enumerate(handles)]
            return JSONResponse(P.chat_completion(rid, created, name, choices, self._usage(handles, n)))

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return self._streaming(
            handles, n, include_usage, "messages",
            head=lambda i: P.chat_chunk(rid, created, name, {"role": "assistant", "content": ""}, None,
                                        include_usage, index=i),
            delta=lambda i, text, entries: P.chat_chunk(rid, created, name, {"content": text}, None, include_usage,
                                                        index=i, logprobs=logprobs(entries)),
            final=lambda i, finish: P.chat_chunk(rid, created, name, {}, finish, include_usage, index=i),
            usage_chunk=lambda use: P.chat_chunk(rid, created, name, None, None, True, use))

    async def completions(self, request: Request):
        state = self.state
        req = await parse_body(request, P.CompletionRequest)
        scheduler = state.require_ready()
        state.check_model(req.model)
        _common_checks(req, scheduler.max_batch_size)
        _refuse(req.suffix is not None, "suffix", "suffix")
        _refuse(req.best_of not in (None, 1), "best_of", "best_of > 1")
        vlm, n, k = state.vlm, req.n or 1, req.logprobs
        tok = vlm.tokenizer
        prompts = _completion_prompts(req.prompt, tok.vocab_size)
        params = sampling_params(req, req.max_tokens or 16, logprobs=k,
                                 prompt_logprobs=k if req.echo and k is not None else None)
        handles = await self._submit([(lambda p=p: prepare_ids(vlm, p) if isinstance(p, list) else _prepare_text_checked(vlm, p, state))
                                      for p in prompts], params, n, "prompt")
        echoes = [prompts[i // n] if isinstance(prompts[i // n], str) else handles[i].generation.prompt
                  for i in range(len(handles))] if req.echo else [""] * len(handles)
        rid, created, name = P.new_id("cmpl"), P.now(), state.config.model_name

        def prompt_part(i: int) -> dict | None:
            """The echoed prompt tokens' logprobs (a text prompt's BOS, added by us, is left out)."""
            g = handles[i].generation
            skip = 1 if isinstance(prompts[i // n], str) else 0
            return completion_logprobs(tok, g.prompt_token_ids[skip:], (g.prompt_logprobs or [])[skip:])

        def merged(i: int, entries, with_prompt: bool) -> dict | None:
            if k is None:
                return None
            head = prompt_part(i) if with_prompt else None
            body = completion_logprobs(tok, [e.token_id for e in entries], entries, len(echoes[i]))
            if head is None:
                return body
            return {key: head[key] + body[key] for key in body}

        if not req.stream:
            await self._wait(handles, request, "prompt")
            choices = [P.text_choice(i, echoes[i] + h.generation.text, h.generation.finish_reason,
                                     merged(i, h.generation.logprobs or [], bool(req.echo)))
                       for i, h in enumerate(handles)]
            return JSONResponse(P.text_completion(rid, created, name, choices, self._usage(handles, n)))

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return self._streaming(
            handles, n, include_usage, "prompt",
            head=(lambda i: P.text_chunk(rid, created, name, echoes[i], None, include_usage, index=i,
                                         logprobs=None if k is None else prompt_part(i))) if req.echo else None,
            delta=lambda i, text, entries: P.text_chunk(rid, created, name, text, None, include_usage, index=i,
                                                        logprobs=merged(i, entries, False)),
            final=lambda i, finish: P.text_chunk(rid, created, name, "", finish, include_usage, index=i),
            usage_chunk=lambda use: P.text_chunk(rid, created, name, None, None, True, use))

    # -- streaming plumbing ---------------------------------------------------------------------------
    def _streaming(self, handles: list[RequestHandle], n: int, include_usage: bool, param: str, *,
                   head: Callable[[int], dict] | None, delta: Callable[[int, str, list], dict],
                   final: Callable[[int, str], dict], usage_chunk: Callable[[dict], dict]) -> StreamingResponse:
        """SSE: ``head(i)`` per choice (chat: the role chunk; echo: the prompt), then per choice a chunk per
        batch of deltas (with the log-probabilities of the tokens sampled since the last one) and its
        finish chunk, the usage chunk (when asked), ``[DONE]``. An error after the headers went out (a
        failure, the timeout, the server shutting down) becomes an error event and ``[DONE]``. If the
        client goes away, starlette cancels this generator and the requests are cancelled with it."""
        cursors = [LogprobCursor(h) for h in handles]

        async def body():
            try:
                if head is not None:
                    for i in range(len(handles)):
                        yield sse(head(i))
                try:
                    async for i, deltas, ended in follow_choices(handles):
                        entries = cursors[i].take()
                        if deltas or entries:
                            yield sse(delta(i, "".join(deltas), entries))
                        if ended:
                            h = handles[i]
                            if h.generation.finish_reason == "timeout":
                                yield sse(self._timeout_error(h).body())
                                yield sse("[DONE]")
                                return
                            self._observe(h)
                            yield sse(final(i, h.generation.finish_reason))
                except Exception as exc:
                    try:
                        err = to_api_error(exc, param)
                    except Exception:
                        log.exception("request %d failed while streaming", handles[0].id)
                        err = APIError(500, "internal server error while generating", "internal_error")
                    yield sse(err.body())
                    yield sse("[DONE]")
                    return
                if include_usage:
                    yield sse(usage_chunk(self._usage(handles, n)))
                yield sse("[DONE]")
            finally:
                for h in handles:
                    if not h.done:
                        h.cancel()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
