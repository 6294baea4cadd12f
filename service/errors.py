"""One error shape for every 4xx/5xx: ``{"error": {"code": "...", "message": "..."}}``.

``code`` is stable (clients may branch on it); ``message`` is for humans. Every code the
service answers with is a row of ``ERRORS`` (its status, whether a retry can succeed,
what it means); errors are built from a code alone, so a code cannot drift from its
status, and the README's error table is ``errors_table()`` verbatim (a test holds it).
Client input never produces a 500 or a stack trace: decoding errors are mapped to 4xx
where they are raised, and anything unexpected becomes a bare ``internal_error``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

if TYPE_CHECKING:  # FastAPI only where the app is built: `safl recognize` raises these errors without it
    from fastapi import FastAPI, Request

log = logging.getLogger("service")


@dataclass(frozen=True)
class ErrorCode:
    """How one error code is answered."""

    status: int
    #: The same request may succeed later: the reply carries ``Retry-After``.
    retry: bool
    #: One line for the README's table.
    meaning: str


#: Every error code the service answers with, in the README's order.
ERRORS: dict[str, ErrorCode] = {
    "bad_request": ErrorCode(400, False, "a malformed request line or header, e.g. `Content-Length`"),
    "malformed_multipart": ErrorCode(400, False, "the multipart body cannot be parsed, or ended before its closing boundary"),
    "unauthorized": ErrorCode(401, False, "API key missing or wrong (when `SAFL_API_KEY` is set)"),
    "not_found": ErrorCode(404, False, "no such route"),
    "method_not_allowed": ErrorCode(405, False, "the route does not take this method"),
    "too_many_files": ErrorCode(413, False, "more images in one request than `SAFL_MAX_FILES`"),
    "file_too_large": ErrorCode(413, False, "an image over `SAFL_MAX_FILE_BYTES`"),
    "body_too_large": ErrorCode(413, False, "a body over `SAFL_MAX_BODY_BYTES` (declared or streamed)"),
    "too_many_pixels": ErrorCode(
        413,
        False,
        "an image over `SAFL_MAX_PIXELS`, or the request's images together over `SAFL_MAX_REQUEST_PIXELS` (read from the image headers, before decoding)",
    ),
    "unsupported_content_type": ErrorCode(415, False, "neither `multipart/form-data` nor `application/json`"),
    "unsupported_content_encoding": ErrorCode(415, False, "a compressed body (`Content-Encoding`); send it uncompressed"),
    "unsupported_image": ErrorCode(415, False, "not a PNG, JPEG, WebP, BMP, TIFF or GIF, or a pixel mode with no conversion"),
    "no_files": ErrorCode(422, False, "no images in the request"),
    "not_a_file": ErrorCode(422, False, "a `files` (or `file`) part that is a plain form field"),
    "unexpected_file": ErrorCode(422, False, "a file part under another field name than `files` (or its alias `file`)"),
    "empty_file": ErrorCode(422, False, "an image of zero bytes"),
    "corrupt_image": ErrorCode(422, False, "a corrupt or truncated image"),
    "invalid_json": ErrorCode(422, False, "the JSON body does not parse"),
    "invalid_base64": ErrorCode(422, False, "an image in the JSON body is not base64"),
    "invalid_option": ErrorCode(
        422,
        False,
        "an `allowlist`, `blocklist`, `lexicon`, `top_k`, `per_file_errors` or `debug` value the service cannot use (the message names the limit or the character), "
        "or an unknown query parameter, form field or JSON key (the message names it and the valid ones)",
    ),
    "invalid_timeout": ErrorCode(422, False, "`X-Request-Timeout-Ms` is not a positive number"),
    "validation_error": ErrorCode(422, False, "a request that does not match the API's schema"),
    "client_disconnected": ErrorCode(499, False, "the client went away before the reply (counted in the metrics; nobody reads it)"),
    "inference_failed": ErrorCode(500, False, "the model failed on the batch holding this request's images"),
    "internal_error": ErrorCode(500, False, "a bug: logged with its traceback, never details in the reply"),
    "overloaded": ErrorCode(503, True, "the queue or the request limit is full"),
    "shutting_down": ErrorCode(503, True, "the server is draining; retry on another instance"),
    "not_ready": ErrorCode(503, True, "`/readyz`: loading, warming up, draining or the worker restarting"),
    "worker_crashed": ErrorCode(503, True, "the inference worker restarted while this request's images were in its batch"),
    "out_of_memory": ErrorCode(503, True, "the model ran out of memory on this request's batch"),
    "unhealthy": ErrorCode(503, False, "`/healthz`: the process must be restarted"),
    "deadline_exceeded": ErrorCode(
        504, False, "the deadline passed; the message names the stage (receiving the body, decoding, queued, or queued/in the model)"
    ),
}

#: Codes for the errors FastAPI and Starlette raise themselves (routing, validation).
_FRAMEWORK_CODES: dict[int, str] = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 422: "validation_error", 500: "internal_error"}


def errors_table() -> str:
    """``ERRORS`` as the README's markdown table."""
    rows = ["| status | code | `Retry-After` | meaning |", "|---:|---|---|---|"]
    rows += [f"| {e.status} | `{code}` | {'yes' if e.retry else ''} | {e.meaning} |" for code, e in ERRORS.items()]
    return "\n".join(rows)


