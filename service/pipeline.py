"""The ``/recognize`` pipeline: admission → upload → decode → queue → model, every stage
within the request's deadline.

``recognize`` is the route's one call. The deadline (the server's ``timeout_ms``, or
shorter with ``X-Request-Timeout-Ms``) is checked in every stage, and a 504 names the
stage it passed in: a slow upload is not blamed on decoding, and 64 huge images are not
decoded long past a client's deadline.
"""

from __future__ import annotations

import asyncio
import base64
import io
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from fastapi import Request
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from model import Recognition
from model.calibration import calibrate
from model.preprocess import PreprocessConfig, ViewConfig
from model.reading import aread_answers
from model.search import PLAIN

from .batcher import BatcherClosed, CropFailed, QueueFull
from .errors import APIError, error_response
from .images import ImageLimits, load_crops
from .predictor import ModelInput
from .runtime import Runtime
from .schemas import Alternative, ErrorDetail, FileError, RecognitionResult, RecognizeResponse
from .uploads import PER_FILE_ERRORS, Upload, parse_flag, read_uploads

#: Header a client may send to shorten the server's default deadline.
TIMEOUT_HEADER = "X-Request-Timeout-Ms"


@dataclass(frozen=True)
class Deadline:
    """A request's deadline on the ``time.monotonic()`` clock, in seconds."""

    at: float
    #: The request's budget, for messages (ms).
    budget_ms: float = field(default=0.0, compare=False)

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds, seconds * 1000.0)

    def remaining(self) -> float:
        """Seconds left; 0 or less once passed."""
        return self.at - time.monotonic()

    def passed(self, stage: str) -> APIError:
        """The 504 for a deadline that passed ``stage`` (e.g. "while the images were being decoded")."""
        return APIError("deadline_exceeded", f"the request's deadline ({self.budget_ms:g} ms) passed {stage}")

    def check(self, stage: str) -> None:
        """Raise ``passed(stage)`` if the deadline has passed."""
        if self.remaining() <= 0:
            raise self.passed(stage)


UPLOAD = "while the body was being received"
DECODE = "while the images were being decoded"
QUEUED = "while its images were queued for the model"
MODEL = "before its images were recognised (queued or in the model)"


def request_deadline(request: Request, default_s: float) -> Deadline:
    """The deadline from now: ``default_s``, or the client's shorter ``X-Request-Timeout-Ms``.

    Raises ``APIError`` ``invalid_timeout`` for a header that is not a positive number.
    """
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return Deadline.after(default_s)
    try:
        ms = float(raw)
    except ValueError:
        ms = math.nan
    if not math.isfinite(ms) or ms <= 0:
        raise APIError("invalid_timeout", f"{TIMEOUT_HEADER} must be a positive number of milliseconds, got {raw!r}")
    return Deadline.after(min(ms / 1000.0, default_s))


def decode_uploads(
    uploads: Sequence[Upload], limits: ImageLimits, cfg: PreprocessConfig, view_cfg: ViewConfig, deadline: Deadline, per_file: bool = False
) -> list[list[torch.Tensor] | APIError]:
    """Each upload's model inputs (``service.images.load_crops``), the deadline checked
    before each image is decoded. Runs in a worker thread.

    Raises the first upload's ``APIError`` (``Upload.rejected`` or ``ImageRejected``);
    with ``per_file`` a failing upload's error takes its place in the list instead."""
    if not per_file:
        for u in uploads:
            if u.rejected is not None:
                raise u.rejected
    kept = [i for i, u in enumerate(uploads) if u.rejected is None]
    loaded = load_crops([(uploads[i].data, uploads[i].filename) for i in kept], limits, cfg, view_cfg, lambda: deadline.check(DECODE), per_file)
    out: list[list[torch.Tensor] | APIError] = [u.rejected if u.rejected is not None else [] for u in uploads]
    for i, crop in zip(kept, loaded, strict=True):
        out[i] = crop
    return out


