"""Pure ASGI middleware: in-progress request cap, request-body size cap and request latency metrics.

Pure ASGI (not ``BaseHTTPMiddleware``) so ``receive`` reaches the endpoint unwrapped by
extra tasks: the body is counted as it streams, and ``http.disconnect`` still arrives
for the disconnect watcher in ``service.app``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError, error_response
from .metrics import Metrics
from .runtime import Runtime


class BodyLimitMiddleware:
    """413 for bodies over ``max_body_bytes``: from Content-Length up front, else by counting.

    Neither uvicorn nor Starlette limit body size themselves.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, on_reject: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None:
            # isascii: str.isdigit() is also true for '²' and other digits int() rejects.
            if not (declared.isascii() and declared.isdigit()):
                await error_response("bad_request", "invalid Content-Length header")(scope, receive, send)
                return
            if int(declared) > limit:
                # Answered before reading a byte of the body.
                if self.on_reject:
                    self.on_reject("body_too_large")
                reply = error_response("body_too_large", f"request body of {declared} bytes exceeds the limit of {limit}")
                await reply(scope, receive, send)
                return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised inside the endpoint's body read; the app's handler renders it.
                    raise APIError("body_too_large", f"request body exceeds the limit of {limit} bytes")
            return message

        await self.app(scope, counting_receive, send)


class ConcurrencyLimitMiddleware:
    """503 ``overloaded`` (the API's error shape, with ``Retry-After``) for a request that
    arrives while ``limit`` others are in progress; ``exempt`` paths always pass.

    uvicorn's ``limit_concurrency`` would refuse the same requests in plain text, and the
    health probes and ``/metrics`` with them, so an overloaded instance would look dead to
    its orchestrator and blind to Prometheus. Counted per request from its headers on, so
    it also caps the request bodies being received at once.
    """

    def __init__(self, app: ASGIApp, limit: int, exempt: frozenset[str], retry_after_s: int, on_reject: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.exempt = exempt
        self.retry_after_s = retry_after_s
        self.on_reject = on_reject
        self.in_progress = 0  # one event loop: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exempt:
            await self.app(scope, receive, send)
            return
        if self.in_progress >= self.limit:
            if self.on_reject:
                self.on_reject("overloaded")
            message = f"{self.limit} requests are in progress, the most this server takes at once; retry later"
            await error_response("overloaded", message, retry_after_s=self.retry_after_s)(scope, receive, send)
            return
        self.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress -= 1


class CutOffMiddleware:
    """A request cut off by ``Runtime.abort`` (a second SIGTERM) is answered 503
    ``shutting_down`` in the API's shape, instead of uvicorn's plain-text 500 and a
    ``CancelledError`` traceback in the log; a reply already under way is left as it is.
    """

    def __init__(self, app: ASGIApp, runtime: Runtime, on_reject: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.runtime = runtime
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replied = False

        async def tracking_send(message: Message) -> None:
            nonlocal replied
            replied = replied or message["type"] == "http.response.start"
            await send(message)

        with self.runtime.cancellable_request() as task:
            try:
                await self.app(scope, receive, tracking_send)
                return
            except asyncio.CancelledError:
                if not self.runtime.aborted:
                    raise  # not ours to answer: the client went away, or the loop is closing
                task.uncancel()  # the cancellation was ours (abort), and it is handled here
        if replied:
            return
        if self.on_reject:
            self.on_reject("shutting_down")
        await error_response("shutting_down", "the server was stopped before this request finished; retry on another instance")(scope, receive, send)


class RequestMetricsMiddleware:
    """Observes ``safl_request_duration_seconds{route, status}`` for every HTTP request.

    ``route`` is the path template of the route that matched (``route_label``); unmatched
    paths share one label so scanners cannot blow up the series count.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Callable[[], Sequence[BaseRoute]]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        arrived = dict(scope)  # a mount rewrites path and root_path in place; match on the original

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.request_duration.labels(route=route_label(scope, arrived, self.routes()), status=str(status)).observe(time.perf_counter() - start)


def route_label(scope: Scope, arrived: Scope, routes: Sequence[BaseRoute]) -> str:
    """The metrics label of a finished request: the path template of the route that matched
    it (a mount's as ``PREFIX/{path}``), or "unmatched".

    FastAPI's routes put themselves in ``scope["route"]`` when they match, inside included
    routers too (the web page); plain Starlette routes and mounts of the app itself
    (``/openapi.json``, the offline docs' assets) do not, so those are matched against
    ``arrived``, the scope as it came in.
    """
    route = scope.get("route")
    if not isinstance(getattr(route, "path", None), str):
        route = next((r for r in routes if isinstance(r, Route | Mount) and r.matches(arrived)[0] is not Match.NONE), None)
    if route is None:
        return "unmatched"
    # A mount's path is its prefix: the files under it share one label.
    return f"{route.path}/{{path}}" if isinstance(route, Mount) else route.path


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1").strip()
    return None
