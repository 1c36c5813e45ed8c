"""uvicorn's h11 protocol with a header timeout (slow-loris clients).

uvicorn bounds the time a keep-alive connection may sit idle between requests (``timeout_keep_alive``) but
not the time a client may take to send a request's headers: a client trickling one header byte at a time
would hold its connection forever. ``HeaderTimeoutProtocol`` closes a connection whose next request's
headers are not complete ``header_timeout`` seconds after the connection opened or the previous response
ended. The size of what may be buffered while headers arrive is uvicorn's ``h11_max_incomplete_event_size``.
"""
from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_HEADER_TIMEOUT = 10.0
MAX_HEADER_BYTES = 32 * 1024


def header_timeout_protocol(header_timeout: float) -> type:
    """The protocol class for ``uvicorn.Config(http=...)`` with this header timeout in seconds."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": float(header_timeout)})


class HeaderTimeoutProtocol(H11Protocol):
    header_timeout = DEFAULT_HEADER_TIMEOUT

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        self._seen_scope = None
        super().connection_made(transport)
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timeout_expired)

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _header_timeout_expired(self) -> None:
        self._header_timer = None
        if self.scope is self._seen_scope and not self.transport.is_closing():
            self.logger.debug("closing a connection whose request headers took over %.1f s", self.header_timeout)
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.scope is not None and self.scope is not self._seen_scope:  # a request's headers are complete
            self._seen_scope = self.scope
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)
