"""``RequestHandle``: what a caller of ``BatchScheduler`` holds for one submitted request."""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterator

from .generate import Generation
from .sampling import SamplingParams

_END = object()


class RequestHandle:
    """One submitted request. Iterate it for text deltas (blocking), or poll with ``drain`` (non-blocking,
    for event loops; pass ``waker`` to ``submit`` to be told when something arrives). ``result()`` waits
    for the final ``Generation``; its ``finish_reason`` is "stop", "length", "cancelled" or "timeout".
    A request that failed raises its exception from iteration, ``drain`` and ``result``.

    Deltas add up to ``Generation.text``. Iteration and ``drain`` consume the same queue: use one.
    """

    def __init__(self, request_id: int, prompt_ids: list[int], prompt_tokens: int, params: SamplingParams,
                 max_new_tokens: int, started: float, deadline: float | None,
                 waker: Callable[[], None] | None, wake_scheduler: Callable[[], None]):
        self.id = request_id
        self.params = params
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.started = started
        self.submitted = time.perf_counter()
        self.deadline = deadline
        self.queue_s = 0.0  # submit -> slot assigned
        self.generation = Generation("", [], list(prompt_ids), "length")
        self.error: BaseException | None = None
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._cancel = False
        self._waker = waker
        self._wake_scheduler = wake_scheduler

    # caller side
    def cancel(self) -> None:
        """Ask for the request to stop; its slot is freed at the scheduler's next step."""
        if not self._done.is_set():
            self._cancel = True
            self._wake_scheduler()

    @property
    def cancelled(self) -> bool:
        return self._cancel

    @property
    def done(self) -> bool:
        """True once the final ``Generation`` (or error) is set."""
        return self._done.is_set()

    @property
    def completion_tokens(self) -> int:
        return len(self.generation.token_ids)

    def set_waker(self, waker: Callable[[], None] | None) -> None:
        """``waker()`` is called from the model thread after each new event (keep it cheap, never raise)."""
        self._waker = waker
        if waker is not None and not self._events.empty():
            waker()

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._events.get()
            if item is _END:
                self._events.put(_END)  # iteration can be repeated; it ends at once
                if self.error is not None:
                    raise self.error
                return
            yield item

    def drain(self) -> tuple[list[str], bool]:
        """All deltas available now and whether the request has ended (then nothing more will come)."""
        out, ended = [], False
        while True:
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                break
            if item is _END:
                self._events.put(_END)
                ended = True
                break
            out.append(item)
        if ended and self.error is not None:
            raise self.error
        return out, ended

    def result(self, timeout: float | None = None) -> Generation:
        """Wait for the end; returns the final ``Generation`` or raises the request's error."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} still running after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.generation

    # model-thread side
    def _put(self, item) -> None:
        self._events.put(item)
        if self._waker is not None:
            try:
                self._waker()
            except Exception:  # a closed event loop must not hurt the model thread
                pass

    def _end(self, error: BaseException | None = None) -> None:
        self.error = error
        self._done.set()
        self._put(_END)
