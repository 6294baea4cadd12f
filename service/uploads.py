"""Read a recognition request's images from ``multipart/form-data`` or base64 JSON.

Only bytes come out of here; decoding is ``service.images``' job. The body's total size
is capped by ``BodyLimitMiddleware`` while it streams in; this module enforces the
per-request file count and the per-file size.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from .errors import APIError
from .schemas import RecognizeJSON

#: Plain form fields are the reading options (``OPTION_FIELDS``); their number and size are bounded.
_MAX_FIELDS = 16
_MAX_FIELD_BYTES = 64 * 1024
_HOW = "send multipart/form-data with one or more 'files' parts ('file' is an alias), or application/json {\"images\": [\"<base64>\", ...]}"


#: Longest allowlist or blocklist accepted (characters).
MAX_OPTION_CHARS = 1000


@dataclass(frozen=True)
class ReadingOptions:
    """How a request's crops are read: the same names as form fields, JSON keys and
    ``safl recognize`` flags. ``allowlist``: the only characters an answer may hold;
    ``blocklist``: characters it may not (``model.charset.Charset.token_mask``);
    ``lexicon``: the words an answer must be one of; ``top_k``: how many alternative
    readings to return (``service.predictor.Predictor.decode_options`` checks them)."""

    allowlist: str | None = None
    blocklist: str | None = None
    lexicon: tuple[str, ...] | None = None
    top_k: int | None = None
    #: Answer a file that cannot be read with an error in its place among the results
    #: (``None``: the request did not say; ``request_options`` settles it).
    per_file_errors: bool | None = None


@dataclass(frozen=True)
class Upload:
    """One image as sent: its name and raw bytes."""

    filename: str
    data: bytes
    #: Why this part carries no usable bytes (not a file, over the size limit, not base64):
    #: the error the whole request fails with, or its per-file error (``per_file_errors``).
    rejected: APIError | None = None


#: Field names of image parts: ``files``, and ``file`` for clients that name a single
#: upload so (requests' and curl's habit); parts of both are read in the order sent.
FILE_FIELDS = ("files", "file")


class _MultiPartParser(MultiPartParser):
    """Starlette's parser, noting whether the closing boundary arrived: Starlette returns
    what it parsed from a body cut short without a word, so two parts cut before the
    closing boundary would be answered as one."""

    complete = False

    def on_end(self) -> None:
        self.complete = True


async def read_uploads(request: Request, max_files: int, max_file_bytes: int) -> tuple[list[Upload], ReadingOptions]:
    """The request's images in the order sent and its reading options; ``APIError`` (4xx)
    for anything malformed in the request as a whole. A part that is not a usable file
    (``not_a_file``, ``file_too_large``, ``invalid_base64``) is returned with its error as
    ``Upload.rejected``: the caller decides whether it fails the request."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    coding = request.headers.get("content-encoding", "identity").strip().lower()
    if coding not in ("", "identity"):
        # Decompressing would need the body limit applied to the inflated size; images are
        # compressed already, so a compressed body saves little.
        raise APIError("unsupported_content_encoding", f"Content-Encoding {coding!r} is not accepted; send the body uncompressed")
    try:
        if media == "multipart/form-data":
            return await _read_multipart(request, max_files, max_file_bytes)
        if media == "application/json" or media.endswith("+json"):
            return _read_json(await request.body(), max_files, max_file_bytes)
    except ClientDisconnect:
        raise APIError("client_disconnected", "the client disconnected while sending the body") from None
    if not media and request.headers.get("content-length", "0") == "0" and "transfer-encoding" not in request.headers:
        raise APIError("no_files", f"the request has no body: {_HOW}")
    raise APIError("unsupported_content_type", f"content type {media or '(none)'!r} is not accepted: {_HOW}")


def _multipart_problem(exc: MultiPartException) -> str:
    # Starlette reports python-multipart's errors as "Invalid multipart data."; the cause says what.
    cause = exc.__cause__
    return f"{exc} ({cause})" if cause is not None and str(cause) else str(exc)


#: The option that turns a file's error into one result instead of the request's error:
#: a form field, a JSON key and a query parameter of this one name.
PER_FILE_ERRORS = "per_file_errors"
#: The reading options (all optional): a multipart request's plain form fields and a JSON
#: body's keys besides its images; any other field or key is refused (``unknown_option``).
OPTION_FIELDS = ("allowlist", "blocklist", "lexicon", "top_k", PER_FILE_ERRORS)
#: The keys of a JSON body (``RecognizeJSON``'s fields).
JSON_KEYS = ("images", "filenames", *OPTION_FIELDS)
#: What a ``per_file_errors`` form field or query parameter may say.
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


def unknown_option(what: str, name: str) -> APIError:
    """``invalid_option`` for a form field or JSON key (``what``) that is no option, naming it
    and the valid ones: a misspelt option (allow_list=, topk=) read unconstrained would look
    like a reading that ignored it."""
    options = ", ".join(OPTION_FIELDS)
    if what == "JSON key":
        others = ", ".join(k for k in JSON_KEYS if k not in OPTION_FIELDS)
        return APIError("invalid_option", f"unknown JSON key {name[:40]!r}: the keys are {others} and the options {options}")
    return APIError("invalid_option", f"unknown {what} {name[:40]!r}: the options are {options}")


def parse_flag(name: str, raw: str) -> bool:
    """``true``/``1`` or ``false``/``0`` (any case, spaces around ignored) as a bool;
    ``APIError`` ``invalid_option`` naming ``name`` for anything else."""
    value = _BOOLEANS.get(raw.strip().lower())
    if value is None:
        raise APIError("invalid_option", f"{name} must be true or false, got {raw[:40]!r}")
    return value


