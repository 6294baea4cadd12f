"""One error shape for every 4xx/5xx: ``{"error": {"code": "...", "message": "..."}}``.

``code`` is stable (clients may branch on it); ``message`` is for humans. Client input
never produces a 500 or a stack trace: decoding errors are mapped to 4xx where they are
raised, and anything unexpected becomes a bare ``internal_error``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("service")

#: Codes for errors raised by FastAPI/Starlette themselves (routing, methods).
_STATUS_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
    504: "deadline_exceeded",
}


class APIError(StarletteHTTPException):
    """An HTTP error with a stable machine-readable ``code``.

    Subclassing Starlette's ``HTTPException`` means FastAPI passes it through untouched
    from anywhere (dependencies, body parsing, our ASGI receive wrapper).
    """

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status_code=status, detail=message, headers=dict(headers) if headers else None)
        self.code = code
        self.message = message


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    """The JSON body of every error reply."""
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """A ready ``JSONResponse`` in the service's error shape."""
    return JSONResponse(error_body(code, message), status_code=status, headers=dict(headers) if headers else None)


def _count(request: Request, code: str) -> None:
    # The app factory puts its metrics hook on app.state; an app without one just skips it.
    hook = getattr(request.app.state, "count_error", None)
    if hook is not None:
        hook(code)


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = getattr(exc, "code", None) or _STATUS_CODES.get(exc.status_code, f"http_{exc.status_code}")
    message = str(exc.detail) if exc.detail else code.replace("_", " ")
    _count(request, code)
    return error_response(exc.status_code, code, message, exc.headers)


def _location(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p not in ("body",)) or "request"


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = [f"{_location(tuple(e.get('loc', ())))}: {e.get('msg', 'invalid')}" for e in exc.errors()[:5]]
    _count(request, "validation_error")
    return error_response(422, "validation_error", "; ".join(parts) or "invalid request")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Logged with its traceback here; the client sees only a code.
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    _count(request, "internal_error")
    return error_response(500, "internal_error", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    """Route every error FastAPI can produce through the one JSON shape."""
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
