"""Request and response models (they also make the OpenAPI docs at ``/docs``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from model.lexicon import MAX_LEXICON_WORDS
from model.search import MAX_TOP_K

CONFIDENCE_DOC = (
    "Probability that text is exactly right, case-sensitive: the model's probability of the whole string "
    "(raw_confidence) mapped by the calibration stored with the checkpoint (fitted on labelled crops no model "
    "of its lineage trained on; README, 'What confidence means'). Keep readings at or above a threshold to trade "
    "coverage for accuracy. With an allowlist or blocklist it is made from the unconstrained model's probability "
    "of the text, so a reading forced away from what the model sees comes back unsure; with a lexicon, from the "
    "word's probability under the model. A checkpoint without a calibration answers raw_confidence here"
)
RAW_CONFIDENCE_DOC = (
    "the decoder's probability of the whole string: the product of the per-character probabilities and of the "
    "end-of-word token's (an empty text: the end-of-word probability alone); with an allowlist or blocklist "
    "renormalised over the characters allowed. The views of a crop are chosen by it"
)


LEXICON_DOC = (
    f"closed vocabulary: the answer is the most probable of these words (at most {MAX_LEXICON_WORDS} of at most 25 characters, case counts; "
    "a multipart field holds at most 64 KiB); "
    "its confidence is the model's probability of that word. Multipart: one word per line. Not with allowlist or blocklist"
)
PER_FILE_ERRORS_DOC = (
    "true: a file that cannot be read (not an image, corrupt, empty, too large) takes its place among the results as "
    '{"filename", "error": {"code", "message"}} with the code and message it would fail the whole request with, and the other '
    "files are read; false: such a file fails the whole request. Unset: the server's default (SAFL_PER_FILE_ERRORS). "
    "Errors of the request as a whole (the API key, too many files, the body size, the deadline, a malformed body, an option) "
    "are always the request's"
)
TOP_K_DOC = f"1 to {MAX_TOP_K}: also return the k most probable readings (beam search) as alternatives; text is then the first of them"


class Alternative(BaseModel):
    """One of the k most probable readings."""

    text: str
    confidence: float = Field(description="the probability that this string is right, calibrated as the result's confidence")


class RecognitionResult(BaseModel):
    """One recognised crop."""

    filename: str = Field(description="the part's filename (multipart) or image-<index> (JSON)")
    text: str = Field(description="recognised word")
    confidence: float = Field(description=CONFIDENCE_DOC)
    raw_confidence: float = Field(description=RAW_CONFIDENCE_DOC)
    char_confidences: list[float] = Field(
        description="each recognised character's probability, in order, raised to the one power that makes their product "
        "with the end-of-word token's the confidence (the least sure character stays the least sure)"
    )
    alternatives: list[Alternative] | None = Field(None, description="with top_k: the k most probable readings, most probable first (the first is text)")
    rectified: str | None = Field(
        None,
        description="with ?debug=rectified: the image the model read (the TPS rectifier's output) of the view the answer came from (a tall crop turned, when its turned reading won), a PNG data: URL",
    )


class ErrorDetail(BaseModel):
    """What went wrong."""

    code: str = Field(description="stable machine-readable code, e.g. too_many_pixels")
    message: str = Field(description="human-readable explanation, naming the file where there is one")


class ErrorResponse(BaseModel):
    """The body of every 4xx/5xx reply."""

    error: ErrorDetail


class FileError(BaseModel):
    """A file that could not be read (with ``per_file_errors``), in its place among the results.

    It has no ``text``: a client that reads only ``text`` cannot take it for a reading."""

    filename: str = Field(description="the part's filename (multipart) or image-<index> (JSON)")
    error: ErrorDetail = Field(description="the code and message the whole request would have failed with without per_file_errors")


class RecognizeResponse(BaseModel):
    """Results in the order the images were sent: one per image, never fewer."""

    model_config = ConfigDict(protected_namespaces=())

    model: str = Field(description="<name>@<first 12 hex digits of the weights' sha256>")
    results: list[RecognitionResult | FileError] = Field(description="a reading, or with per_file_errors an error for a file that could not be read")


class RecognizeJSON(BaseModel):
    """``application/json`` body for clients that cannot send multipart; a key that is none of
    these is refused (422 invalid_option, naming it and the valid ones)."""

    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(min_length=1, description="base64-encoded image files (a data: URL prefix is allowed)")
    filenames: list[str] | None = Field(None, description="optional names echoed back in the results, one per image")
    allowlist: str | None = Field(None, description="the only characters an answer may hold, e.g. 0123456789 (applied while decoding)")
    blocklist: str | None = Field(None, description="characters an answer may not hold")
    lexicon: list[str] | None = Field(None, description=LEXICON_DOC)
    # The range is in the description, not a schema minimum/maximum: the pipeline answers an
    # out-of-range value 422 invalid_option like the multipart field, but only after the
    # request's other checks (a request with too many images is 413 whatever its top_k), and
    # a schema limit would make that order a contract violation.
    top_k: int | None = Field(None, description=TOP_K_DOC)
    per_file_errors: bool | None = Field(None, description=PER_FILE_ERRORS_DOC)


class Status(BaseModel):
    """Liveness / readiness."""

    status: str


class InputInfo(BaseModel):
    """Geometry every crop is resized to."""

    height: int
    width: int
    channels: int


class ViewsInfo(BaseModel):
    """The views of each crop the model reads; the most confident reading is the answer."""

    turn_tall: bool = Field(description="a crop taller than wide is also read turned 90° each way")
    contrast: bool = Field(description="each crop is also read contrast-stretched and histogram-equalised")
    confident_at: float = Field(description="a first reading at least this confident is the answer without the further views")


class BatchingInfo(BaseModel):
    """Dynamic batching settings."""

    max_batch_size: int
    max_wait_ms: float
    max_queue: int
    timeout_ms: float


class LimitsInfo(BaseModel):
    """Per-request input limits."""

    max_files: int
    max_file_bytes: int
    max_body_bytes: int
    max_pixels: int
    max_request_pixels: int
    formats: list[str]


class InfoResponse(BaseModel):
    """What is being served, and how."""

    model_config = ConfigDict(protected_namespaces=())

    model: str
    name: str
    sha256: str
    preset: str
    charset: str
    max_len: int
    input: InputInfo
    views: ViewsInfo
    device: str
    backend: str = Field(description="inference engine: onnx (ONNX Runtime) or torch")
    precision: str
    threads: int
    batching: BatchingInfo
    limits: LimitsInfo
