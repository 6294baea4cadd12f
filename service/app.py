"""The FastAPI app: ``create_app(settings)`` wires settings, runtime, middleware and routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline

from . import page, pipeline
from .auth import api_key_dependency
from .errors import ERRORS, APIError, install_error_handlers
from .images import ALLOWED_FORMATS, treat_bomb_warning_as_error
from .metrics import Metrics
from .middleware import BodyLimitMiddleware, ConcurrencyLimitMiddleware, CutOffMiddleware, RequestMetricsMiddleware
from .predictor import Predictor
from .runtime import Runtime
from .schemas import (
    CONFIDENCE_DOC,
    LEXICON_DOC,
    PER_FILE_ERRORS_DOC,
    TOP_K_DOC,
    BatchingInfo,
    ErrorResponse,
    InfoResponse,
    InputInfo,
    LimitsInfo,
    RecognizeJSON,
    RecognizeResponse,
    Status,
    ViewsInfo,
)
from .settings import Settings

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
                    "properties": {
                        "files": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}},
                        # Untyped on purpose: a multipart field is text whatever a client meant, so
                        # "a number instead of a string" cannot be told apart (and is not an error).
                        "allowlist": {"description": "text: the only characters an answer may hold (at most 1,000)"},
                        "blocklist": {"description": "text: characters an answer may not hold (at most 1,000)"},
                        "lexicon": {"description": f"text: {LEXICON_DOC}"},
                        "top_k": {"description": f"text: a whole number, {TOP_K_DOC}"},
                        "per_file_errors": {"description": f"text: true or false (or 1 or 0), {PER_FILE_ERRORS_DOC}"},
                    },
                    "description": "image parts named 'files' ('file' is accepted too); a file part under any other name, "
                    "or a plain field that is none of these options, is refused (422 invalid_option)",
                }
            },
            "application/json": {"schema": RecognizeJSON.model_json_schema()},
        },
    },
    "parameters": [
        {
            "name": pipeline.TIMEOUT_HEADER,
            "in": "header",
            "required": False,
            "schema": {"type": "number", "exclusiveMinimum": 0},
            "description": "deadline in milliseconds; can only shorten the server's default",
        },
        {
            "name": "debug",
            "in": "query",
            "required": False,
            "schema": {"type": "string", "enum": list(pipeline.DEBUG_VALUES)},
            "description": "rectified: add each crop's rectified image (what the model read, of the view its answer came from: "
            "a tall crop turned when the turned reading won) to its result, as a PNG data: URL",
        },
        {
            "name": "per_file_errors",
            "in": "query",
            "required": False,
            "schema": {"type": "boolean"},
            "description": f"{PER_FILE_ERRORS_DOC}; the same as the form field or JSON key of that name (when both are given they must agree)",
        },
    ],
}


def _error_doc(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


#: Codes /recognize never answers with (probes, routing, the 499 nobody reads).
_NOT_FROM_RECOGNIZE = frozenset({"unhealthy", "not_ready", "not_found", "method_not_allowed", "client_disconnected"})

_RECOGNIZE_ERRORS: dict[int | str, dict[str, Any]] = {
    status: _error_doc(", ".join(code for code, e in ERRORS.items() if e.status == status and code not in _NOT_FROM_RECOGNIZE))
    for status in sorted({e.status for code, e in ERRORS.items() if code not in _NOT_FROM_RECOGNIZE})
}


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
    view_cfg = settings.view_config()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        treat_bomb_warning_as_error()
        await runtime.start()
        try:
            yield
        finally:
            await runtime.shutdown()

    # FastAPIOffline: /docs and /redoc load their scripts from the installed package, so they
    # work where the server has no internet (FastAPI's own pages fetch them from a CDN).
    app = FastAPIOffline(title="SAFL text recognition", version="1.0", description=_DESCRIPTION, lifespan=lifespan)
    app.state.runtime = runtime
    app.state.count_error = metrics.error
    app.state.retry_after_s = settings.retry_after_s
    install_error_handlers(app)

    # Added last = outermost: the latency histogram also times the 503s and 413s answered
    # by the request and body limits.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes, on_reject=metrics.error)
    app.add_middleware(
        ConcurrencyLimitMiddleware, limit=settings.max_connections, exempt=UNLIMITED_PATHS, retry_after_s=settings.retry_after_s, on_reject=metrics.error
    )
    app.add_middleware(CutOffMiddleware, runtime=runtime, on_reject=metrics.error)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics, routes=lambda: app.routes)

    auth = api_key_dependency(settings.api_key.get_secret_value()) if settings.api_key else None
    protected = [Depends(auth)] if auth else []
    health_deps = protected if settings.auth_health else []
    metrics_deps = protected if settings.auth_metrics else []

    @app.post(
        "/recognize",
        response_model=RecognizeResponse,
        response_model_exclude_none=True,  # alternatives and rectified only when asked for
        dependencies=protected,
        responses=_RECOGNIZE_ERRORS,
        openapi_extra=_RECOGNIZE_BODY,
        summary="Recognise the text in one or more cropped word images",
    )
    async def recognize(request: Request) -> RecognizeResponse | JSONResponse:
        """Multipart ``files`` parts or JSON ``{"images": [base64, ...]}``; results in the order sent."""
        return await pipeline.recognize(request, runtime, view_cfg)

    @app.get("/healthz", response_model=Status, dependencies=health_deps, responses={503: _error_doc("must be restarted")})
    async def healthz() -> Status:
        """Liveness: the process is up and its inference worker is supervised."""
        alive, why = runtime.liveness()
        if not alive:
            raise APIError("unhealthy", why)
        return Status(status="ok")

    not_ready_doc = _error_doc("not ready: loading, warming up, draining or worker restarting")

    @app.get("/readyz", response_model=Status, dependencies=health_deps, responses={503: not_ready_doc})
    async def readyz() -> Status:
        """Readiness: weights loaded, warmed up, worker running and not draining."""
        ready, why = runtime.readiness()
        if not ready:
            raise APIError("not_ready", why)
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

    app.include_router(page.router)  # the web page at /: no key needed, the calls it makes carry one

    @app.get("/info", response_model=InfoResponse, dependencies=protected)
    async def info() -> InfoResponse:
        """The model, its device and the batching settings."""
        p = runtime.predictor
        if p is None:
            raise APIError("not_ready", "the model is not loaded yet")
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
            backend=p.backend,
            precision=p.precision,
            threads=p.threads or torch.get_num_threads(),
            batching=BatchingInfo(
                max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue, timeout_ms=settings.timeout_ms
            ),
            limits=LimitsInfo(
                max_files=settings.max_files,
                max_file_bytes=settings.max_file_bytes,
                max_body_bytes=settings.max_body_bytes,
                max_pixels=settings.max_pixels,
                max_request_pixels=settings.request_pixel_budget(),
                formats=list(ALLOWED_FORMATS),
            ),
        )

    return app