class APIError(StarletteHTTPException):
    """An HTTP error with a stable machine-readable ``code`` (a key of ``ERRORS``, which
    gives its status).

    Subclassing Starlette's ``HTTPException`` means FastAPI passes it through untouched
    from anywhere (dependencies, body parsing, our ASGI receive wrapper).

    Raises ``KeyError`` for a code that is not in ``ERRORS``.
    """

    def __init__(self, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status_code=ERRORS[code].status, detail=message, headers=dict(headers) if headers else None)
        self.code = code
        self.message = message


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    """The JSON body of every error reply."""
    return {"error": {"code": code, "message": message}}


def error_response(code: str, message: str, headers: Mapping[str, str] | None = None, *, retry_after_s: int | None = None) -> JSONResponse:
    """A ready ``JSONResponse`` in the service's error shape; ``Retry-After`` is added for
    a code that can succeed on retry when ``retry_after_s`` is given. Raises ``KeyError``
    for a code that is not in ``ERRORS``."""
    kind = ERRORS[code]  # KeyError for a code outside the table, as APIError
    out = dict(headers or {})
    if kind.retry and retry_after_s is not None:
        out.setdefault("Retry-After", str(retry_after_s))
    return JSONResponse(error_body(code, message), status_code=kind.status, headers=out or None)


def _count(request: Request, code: str) -> None:
    # The app factory puts its metrics hook on app.state; an app without one just skips it.
    hook = getattr(request.app.state, "count_error", None)
    if hook is not None:
        hook(code)


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = getattr(exc, "code", None) or _FRAMEWORK_CODES.get(exc.status_code, "bad_request" if exc.status_code < 500 else "internal_error")
    message = str(exc.detail) if exc.detail else code.replace("_", " ")
    _count(request, code)
    reply = error_response(code, message, exc.headers, retry_after_s=getattr(request.app.state, "retry_after_s", None))
    reply.status_code = exc.status_code  # a framework error keeps the status it was raised with
    return reply


def _location(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p not in ("body",)) or "request"


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    from fastapi.exceptions import RequestValidationError

    assert isinstance(exc, RequestValidationError)
    parts = [f"{_location(tuple(e.get('loc', ())))}: {e.get('msg', 'invalid')}" for e in exc.errors()[:5]]
    _count(request, "validation_error")
    return error_response("validation_error", "; ".join(parts) or "invalid request")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Logged with its traceback here; the client sees only a code.
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    _count(request, "internal_error")
    return error_response("internal_error", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    """Route every error FastAPI can produce through the one JSON shape."""
    from fastapi.exceptions import RequestValidationError

    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
