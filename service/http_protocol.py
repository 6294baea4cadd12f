"""uvicorn's HTTP/1.1 protocol with a deadline for a request's headers.

uvicorn closes a keep-alive connection that idles after a response, but nothing closes a
connection that never completes its request headers: a socket opened and left silent, or
one trickling a byte at a time, stays open for good. Held by the hundred, such sockets
filled uvicorn's ``limit_concurrency``, and it answered every path, the probes and
``/metrics`` included, with a plain-text 503 until a liveness probe got the pod restarted.
Here a connection has ``header_timeout_s`` from the moment it waits for a request (when it
opens, and after each response) until that request's headers are complete; then it is
closed. The body is the app's business: its deadline, and its cap on requests in progress
(``ConcurrencyLimitMiddleware``), which leaves the probes out.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("service")


class HeaderTimeoutProtocol(H11Protocol):
    """``H11Protocol`` that closes a connection whose request headers are not complete
    ``header_timeout_s`` seconds after it started waiting for them."""

    header_timeout_s: float = 5.0

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        # Runs on every chunk received and after every response (uvicorn calls it to start
        # the next request of the connection).
        super().handle_events()
        self._watch_headers()

    def _watch_headers(self) -> None:
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if not waiting:
            self._cancel_header_timer()
        elif self._header_timer is None:  # the clock runs from the start of the wait, not per byte
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_overdue)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_overdue(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.debug("closing a connection from %s: no complete request headers within %gs", self.client, self.header_timeout_s)
            self.transport.close()


def header_timeout_protocol(seconds: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class to give ``uvicorn.Config(http=...)``, with its header deadline
    set to ``seconds`` (uvicorn builds the protocol itself, from the class)."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout_s": seconds})