#: Query parameters of ``/recognize``: ``debug`` and ``per_file_errors``.
QUERY_PARAMETERS = ("debug", PER_FILE_ERRORS)


@dataclass(frozen=True)
class QueryOptions:
    """``/recognize``'s query parameters: ``debug`` (``DEBUG_VALUES``) and
    ``per_file_errors`` (``None``: not given)."""

    debug: str | None = None
    per_file_errors: bool | None = None


def query_options(request: Request) -> QueryOptions:
    """The request's query parameters; ``APIError`` ``invalid_option`` for an unknown one
    or a value it cannot take."""
    params = request.query_params
    unknown = sorted(set(params) - set(QUERY_PARAMETERS))
    if unknown:  # a typo such as ?debg=rectified must not be ignored silently
        raise APIError(
            "invalid_option",
            f"unknown query parameter {unknown[0][:40]!r}: /recognize takes only debug={'|'.join(DEBUG_VALUES)} and {PER_FILE_ERRORS}=true|false",
        )
    debug = params.get("debug")
    if debug is not None and debug not in DEBUG_VALUES:
        raise APIError("invalid_option", f"debug must be one of {', '.join(DEBUG_VALUES)}, got {debug[:40]!r}")
    per_file = params.get(PER_FILE_ERRORS)
    return QueryOptions(debug, None if per_file is None else parse_flag(PER_FILE_ERRORS, per_file))


def per_file_errors(in_query: bool | None, in_body: bool | None, default: bool) -> bool:
    """Whether a request's unreadable files are per-file errors: as the request says (query
    parameter or body), else the server's ``default``. ``APIError`` ``invalid_option`` when
    the query and the body disagree."""
    if in_query is not None and in_body is not None and in_query != in_body:
        raise APIError("invalid_option", f"{PER_FILE_ERRORS} is {str(in_query).lower()} in the query but {str(in_body).lower()} in the body")
    said = in_query if in_query is not None else in_body
    return default if said is None else said


class ClientGone(Exception):
    """The client disconnected before its results were ready."""


async def _wait_for_disconnect(request: Request) -> None:
    # After the body is read, the next ASGI message is http.disconnect: either the
    # client went away or (harmlessly, we are done by then) the response completed.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _retrieve_exception(fut: asyncio.Future[object]) -> None:
    if not fut.cancelled():
        fut.exception()


