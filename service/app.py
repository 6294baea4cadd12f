"""The FastAPI app: ``create_app(settings)`` wires settings, runtime, middleware and routes."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.routing import Route

from model import Recognition
from model.preprocess import ViewConfig
from model.reading import first_views, further_views, merge, unsure

from .auth import api_key_dependency
from .batcher import BatcherClosed, CropFailed, QueueFull
from .errors import APIError, error_response, install_error_handlers
from .images import ALLOWED_FORMATS, ImageLimits, load_crop, treat_bomb_warning_as_error
from .metrics import Metrics
from .middleware import BodyLimitMiddleware, ConcurrencyLimitMiddleware, RequestMetricsMiddleware
from .predictor import Predictor
from .runtime import Runtime
from .schemas import (
    CONFIDENCE_DOC,
    BatchingInfo,
    ErrorResponse,
    InfoResponse,
    InputInfo,
    LimitsInfo,
    RecognitionResult,
    RecognizeJSON,
    RecognizeResponse,
    Status,
    ViewsInfo,
)
from .settings import Settings
from .uploads import Upload, read_uploads

#: Header a client may send to shorten the server's default deadline.
TIMEOUT_HEADER = "X-Request-Timeout-Ms"

_DESCRIPTION = f"""
Scene-text recognition of cropped word images with a SAFL model.

Concurrent requests are batched together dynamically: every crop joins one bounded
queue and a single worker runs batches of up to `max_batch_size` crops.

**confidence**: {CONFIDENCE_DOC}

