"""Prometheus metrics, one ``CollectorRegistry`` per app (tests build many apps).

Bucket edges follow the service's real latencies: a tiny model's batch takes about a
millisecond, a small one tens of milliseconds on a CPU, and a request that queued behind
a busy worker or decoded a large upload takes up to seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: Sub-millisecond to 30 s: request, queue-wait and inference durations.
LATENCY_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Crops per batch; powers of two up to the largest sensible ``max_batch_size``.
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)

#: Error codes exported as zero from the start, so their rates exist before the first error.
#: Other codes appear when first counted; all come from the service's own code, never
#: from client input, so the label set stays bounded.
COMMON_ERRORS: tuple[str, ...] = (
    "overloaded",
    "deadline_exceeded",
    "client_disconnected",
    "inference_failed",
    "out_of_memory",
    "worker_crashed",
    "shutting_down",
    "unauthorized",
    "internal_error",
)


@dataclass
class Metrics:
    """All of the service's collectors, registered on ``registry``."""

    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self) -> None:
        r = self.registry
        self.request_duration = Histogram(
            "safl_request_duration_seconds", "HTTP request latency, arrival to last byte sent.", ["route", "status"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.crops_recognized = Counter(
            "safl_crops_recognized_total", "Model inputs recognised and returned (a crop taller than wide is read as 3 turned views).", registry=r
        )
        self.crops_dropped = Counter(
            "safl_crops_dropped_total", "Queued crops dropped before the model ran (expired deadline, cancelled request).", ["reason"], registry=r
        )
        self.queue_wait = Histogram("safl_queue_wait_seconds", "Time a crop waited in the queue before its batch started.", buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("safl_batch_size", "Crops per model batch.", buckets=BATCH_BUCKETS, registry=r)
        self.inference_duration = Histogram(
            "safl_inference_duration_seconds", "Model time per batch (collate, transfer, forward, decode).", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("safl_queue_depth", "Crops waiting for the model.", registry=r)
        self.in_flight_requests = Gauge("safl_in_flight_requests", "Recognition requests being handled.", registry=r)
        self.in_flight_crops = Gauge("safl_in_flight_crops", "Crops in the batch the model is running now.", registry=r)
        self.errors = Counter("safl_errors_total", "Error replies (and requests abandoned by their client), by error code.", ["reason"], registry=r)
        self.worker_restarts = Counter("safl_worker_restarts_total", "Times the supervised batching worker was restarted.", registry=r)
        self.model_info = Gauge("safl_model_info", "The model being served (value is always 1).", ["name", "sha", "device"], registry=r)
        for reason in COMMON_ERRORS:
            self.errors.labels(reason=reason)
        for reason in ("expired", "cancelled"):
            self.crops_dropped.labels(reason=reason)

    def error(self, code: str) -> None:
        """Count one error reply by its stable error code."""
        self.errors.labels(reason=code).inc()

    def render(self) -> tuple[bytes, str]:
        """The registry in Prometheus text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