async def await_results(request: Request, futures: list[asyncio.Future[Recognition]], deadline: Deadline) -> list[Recognition]:
    """Results of all futures, unless the deadline passes (504) or the client disconnects
    (``ClientGone``) first.

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
        waiters: set[asyncio.Future[object]] = {gathered, watcher}
        done, _ = await asyncio.wait(waiters, timeout=max(deadline.remaining(), 0.0), return_when=asyncio.FIRST_COMPLETED)
        if gathered in done:
            return gathered.result()
        if watcher in done:
            raise ClientGone()
        raise deadline.passed(MODEL)
    finally:
        watcher.cancel()
        gathered.cancel()
        for fut in futures:
            if not fut.done():
                fut.cancel()
            elif not fut.cancelled():
                fut.exception()  # mark retrieved: the first failure was already raised


async def recognize(request: Request, runtime: Runtime, view_cfg: ViewConfig) -> RecognizeResponse | JSONResponse:
    """Answer one ``/recognize`` request: its results in the order sent, or an ``APIError``.

    With ``per_file_errors`` (``per_file_errors``) a file that cannot be read is a
    ``FileError`` in its place among the results, counted in the metrics by its code.
    ``?debug=rectified`` adds each crop's rectified image (``Predictor.rectified``) of the
    view its answer was read from."""
    settings = runtime.settings
    query = query_options(request)
    if runtime.draining or runtime.stopped:
        raise APIError("shutting_down", "the server is shutting down; retry on another instance")
    if runtime.batcher is not None and not runtime.batcher.has_room():
        # Refused before the body is read and decoded: under overload the excess costs almost nothing.
        raise APIError("overloaded", "the recognition queue is full; retry later")
    with runtime.track_request():
        # Every submission of this request queues at its arrival, the second pass of its
        # unsure tall crops too (``DynamicBatcher.submit``).
        arrived = time.monotonic()
        deadline = request_deadline(request, settings.timeout_ms / 1000.0)
        try:
            uploads, options = await asyncio.wait_for(read_uploads(request, settings.max_files, settings.max_file_bytes), max(deadline.remaining(), 0.0))
        except TimeoutError:
            raise deadline.passed(UPLOAD) from None
        per_file = per_file_errors(query.per_file_errors, options.per_file_errors, settings.per_file_errors)
        batcher, predictor = runtime.batcher, runtime.predictor
        assert batcher is not None and predictor is not None
        try:
            # In a worker thread: a lexicon's trie takes up to a second to build.
            decode = await run_in_threadpool(predictor.decode_options, options.allowlist, options.blocklist, options.lexicon, options.top_k)
        except ValueError as exc:
            raise APIError("invalid_option", str(exc)) from None
        # Decoded and validated before queueing: a bad image fails alone, and early.
        per_upload = await run_in_threadpool(decode_uploads, uploads, runtime.limits, predictor.preprocess_config, view_cfg, deadline, per_file)
        deadline.check(DECODE)  # the last image's decode may have taken it past

        async def read(inputs: list[torch.Tensor]) -> list[Recognition]:
            deadline.check(MODEL)
            try:
                items = inputs if decode is PLAIN else [ModelInput(t, decode) for t in inputs]
                futures = batcher.submit(items, deadline=deadline.at, order=arrived)
            except QueueFull:
                raise APIError("overloaded", "the recognition queue is full; retry later") from None
            except BatcherClosed:
                raise APIError("shutting_down", "the server is shutting down") from None
            try:
                return await await_results(request, futures, deadline)
            except CropFailed as exc:
                if exc.code == "deadline_exceeded":  # dropped by the batcher before its batch ran
                    raise deadline.passed(QUEUED) from None
                raise APIError(exc.code, exc.message) from None

        crops = [crop for crop in per_upload if not isinstance(crop, APIError)]
        try:
            answers = await aread_answers(read, crops, view_cfg.confident_at)
        except ClientGone:
            runtime.metrics.error("client_disconnected")
            # Nobody reads this; 499 (nginx's "client closed request") labels the metrics.
            return error_response("client_disconnected", "the client disconnected before the results were ready")
        pictures: list[str | None] = [None] * len(answers)
        if query.debug == "rectified" and crops:  # every file may have failed on its own (per_file_errors)
            # The view each answer came from: a tall crop's turned view when that one was read best.
            images = await run_in_threadpool(predictor.rectified, [views[view] for views, (_, view) in zip(crops, answers, strict=True)])
            pictures = [png_data_url(im) for im in images]
    results: list[RecognitionResult | FileError] = []
    read_back = iter(zip(answers, pictures, strict=True))
    for upload, crop in zip(uploads, per_upload, strict=True):
        if isinstance(crop, APIError):
            runtime.metrics.error(crop.code)
            results.append(FileError(filename=upload.filename, error=ErrorDetail(code=crop.code, message=crop.message)))
            continue
        (decoded, _), picture = next(read_back)
        r = calibrate(decoded, predictor.calibration)
        results.append(
            RecognitionResult(
                filename=upload.filename,
                text=r.text,
                confidence=r.confidence,
                raw_confidence=r.raw_confidence,
                char_confidences=r.char_confidences,
                alternatives=[Alternative(text=a.text, confidence=a.confidence) for a in r.alternatives] if options.top_k else None,
                rectified=picture,
            )
        )
    return RecognizeResponse(model=predictor.info.model_id, results=results)


#: Values of the ``debug`` query parameter of ``/recognize``.
DEBUG_VALUES = ("rectified",)


def png_data_url(image: Image.Image) -> str:
    """``image`` as a ``data:image/png;base64,...`` URL (what an <img src> shows)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