Every error reply has the shape `{{"error": {{"code": "...", "message": "..."}}}}`.
"""

_RECOGNIZE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {"files": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}}},
                }
            },
            "application/json": {"schema": RecognizeJSON.model_json_schema()},
        },
    },
    "parameters": [
        {
            "name": TIMEOUT_HEADER,
            "in": "header",
            "required": False,
            "schema": {"type": "number", "exclusiveMinimum": 0},
            "description": "deadline in milliseconds; can only shorten the server's default",
        }
    ],
}


def _error_doc(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


_RECOGNIZE_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error_doc("malformed multipart body"),
    401: _error_doc("API key missing or wrong (when SAFL_API_KEY is set)"),
    413: _error_doc("too many files, file or body too large, too many pixels"),
    415: _error_doc("not an image in an allowed format, or an unsupported content type"),
    422: _error_doc("no files, empty, corrupt or truncated image, invalid JSON/base64"),
    500: _error_doc("the model failed on this request's batch"),
    503: _error_doc("queue full, shutting down or out of memory (see Retry-After)"),
    504: _error_doc("the request's deadline passed"),
}


def _request_timeout(request: Request, default_s: float) -> float:
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return default_s
    try:
        ms = float(raw)
    except ValueError:
        ms = math.nan
    if not math.isfinite(ms) or ms <= 0:
        raise APIError(422, "invalid_timeout", f"{TIMEOUT_HEADER} must be a positive number of milliseconds, got {raw!r}")
    return min(ms / 1000.0, default_s)


def _decode_all(uploads: Sequence[Upload], limits: ImageLimits, runtime: Runtime, view_cfg: ViewConfig) -> list[list[torch.Tensor]]:
    assert runtime.predictor is not None
    cfg = runtime.predictor.preprocess_config
    return [load_crop(u.data, u.filename, limits, cfg, view_cfg) for u in uploads]


async def _wait_for_disconnect(request: Request) -> None:
    # After the body is read, the next ASGI message is http.disconnect: either the
    # client went away or (harmlessly, we are done by then) the response completed.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _ClientGone(Exception):
    pass


def _retrieve_exception(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


async def _await_results(request: Request, futures: list[asyncio.Future[Recognition]], timeout: float) -> list[Recognition]:
    """Results of all futures, unless the deadline passes or the client disconnects first.

    Either way the request's pending futures are cancelled, so the worker drops their
    crops before they reach the model.
    """
    gathered = asyncio.gather(*futures)
    # A gather cancelled while pending completes later with a CancelledError *exception*
    # (it is not .cancelled()); retrieve it then, or asyncio logs "Future exception was never
    # retrieved" for every deadline and every disconnect.
    gathered.add_done_callback(_retrieve_exception)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        waiters: set[asyncio.Future[Any]] = {gathered, watcher}
        done, _ = await asyncio.wait(waiters, timeout=max(timeout, 0.0), return_when=asyncio.FIRST_COMPLETED)
        if gathered in done:
            return gathered.result()
        if watcher in done:
            raise _ClientGone()
        raise CropFailed(504, "deadline_exceeded", "the request's deadline passed before its images were recognised")
    finally:
        watcher.cancel()
        gathered.cancel()
        for fut in futures:
            if not fut.done():
                fut.cancel()
            elif not fut.cancelled():
                fut.exception()  # mark retrieved: the first failure was already raised


#: Cheap routes an orchestrator and Prometheus must reach even when the server is saturated.
UNLIMITED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def create_app(settings: Settings | None = None, *, predictor: Predictor | None = None) -> FastAPI:
    """Build the service app.

    ``settings`` defaults to ``Settings()`` (environment ``SAFL_*``). The lifespan loads
    ``settings.weights`` unless an already loaded ``predictor`` is passed (the CLI does
    that, to report a bad checkpoint before the server starts; tests use it to wrap the
    model with fault injection).
    """
    settings = settings or Settings()
    metrics = Metrics()
    runtime = Runtime(settings, metrics, predictor)
    retry_headers = {"Retry-After": str(settings.retry_after_s)}
    view_cfg = settings.view_config()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        treat_bomb_warning_as_error()
        await runtime.start()
        try:
            yield
        finally:
            await runtime.shutdown()

    app = FastAPI(title="SAFL text recognition", version="1.0", description=_DESCRIPTION, lifespan=lifespan)
    app.state.runtime = runtime
    app.state.count_error = metrics.error
    install_error_handlers(app)

    def known_paths() -> set[str]:
        return {r.path for r in app.routes if isinstance(r, Route)}

    # Added last = outermost: the latency histogram also times the 503s and 413s answered
    # by the request and body limits.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes, on_reject=metrics.error)
    app.add_middleware(ConcurrencyLimitMiddleware, limit=settings.max_connections, exempt=UNLIMITED_PATHS,
                       retry_after_s=settings.retry_after_s, on_reject=metrics.error)  # fmt: skip
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics, known_paths=known_paths)

    auth = api_key_dependency(settings.api_key.get_secret_value()) if settings.api_key else None
    protected = [Depends(auth)] if auth else []
    health_deps = protected if settings.auth_health else []
    metrics_deps = protected if settings.auth_metrics else []

    @app.post(
        "/recognize",
        response_model=RecognizeResponse,
        dependencies=protected,
        responses=_RECOGNIZE_ERRORS,
        openapi_extra=_RECOGNIZE_BODY,
        summary="Recognise the text in one or more cropped word images",
    )
    async def recognize(request: Request) -> RecognizeResponse | JSONResponse:
        """Multipart ``files`` parts or JSON ``{"images": [base64, ...]}``; results in the order sent."""
        if runtime.draining or runtime.stopped:
            raise APIError(503, "shutting_down", "the server is shutting down; retry on another instance", retry_headers)
        if runtime.batcher is not None and not runtime.batcher.has_room():
            # Refused before the body is read and decoded: under overload the excess costs almost nothing.
            raise APIError(503, "overloaded", "the recognition queue is full; retry later", retry_headers)
        started = time.monotonic()
        with runtime.track_request():
            timeout = _request_timeout(request, settings.timeout_ms / 1000.0)
            uploads = await read_uploads(request, settings.max_files, settings.max_file_bytes)
            # Decoded and validated before queueing: a bad image fails alone, and early.
            per_upload = await run_in_threadpool(_decode_all, uploads, runtime.limits, runtime, view_cfg)
            assert runtime.batcher is not None and runtime.predictor is not None
            if time.monotonic() >= started + timeout:
                raise APIError(504, "deadline_exceeded", "the deadline passed while the images were being decoded")

            async def read(inputs: list[torch.Tensor]) -> list[Recognition]:
                assert runtime.batcher is not None
                remaining = started + timeout - time.monotonic()
                if remaining <= 0:
                    raise APIError(504, "deadline_exceeded", "the request's deadline passed before its images were recognised")
                try:
                    futures = runtime.batcher.submit(inputs, deadline=started + timeout)
                except QueueFull:
                    raise APIError(503, "overloaded", "the recognition queue is full; retry later", retry_headers) from None
                except BatcherClosed:
                    raise APIError(503, "shutting_down", "the server is shutting down", retry_headers) from None
                try:
                    return await _await_results(request, futures, remaining)
                except CropFailed as exc:
                    raise APIError(exc.status, exc.code, exc.message, retry_headers if exc.retry else None) from None

            # model.reading.read_views, through the batcher: the crops as they are, then
            # the further views of those whose reading was unsure.
            try:
                first = await read(first_views(per_upload))
                unsure_crops = unsure(first, per_upload, view_cfg.confident_at)
                more = await read(further_views(per_upload, unsure_crops)) if unsure_crops else []
            except _ClientGone:
                metrics.error("client_disconnected")
                # Nobody reads this; 499 (nginx's "client closed request") labels the metrics.
                return error_response(499, "client_disconnected", "the client disconnected before the results were ready")
        answers = merge(first, per_upload, unsure_crops, more)
        return RecognizeResponse(
            model=runtime.predictor.info.model_id,
            results=[
                RecognitionResult(filename=u.filename, text=r.text, confidence=r.confidence, char_confidences=r.char_confidences)
                for u, r in zip(uploads, answers, strict=True)
            ],
        )

    @app.get("/healthz", response_model=Status, dependencies=health_deps, responses={503: _error_doc("must be restarted")})
    async def healthz() -> Status:
        """Liveness: the process is up and its inference worker is supervised."""
        alive, why = runtime.liveness()
        if not alive:
            raise APIError(503, "unhealthy", why)
        return Status(status="ok")

    not_ready_doc = _error_doc("not ready: loading, warming up, draining or worker restarting")

    @app.get("/readyz", response_model=Status, dependencies=health_deps, responses={503: not_ready_doc})
    async def readyz() -> Status:
        """Readiness: weights loaded, warmed up, worker running and not draining."""
        ready, why = runtime.readiness()
        if not ready:
            raise APIError(503, "not_ready", why, retry_headers)
        return Status(status="ready")

    @app.get("/metrics", dependencies=metrics_deps, response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus_metrics() -> Response:
        """Prometheus text format."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    # HEAD as GET without a body: HEAD-probing monitors and `wget --spider` (exit 8 on a 405)
    # see the probes' status. Left out of the schema: one operation per path and method there.
    for path, endpoint, deps in (("/healthz", healthz, health_deps), ("/readyz", readyz, health_deps), ("/metrics", prometheus_metrics, metrics_deps)):
        app.add_api_route(path, endpoint, methods=["HEAD"], dependencies=deps, include_in_schema=False)

    @app.get("/info", response_model=InfoResponse, dependencies=protected)
    async def info() -> InfoResponse:
        """The model, its device and the batching settings."""
        p = runtime.predictor
        if p is None:
            raise APIError(503, "not_ready", "the model is not loaded yet", retry_headers)
        cfg = p.info.config
        return InfoResponse(
            model=p.info.model_id,
            name=p.info.name,
            sha256=p.info.sha256,
            preset=cfg.preset,
            charset=cfg.charset,
            max_len=cfg.max_len,
            input=InputInfo(height=cfg.height, width=cfg.width, channels=cfg.channels),
            views=ViewsInfo(turn_tall=view_cfg.turn_tall, contrast=view_cfg.contrast, confident_at=view_cfg.confident_at),
            device=str(p.device),
            precision=p.precision,
            threads=p.threads or torch.get_num_threads(),
            batching=BatchingInfo(
                max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms,
                max_queue=settings.max_queue, timeout_ms=settings.timeout_ms,
            ),
            limits=LimitsInfo(
                max_files=settings.max_files, max_file_bytes=settings.max_file_bytes, max_body_bytes=settings.max_body_bytes,
                max_pixels=settings.max_pixels, formats=list(ALLOWED_FORMATS),
            ),
        )  # fmt: skip

    return app