def _options(allowlist: str | None, blocklist: str | None, lexicon: list[str] | None, top_k: int | None, per_file_errors: bool | None = None) -> ReadingOptions:
    for name, value in (("allowlist", allowlist), ("blocklist", blocklist)):
        if value is not None and len(value) > MAX_OPTION_CHARS:
            raise APIError("invalid_option", f"{name} has {len(value)} characters; the limit is {MAX_OPTION_CHARS}")
    return ReadingOptions(allowlist, blocklist, None if lexicon is None else tuple(lexicon), top_k, per_file_errors)


def _form_options(fields: dict[str, str]) -> ReadingOptions:
    top_k = fields.get("top_k")
    if top_k is not None:
        try:
            top_k = int(top_k.strip())
        except ValueError:
            raise APIError("invalid_option", f"top_k must be a whole number, got {top_k[:40]!r}") from None
    lexicon = fields.get("lexicon")
    per_file = fields.get(PER_FILE_ERRORS)
    return _options(
        fields.get("allowlist"),
        fields.get("blocklist"),
        None if lexicon is None else lexicon.splitlines(),
        top_k,
        None if per_file is None else parse_flag(PER_FILE_ERRORS, per_file),
    )


async def _read_multipart(request: Request, max_files: int, max_file_bytes: int) -> tuple[list[Upload], ReadingOptions]:
    if request.headers.get("content-length") == "0":
        raise APIError("no_files", f"the multipart body is empty: {_HOW}")
    parser = _MultiPartParser(request.headers, request.stream(), max_files=max_files, max_fields=_MAX_FIELDS, max_part_size=_MAX_FIELD_BYTES)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        # Starlette signals every multipart problem with this one exception type.
        if str(exc).startswith("Too many files"):
            raise APIError("too_many_files", f"more than {max_files} files in one request") from None
        raise APIError("malformed_multipart", f"the multipart body could not be parsed: {_multipart_problem(exc)}") from None
    try:
        if not parser.complete:
            raise APIError("malformed_multipart", "the multipart body ended before its closing boundary: it was cut short, so parts may be missing")
        items = form.multi_items()
        stray = [key for key, value in items if isinstance(value, UploadFile) and key not in FILE_FIELDS]
        if stray:
            raise APIError("unexpected_file", f"a file part named {stray[0]!r}: send images as 'files' parts (or 'file')")
        parts = [value for key, value in items if key in FILE_FIELDS]
        if not parts:
            raise APIError("no_files", f"no 'files' parts in the request: {_HOW}")
        if len(parts) > max_files:
            raise APIError("too_many_files", f"{len(parts)} files in one request; the limit is {max_files}")
        uploads = []
        for index, value in enumerate(parts):
            if not isinstance(value, UploadFile):
                problem = APIError(
                    "not_a_file",
                    f"image part #{index} is a plain form field: its Content-Disposition has no filename= parameter "
                    "(filename*= alone is not read), so it carries no file",
                )
                uploads.append(Upload(f"file-{index}", b"", problem))
                continue
            name = value.filename or f"file-{index}"
            if value.size is not None and value.size > max_file_bytes:
                uploads.append(Upload(name, b"", APIError("file_too_large", f"file {name!r} is {value.size} bytes; the limit is {max_file_bytes}")))
                continue
            uploads.append(Upload(name, await value.read()))
        fields: dict[str, str] = {}
        for key, value in items:
            if key in FILE_FIELDS:
                continue
            if key not in OPTION_FIELDS:
                raise unknown_option("form field", key)
            if key in fields or not isinstance(value, str):
                raise APIError("invalid_option", f"{key} must be one plain form field")
            fields[key] = value
        return uploads, _form_options(fields)
    finally:
        await form.close()


def _b64decode(text: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    text = "".join(text.split())  # MIME base64 wraps lines
    if "-" in text or "_" in text:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    return base64.b64decode(text, validate=True)


def _read_json(body: bytes, max_files: int, max_file_bytes: int) -> tuple[list[Upload], ReadingOptions]:
    try:
        payload = RecognizeJSON.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors()
        unknown = [e for e in errors if e.get("type") == "extra_forbidden"]
        if unknown:  # named first: {"image": ...} is a typo of "images", not only a body without them
            raise unknown_option("JSON key", str(unknown[0]["loc"][0])) from None
        err = errors[0]
        if err.get("type") == "json_invalid":
            raise APIError("invalid_json", f"the body is not valid JSON: {err.get('msg')}") from None
        where = ".".join(str(p) for p in err.get("loc", ())) or "body"
        if err.get("type") == "too_short" and where == "images":
            raise APIError("no_files", f"'images' is empty: {_HOW}") from None
        raise APIError("validation_error", f'{where}: {err.get("msg")} (expected {{"images": ["<base64>", ...]}})') from None
    images = payload.images
    if len(images) > max_files:
        raise APIError("too_many_files", f"{len(images)} images in one request; the limit is {max_files}")
    names = payload.filenames
    if names is not None and len(names) != len(images):
        raise APIError("validation_error", f"{len(names)} filenames for {len(images)} images")
    uploads = []
    for index, text in enumerate(images):
        name = names[index] if names is not None else f"image-{index}"
        if len(text) * 3 // 4 > max_file_bytes + 3:  # checked before decoding it
            uploads.append(Upload(name, b"", APIError("file_too_large", f"image {name!r} is over {max_file_bytes} bytes")))
            continue
        try:
            uploads.append(Upload(name, _b64decode(text)))
        except (binascii.Error, ValueError):
            uploads.append(Upload(name, b"", APIError("invalid_base64", f"image {name!r} is not valid base64")))
    return uploads, _options(payload.allowlist, payload.blocklist, payload.lexicon, payload.top_k, payload.per_file_errors)
