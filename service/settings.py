"""Service settings: environment variables ``SAFL_*``, overridden by ``safl serve`` flags.

Every field here becomes a ``--flag`` of ``safl serve`` (see ``service.cli``), so the
field descriptions are the flags' help and the README's settings table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.checkpoint import shipped_weights
from model.preprocess import ViewConfig

#: The shipped model (``model.checkpoint.shipped_weights``).
DEFAULT_WEIGHTS = shipped_weights()


class Settings(BaseSettings):
    """Everything ``create_app`` needs; read from ``SAFL_<NAME>`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="SAFL_", extra="forbid", frozen=True)

    # --- server
    host: str = Field(default="127.0.0.1", description="interface to listen on (0.0.0.0 for all)")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(default="info", description="uvicorn and service log level")
    access_log_probes: bool = Field(
        default=False,
        description="also write access-log lines for /healthz, /readyz and /metrics requests that succeed (failed ones, status 400 or above, are always logged)",
    )

    # --- model
    weights: Path = Field(default=DEFAULT_WEIGHTS, description="checkpoint .safetensors (its .json sidecar must sit next to it)")
    device: str = Field(default="auto", description="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    threads: int | None = Field(
        default=None, ge=1, description="intra-op threads for inference (unset: PyTorch's default; ONNX Runtime: one per physical core)"
    )
    backend: Literal["auto", "onnx", "torch"] = Field(
        default="auto",
        description="inference engine: onnx (ONNX Runtime; the same readings, about 2.5x faster at batch 1 on the CPU), torch (PyTorch), auto (onnx on the CPU, torch on CUDA)",
    )
    bf16: bool = Field(default=False, description="bf16 autocast for inference; applies on CUDA only")
    cache_dir: Path | None = Field(
        default=None,
        description="folder where the ONNX graphs exported from a checkpoint are kept, so later starts (and safl recognize) read them instead of exporting again (unset: $XDG_CACHE_HOME/safl, else ~/.cache/safl)",
    )
    warmup: bool = Field(default=True, description="run the batch shapes once before /readyz turns 200")
    turn_tall: bool = Field(
        default=ViewConfig().turn_tall,
        description="also read a crop taller than wide turned 90° each way; the most confident reading is the answer (x3 model inputs for such a crop)",
    )
    contrast_views: bool = Field(
        default=ViewConfig().contrast,
        description="also read each crop contrast-stretched and histogram-equalised; the most confident reading is the answer (x3 model inputs)",
    )
    lexicon: Path | None = Field(
        default=None,
        description="default lexicon, a UTF-8 file of one word per line: answers are its most probable word, for requests that send no lexicon, allowlist or blocklist",
    )
    views_confident_at: float = Field(
        default=ViewConfig().confident_at,
        ge=0.0,
        le=1.0,
        description="read a crop's further views only when the crop alone reads less confidently than this; 1 reads every view",
    )

    # --- dynamic batching
    max_batch_size: int = Field(default=32, ge=1, le=1024, description="most crops in one model batch (1 turns batching off)")
    max_wait_ms: float = Field(
        default=0.0,
        ge=0,
        le=10_000,
        description="longest the oldest crop is held back to fill a batch while the model is idle (crops that arrive while it is busy are batched anyway)",
    )
    max_queue: int = Field(default=1024, ge=1, description="model inputs (crop views) waiting, all requests together; beyond it: 503")
    timeout_ms: float = Field(default=10_000, gt=0, description="default request deadline; a client may shorten it with X-Request-Timeout-Ms")
    retry_after_s: int = Field(default=1, ge=0, description="Retry-After seconds sent with 503 replies")
    drain_timeout_s: float = Field(default=30.0, ge=0, description="on SIGTERM, longest wait for admitted requests to finish")

    max_connections: int = Field(
        default=512,
        ge=1,
        description="requests in progress at once, /healthz, /readyz and /metrics aside (so it also caps the bodies being received); beyond it a JSON 503 'overloaded'",
    )
    header_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="longest a connection may wait, open or between requests, without sending a complete request's headers; then it is closed (idle and trickling sockets cannot pile up)",
    )

    # --- input limits
    max_files: int = Field(default=64, ge=1, description="most images in one request")
    max_file_bytes: int = Field(default=10 * 2**20, ge=1, description="largest single image, bytes")
    max_body_bytes: int = Field(default=50 * 2**20, ge=1, description="largest request body, bytes (Content-Length and streamed)")
    max_pixels: int = Field(default=16_000_000, ge=1, description="most pixels (width x height) in one image, checked before decoding")
    max_request_pixels: int | None = Field(
        default=None, ge=1, description="most pixels of a request's images together, checked from their headers before any is decoded (unset: 4 x max_pixels)"
    )
    decode_memory_mb: int = Field(
        default=256,
        ge=1,
        description="memory (MiB) the images being decoded may take at once, all requests together, reckoned at 8 bytes a pixel (a JPEG's at its reduced decoding scale); an image waits for room within its request's deadline, one larger than this is decoded alone",
    )
    per_file_errors: bool = Field(
        default=False,
        description="answer a file that cannot be read with an error in its place among the results and read the others, for requests that do not say (per_file_errors form field, JSON key or query parameter)",
    )

    # --- access
    api_key: SecretStr | None = Field(
        default=None,
        description="when set, requests need 'Authorization: Bearer KEY' or 'X-API-Key: KEY'; surrounding whitespace is dropped, and printable ASCII only",
    )
    auth_health: bool = Field(default=False, description="also require the API key on /healthz and /readyz")
    auth_metrics: bool = Field(default=False, description="also require the API key on /metrics")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("device must be auto, cpu, cuda or cuda:N")

    @field_validator("api_key")
    @classmethod
    def _usable_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        # `echo KEY > file` and `kubectl create secret --from-file` end the key in a newline
        # that no client can send in a header: every request was 401.
        key = value.get_secret_value().strip()
        if not key:
            return None  # SAFL_API_KEY= (empty) in a deployment file means "no key", not "the empty key"
        for i, char in enumerate(key):
            # Printable ASCII only: a header value cannot carry control characters, and a
            # non-ASCII key matched only the Latin-1 bytes some clients happen to send.
            if not " " <= char <= "~":
                kind = "a control character" if char.isascii() or not char.isprintable() else "a non-ASCII character"
                # The position, never the key: this message is printed and logged.
                raise ValueError(f"the API key holds {kind} at position {i + 1} of {len(key)}; use printable ASCII (what an HTTP header carries)")
        return SecretStr(key)

    def request_pixel_budget(self) -> int:
        """``max_request_pixels``, or 4 x ``max_pixels`` when unset (so raising the per-image
        limit never makes the server refuse to start)."""
        return self.max_request_pixels if self.max_request_pixels is not None else 4 * self.max_pixels

    def view_config(self) -> ViewConfig:
        """The views of each crop the service reads (``model.preprocess.views``)."""
        return ViewConfig(turn_tall=self.turn_tall, contrast=self.contrast_views, confident_at=self.views_confident_at)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        views = self.view_config().max_views()
        if self.max_files * views > self.max_queue:
            detail = f"max_files ({self.max_files}) x {views} views" if views > 1 else f"max_files ({self.max_files})"
            raise ValueError(f"{detail} cannot exceed max_queue ({self.max_queue}): such a request could never queue")
        if self.max_file_bytes > self.max_body_bytes:
            raise ValueError("max_file_bytes cannot exceed max_body_bytes")
        if self.max_request_pixels is not None and self.max_pixels > self.max_request_pixels:
            raise ValueError("max_pixels cannot exceed max_request_pixels")
        return self
