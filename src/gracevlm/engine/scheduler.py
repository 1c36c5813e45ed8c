"""Continuous batching: one background thread owns the model and serves many requests at once.

``BatchScheduler(vlm)`` keeps one KV cache of ``max_batch_size`` slots (requests decoded together), each at
most ``max_model_len`` positions, whose storage comes from the model's KV pool (``vlm.kv_pool``,
``--kv-cache-gib``) when a request is admitted: ``prompt + max_tokens`` positions, given back when it ends
(``engine.kv_slots``: a request that could never fit is refused at ``submit``, one that does not fit now
waits in the queue; cached prefix blocks are evicted first). Each loop iteration of the model thread
does, in this order:

1. reap: requests that were cancelled or ran past their deadline finish ("cancelled" / "timeout") and
   free their slot;
2. at most ONE prefill (or one chunk of ``prefill_chunk`` positions of it) of the oldest waiting request,
   once a slot and its KV storage are free, so a long prompt never stalls the running requests for more
   than one chunk; when its prefill completes, its first token is sampled and it joins the decode batch;
3. one decode step for every running request together (one token each).

Requests are prepared OUTSIDE the model thread: the caller tokenizes, decodes and encodes images
(``engine.prepare``) and ``submit`` has the model place the image features in the prompt (``prompt_for``:
embeddings, and for Qwen3-VL 3-axis positions and deepstack rows), so the model thread only runs decoder
forward passes. Each request carries its own decode position offset (``decode_offset``: 0 for LLaVA,
Qwen3-VL's M-RoPE ``delta``), passed per row to ``forward_decode``.

Per request the output logic is ``generate.TokenStream``, the same object ``stream_generate`` uses:
seeded sampler, EOS, stop strings, max tokens, incremental detokenizer and LLaVA's strip semantics are
therefore identical to ``VLM.generate``.

Batch invariance (``batch_invariant=True``, the default): the decode step computes each row exactly as a
lone request would. Attention runs per row over that row's own cache span with the same operators as
``LlamaForCausalLM`` uses for one sequence (batched SDPA with a padding mask sums in a different order),
and the ``lm_head`` runs batched only where that is row-invariant (``HalfLinear``'s kernel below its
GEMM crossover), else one row at a time (a dense GEMM's per-row results depend on the number of rows).
The INT4 projections run batched: the CPU kernels (the small-M kernel of ``native``/``native-igemm`` below
their GEMM crossover, ``NativeBackend.min_gemm_rows``: 12 rows on the AVX2 path, 48 with AVX-512 VNNI;
``int4pack``) give every row the bits it gets alone. Prefill of a request is never batched with
another request, and with ``prefill_chunk=None`` it is the very forward ``stream_generate`` runs. So a
greedy (or seeded) request returns the same tokens alone, batched, and through ``VLM.generate``.
Exceptions: the ``dense`` INT4 backend (CUDA, or forced) is a GEMM and is not row-invariant, and a chunked
prefill differs from a one-shot prefill in the last bits; both can flip a near-tie.
``batch_invariant=False`` runs the ``lm_head`` batched (faster at large batch; attention is per row either way).

Usage counts: ``RequestHandle.prompt_tokens`` is the number of prompt POSITIONS the model computes over:
text tokens (BOS included) plus ``patches`` positions per image (576 for LLaVA-1.5), minus the image
markers; it is what counts against ``max_model_len``. ``completion_tokens`` is the number of sampled tokens
that are part of the output (EOS is not counted).

Several choices of one prompt (``submit_choices``, OpenAI's ``n``): ONE prefill; when it completes, its
prompt KV is copied into the other choices' slots (all ``n`` slots are taken together when the group is
scheduled) and each choice samples its first token from the same prefill logits with its own seed
(``sampling.choice_seed``), then decodes as an independent request. So choice i returns what a lone
request with that seed returns. Until the prefill completes the group is one unit: it times out
together, and is dropped only when every choice was cancelled.

Prefix cache (``vlm.prefix_cache``, shared with ``VLM.generate``; see ``engine.prefix_cache``): when a
request's prefill starts, its longest cached prefix (KV blocks keyed by token ids and image content hashes)
is copied into its slot and only the rest is computed, one block-aligned chunk of ``block_tokens`` positions
per loop iteration (``prefill_chunk`` is not used then); its full blocks are stored when the prefill
completes. A request prefilled so returns bitwise what ``VLM.generate`` with the same cache returns, hit or
miss. ``Timings.cached_tokens`` counts the positions reused (the server's
``usage.prompt_tokens_details.cached_tokens``).

Prompt log-probabilities (``SamplingParams.prompt_logprobs``, text-only prompts): the prefill then
computes the logits of every prompt position; the first token is sampled from the last of those rows (a
GEMM over all rows, which may differ from the one-row ``lm_head`` in the last bits).
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import replace
from typing import Any, Callable

import torch

from ..errors import GraceVLMError, InputError
from .generate import TokenStream, check_prompt_length, logits_rows, prompt_logprob_entries
from .kv_slots import SlotTable, check_fits
from .prefix_cache import block_keys
from .prepare import PreparedPrompt, prepare_chat
from .requests import RequestHandle
from .sampling import SamplingParams, choice_seed

__all__ = ["BatchScheduler", "QueueFull", "RequestHandle", "SchedulerClosed"]

log = logging.getLogger("gracevlm.scheduler")

FINISH_REASONS = ("stop", "length", "cancelled", "timeout")


class QueueFull(GraceVLMError):
    """``max_queue`` requests are already waiting for a slot; retry later."""


class SchedulerClosed(GraceVLMError):
    """The scheduler was shut down; no request is accepted or continued."""


class _Seq:
    """Model-thread state of one request."""

    __slots__ = ("handle", "prompt", "length", "offset", "out", "slot", "prefilled", "decoded", "t_decode",
                 "siblings", "shared", "prefix_keys")

    def __init__(self, handle: RequestHandle, prompt, out: TokenStream):
        self.handle, self.prompt, self.out = handle, prompt, out  # prompt: the model's ``prompt_for`` result
        self.length = prompt.length if prompt is not None else 0  # a sibling's is set by submit
        self.offset = prompt.decode_offset if prompt is not None else 0  # rope position - cache index of decode
        self.siblings: list[_Seq] = []  # the other choices of the same prompt, waiting for this prefill
        self.shared = False  # a sibling: its prompt KV is copied from the leader's prefill
        self.slot = -1
        self.prefilled = 0  # prompt positions already in the cache
        self.decoded = 0  # decode forwards done (the next token goes to position length + decoded)
        self.t_decode = 0.0
        self.prefix_keys: list[bytes] | None = None  # block keys when the prefix cache serves this prompt


# -- the scheduler -----------------------------------------------------------------------------------

class BatchScheduler:
    """Continuous-batching engine over one ``VLM`` (see the module docstring).

    ``max_batch_size``: KV-cache slots = requests decoded together. ``max_queue``: requests allowed to wait
    for a slot; one more raises ``QueueFull``. ``max_model_len``: positions per slot (prompt + output),
    default and maximum ``vlm.max_context``. ``request_timeout``: default seconds from submission after
    which a request finishes with "timeout" (None: never). ``prefill_chunk``: positions per prefill step
    (None: the whole prompt in one forward, which is exactly ``VLM.generate``'s prefill).
    """

    def __init__(self, vlm, max_batch_size: int = 8, max_queue: int = 64, max_model_len: int | None = None,
                 request_timeout: float | None = None, prefill_chunk: int | None = None,
                 batch_invariant: bool = True):
        for name, value in (("max_batch_size", max_batch_size), ("max_queue", max_queue)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if max_model_len is None:
            max_model_len = vlm.max_context
        if not isinstance(max_model_len, int) or not 2 <= max_model_len <= vlm.max_context:
            raise InputError(f"max_model_len must be an integer in [2, {vlm.max_context}] (the model's context "
                             f"window), got {max_model_len!r}")
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise InputError(f"prefill_chunk must be a positive integer or None, got {prefill_chunk!r}")
        if request_timeout is not None and not request_timeout > 0:
            raise InputError(f"request_timeout must be > 0 seconds or None, got {request_timeout!r}")
        self.vlm = vlm
        self.model = vlm.model
        self.lm = vlm.model.language_model
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_model_len = max_model_len
        self.request_timeout = request_timeout
        self.prefill_chunk = prefill_chunk
        self.batch_invariant = batch_invariant
        self.device = self.lm.lm_head.weight.device
        self.dtype = self.model.compute_dtype
        self.vocab = min(vlm.tokenizer.vocab_size, logits_rows(self.lm))
        self.cache = self.model.new_cache(max_batch_size, max_model_len, pool=vlm.kv_pool)
        self.slots = SlotTable(self.cache)

        self._cond = threading.Condition()
        self._pending: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._prefilling: _Seq | None = None
        self._closed = False
        self._ids = itertools.count(1)
        self._counts = {"submitted": 0, "rejected": 0, "failed": 0, "decode_steps": 0, "prefill_chunks": 0,
                        "prompt_tokens": 0, "completion_tokens": 0, **{f"finished_{r}": 0 for r in FINISH_REASONS}}
        self._thread = threading.Thread(target=self._run, name="gracevlm-scheduler", daemon=True)
        self._thread.start()

    # -- public API ---------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], image_features: torch.Tensor | None, params: SamplingParams, *,
               timeout: float | None = None, started: float | None = None,
               waker: Callable[[], None] | None = None) -> RequestHandle:
        """Queue one request; returns at once (``submit_choices`` with one choice)."""
        return self.submit_choices(prompt_ids, image_features, params, 1, timeout=timeout, started=started,
                                   waker=waker)[0]

    def submit_choices(self, prompt_ids: list[int], image_features: torch.Tensor | None, params: SamplingParams,
                       n: int = 1, *, timeout: float | None = None, started: float | None = None,
                       waker: Callable[[], None] | None = None,
                       image_keys: list[bytes] | None = None) -> list[RequestHandle]:
        """Queue ``n`` choices of one prompt (one prefill; see the module docstring); returns their handles
        at once, choice i sampling with ``choice_seed(params.seed, i)``. ``n`` is at most ``max_batch_size``. Raises ``InputError`` for a bad prompt (image count or
        feature shape mismatch, prompt too long for ``max_model_len``), ``QueueFull`` when ``max_queue``
        requests wait already, ``SchedulerClosed`` after ``shutdown``. ``timeout`` (seconds from
        ``started``, default ``request_timeout``) bounds the whole request; ``started`` (a
        ``time.perf_counter()`` value, default now) is where time to first token counts from. ``image_keys``
        (one content hash per image, ``PreparedPrompt.image_keys``) lets a prompt with images use the prefix
        cache; text-only prompts use it without."""
        if self._closed:
            raise SchedulerClosed("the scheduler is shut down")
        if not isinstance(params, SamplingParams):
            raise InputError(f"params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= self.max_batch_size:
            raise InputError(f"n must be an integer in [1, {self.max_batch_size}] (the server's batch size), "
                             f"got {n!r}")
        ids = [int(t) for t in prompt_ids]
        if params.prompt_logprobs is not None and (image_features is not None or any(t < 0 for t in ids)):
            raise InputError("prompt log-probabilities are available for text-only prompts")
        started = time.perf_counter() if started is None else started
        with torch.inference_mode():
            features = self._check_features(image_features)
            length = self.model.prompt_length(ids, features)  # checked before any embedding is built
            check_prompt_length(length, self.max_model_len, features)
            prompt = self.model.prompt_for(ids, features)
            prefix_keys = self._prefix_keys(ids, image_keys, features, params)
        max_new = min(params.max_new_tokens, self.max_model_len - length)
        check_fits(self.cache, length + max_new, n)  # KVBudgetExceeded: it could never be admitted
        timeout = self.request_timeout if timeout is None else timeout
        deadline = None if timeout is None else started + timeout
        outs = [TokenStream(self.vlm.tokenizer, replace(params, seed=choice_seed(params.seed, i)), max_new, self.vocab)
                for i in range(n)]
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the scheduler is shut down")
            if len(self._pending) >= self.max_queue:
                self._counts["rejected"] += 1
                raise QueueFull(f"{len(self._pending)} requests are waiting for one of {self.max_batch_size} "
                                f"slots (max_queue={self.max_queue}); retry later")
            seqs = []
            for out in outs:
                handle = RequestHandle(next(self._ids), ids, length, out.sampler.params, max_new, started,
                                       deadline, waker, self._wake)
                handle.generation.token_ids, handle.generation.logprobs = out.token_ids, out.logprobs
                seqs.append(_Seq(handle, prompt if not seqs else None, out))
            for sib in seqs[1:]:
                sib.shared, sib.length, sib.offset = True, length, prompt.decode_offset
            seqs[0].siblings = seqs[1:]
            seqs[0].prefix_keys = prefix_keys
            self._pending.append(seqs[0])
            self._counts["submitted"] += n
            self._cond.notify()
        return [seq.handle for seq in seqs]

    def submit_prepared(self, prepared: PreparedPrompt, params: SamplingParams, **kwargs) -> RequestHandle:
        return self.submit_prepared_choices(prepared, params, 1, **kwargs)[0]

    def submit_prepared_choices(self, prepared: PreparedPrompt, params: SamplingParams, n: int = 1,
                                **kwargs) -> list[RequestHandle]:
        kwargs.setdefault("started", prepared.started)
        kwargs.setdefault("image_keys", prepared.image_keys)
        handles = self.submit_choices(prepared.prompt_ids, prepared.image_features, params, n, **kwargs)
        for handle in handles:
            handle.generation.prompt = prepared.prompt_text
            handle.generation.timings.image_encode_s = prepared.image_encode_s
        return handles

    def submit_chat(self, messages: list[dict], params: SamplingParams, conv_mode: str | None = None,
                    **kwargs) -> RequestHandle:
        """Prepare ``messages`` in the calling thread (``prepare_chat``), then ``submit``."""
        return self.submit_prepared(prepare_chat(self.vlm, messages, conv_mode), params, **kwargs)

    def note_rejected(self) -> None:
        """Count a request refused in front of the scheduler because the queue was full (as ``submit``
        counts its own ``QueueFull``)."""
        with self._cond:
            self._counts["rejected"] += 1

    def stats(self) -> dict[str, Any]:
        """Queue depth, active slots and cumulative counters (for metrics)."""
        with self._cond:
            return {"queue_depth": len(self._pending), "active_slots": self.slots.in_use,
                    "max_batch_size": self.max_batch_size, "max_queue": self.max_queue,
                    "max_model_len": self.max_model_len, **self.slots.stats(), **self._counts,
                    **self.vlm.prefix_cache.stats()}

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the model thread; requests still queued or running fail with ``SchedulerClosed``."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> "BatchScheduler":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- internals ----------------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _check_features(self, features: torch.Tensor | None) -> torch.Tensor | None:
        if features is None:
            return None
        if not isinstance(features, torch.Tensor) and hasattr(features, "positions"):
            return features.to(device=self.device, dtype=self.dtype)  # a family's own features object
        hidden = self.lm.spec.hidden_size
        if not isinstance(features, torch.Tensor) or features.dim() != 3 or features.shape[2] != hidden \
                or features.shape[1] < 1 or not (features.is_floating_point()):
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise InputError(f"image features must be a float tensor [images, patches, {hidden}], got {shape}")
        return features.to(device=self.device, dtype=self.dtype)

    def _prefix_keys(self, ids, image_keys, features, params: SamplingParams) -> list[bytes] | None:
        cache = self.vlm.prefix_cache
        if not cache.enabled or not getattr(self.model, "supports_prefix_cache", False) \
                or params.prompt_logprobs is not None:
            return None
        n_images = sum(1 for t in ids if t < 0)
        if n_images and (image_keys is None or len(image_keys) != n_images):
            return None
        return block_keys(ids, image_keys, features.shape[1] if features is not None else 0, cache.block_tokens)

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._cond:
                        while not (self._closed or self._pending or self._running or self._prefilling):
                            self._cond.wait()
                        if self._closed:
                            break
                    self._reap()
                    self._prefill_step()
                    self._decode_step()
                    if not (self._running or self._prefilling):  # the queue waits for KV memory held elsewhere
                        with self._cond:
                            if self._pending and not self._closed:
                                self._cond.wait(0.02)
        except BaseException as exc:  # a bug in the loop itself: fail everyone, never hang callers
            log.exception("scheduler thread crashed")
            self._closed = True
            self._fail_all(exc)
            raise
        self._fail_all(SchedulerClosed("the scheduler was shut down before this request finished"))

    def _fail_all(self, exc: BaseException) -> None:
        with self._cond:
            seqs = list(self._pending) + self._running + ([self._prefilling] if self._prefilling else [])
            seqs += [sib for seq in seqs for sib in seq.siblings]
            self._pending.clear()
        self._running, self._prefilling = [], None
        for seq in seqs:
            if not seq.handle.done:
                self._release(seq)
                seq.handle._end(exc)

    def _expired(self, seq: _Seq, now: float) -> str | None:
        h = seq.handle
        if h._cancel and all(sib.handle._cancel for sib in seq.siblings):
            return "cancelled"
        if h.deadline is not None and now >= h.deadline:
            return "timeout"
        return None

    def _reap(self) -> None:
        now = time.perf_counter()
        with self._cond:
            gone = [(s, r) for s in self._pending if (r := self._expired(s, now))]
            for seq, _ in gone:
                self._pending.remove(seq)
        for seq, reason in gone:
            self._finish_group(seq, reason)
        if self._prefilling is not None and (reason := self._expired(self._prefilling, now)):
            seq, self._prefilling = self._prefilling, None
            self._finish_group(seq, reason)
        for seq in [s for s in self._running if self._expired(s, now)]:
            self._finish(seq, self._expired(seq, now))

    def _prefill_step(self) -> None:
        seq = self._prefilling
        if seq is None:
            with self._cond:
                if not self._pending:
                    return
                head = self._pending[0]  # the oldest request goes first; a group waits for all its slots
                taken = self.slots.take(1 + len(head.siblings), head.length + head.handle.max_new_tokens)
                if taken is None:
                    return
                seq = self._pending.popleft()
                for member, slot in zip((seq, *seq.siblings), taken):
                    member.slot = slot
            seq.handle.queue_s = time.perf_counter() - seq.handle.submitted
            self._prefilling = seq
        try:
            cache = self.vlm.prefix_cache
            if seq.prefix_keys is not None and seq.prefilled == 0:
                blocks = cache.usable_blocks(seq.prefix_keys, seq.length)
                seq.prefilled = cache.load(blocks, self.cache, seq.slot)
                seq.handle.generation.timings.cached_tokens = seq.prefilled
            start = seq.prefilled
            chunk = cache.block_tokens if seq.prefix_keys is not None else self.prefill_chunk
            end = seq.length if chunk is None else min(seq.length, start + chunk)
            t0 = time.perf_counter()
            k_prompt = seq.handle.params.prompt_logprobs
            logits = self.model.forward_prompt(seq.prompt, self.cache, seq.slot, start, end, logits_for="all"
                                               if k_prompt is not None else "last" if end == seq.length else "none")
            if k_prompt is not None:
                g = seq.handle.generation
                if g.prompt_logprobs is None:
                    g.prompt_logprobs = [None]
                g.prompt_logprobs += prompt_logprob_entries(logits[0], g.prompt_token_ids, start, k_prompt, self.vocab)
                logits = logits[:, -1]
            timings = seq.handle.generation.timings
            timings.prefill_s += time.perf_counter() - t0
            seq.prefilled = end
            self._counts["prefill_chunks"] += 1
            if end < seq.length:
                return
            timings.prefill_tokens = seq.length - timings.cached_tokens
            if seq.prefix_keys is not None:
                cache.store(seq.prefix_keys, self.cache, seq.slot, seq.length)
            self._prefilling = None
            seq.prompt = None
            for sib in seq.siblings:
                self.cache.copy_positions(seq.slot, sib.slot, seq.length)
                sib.prefilled = seq.length
                t = sib.handle.generation.timings
                t.prefill_s, t.prefill_tokens = timings.prefill_s, timings.prefill_tokens
                t.cached_tokens = timings.cached_tokens
                sib.handle.queue_s = seq.handle.queue_s
                sib.handle.generation.prompt_logprobs = seq.handle.generation.prompt_logprobs
            group, seq.siblings = [seq, *seq.siblings], []
            for member in group:
                member.t_decode = time.perf_counter()
                self._running.append(member)
            for member in group:
                self._emit(member, logits[0])
        except Exception as exc:  # this request only (bad features, numerical failure, ...)
            if self._prefilling is seq:
                self._prefilling = None
            for member in (seq, *seq.siblings):
                self._fail(member, exc)

    def _decode_step(self) -> None:
        rows = [s for s in self._running if not s.out.done]
        if not rows:
            return
        tokens = torch.tensor([s.out.last_token for s in rows], device=self.device)
        positions = torch.tensor([s.length + s.decoded for s in rows], device=self.device)
        offsets = torch.tensor([s.offset for s in rows], device=self.device)
        slots = torch.tensor([s.slot for s in rows], device=self.device)
        try:
            logits = self.model.forward_decode(tokens, positions, offsets, self.cache, slots,
                                               rows_alone=self.batch_invariant)
        except Exception as exc:  # the batched forward itself failed: every row of it fails
            log.exception("decode step failed for %d requests", len(rows))
            for seq in rows:
                self._fail(seq, exc)
            return
        self._counts["decode_steps"] += 1
        for i, seq in enumerate(rows):
            seq.decoded += 1
            self._emit(seq, logits[i])

    def _emit(self, seq: _Seq, logits: torch.Tensor) -> None:
        try:
            delta = seq.out.push(logits)
        except Exception as exc:
            self._fail(seq, exc)
            return
        h = seq.handle
        if seq.out.steps == 1:
            h.generation.timings.ttft_s = time.perf_counter() - h.started
        if delta:
            h._put(delta)
        if seq.out.done:
            self._finish(seq, None)

    def _release(self, seq: _Seq) -> None:
        if seq in self._running:
            self._running.remove(seq)
        if seq.slot >= 0:
            with self._cond:
                self.slots.give_back(seq.slot)
            seq.slot = -1
        seq.prompt = None

    def _finish_group(self, seq: _Seq, reason: str) -> None:
        """End a request that has not been prefilled yet, and the choices waiting for its prefill."""
        for member in (seq, *seq.siblings):
            self._finish(member, reason)

    def _finish(self, seq: _Seq, reason: str | None) -> None:
        self._release(seq)
        h = seq.handle
        last = seq.out.close(reason)
        if last:
            h._put(last)
        g = h.generation
        g.text, g.finish_reason = seq.out.text, seq.out.finish_reason
        now = time.perf_counter()
        t = g.timings
        if seq.t_decode:
            t.decode_s = now - seq.t_decode
        t.decode_tokens = seq.decoded
        t.total_s = now - h.started
        with self._cond:
            self._counts[f"finished_{g.finish_reason}"] += 1
            self._counts["prompt_tokens"] += 0 if seq.shared else h.prompt_tokens  # prefilled once per group
            self._counts["completion_tokens"] += len(g.token_ids)
        h._end()

    def _fail(self, seq: _Seq, exc: BaseException) -> None:
        if not isinstance(exc, GraceVLMError):
            log.error("request %d failed: %s: %s", seq.handle.id, type(exc).__name__, exc)
        self._release(seq)
        with self._cond:
            self._counts["failed"] += 1
        seq.handle._end(exc)
