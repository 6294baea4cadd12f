"""What one app instance owns and its life cycle: start → warm-up → ready → draining → stopped.

The app factory creates one ``Runtime`` and keeps it in ``app.state.runtime``; nothing
lives in module globals, so a process (or a test session) can hold many apps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from model import Recognition

from .batcher import BatcherConfig, DynamicBatcher
from .decode_budget import DecodeBudget
from .images import ImageLimits
from .metrics import Metrics
from .predictor import Predictor
from .settings import Settings

log = logging.getLogger("service")


class Runtime:
    """Settings, metrics, the predictor, the batcher and the service's readiness."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None, predictor: Predictor | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.predictor = predictor
        self.batcher: DynamicBatcher[Recognition] | None = None
        budget = DecodeBudget(settings.decode_memory_mb * 2**20)
        self.limits = ImageLimits(settings.max_file_bytes, settings.max_pixels, settings.request_pixel_budget(), budget)
        self.warmed = False
        self.draining = False
        #: A second signal came: no drain wait, requests in progress are cut off (``abort``).
        self.aborted = False
        self.stopped = False
        self.fatal: str | None = None
        self.in_flight = 0
        self._executor: ThreadPoolExecutor | None = None
        self._warmup_task: asyncio.Task[None] | None = None
        self._requests: set[asyncio.Task[Any]] = set()

    # --- life cycle

    async def start(self) -> None:
        """Load the model (unless given one), build the batcher, start warm-up then the worker.

        Returns once the model is loaded; warm-up runs in the background so ``/healthz``
        answers while ``/readyz`` still says 503.
        """
        s = self.settings
        if self.predictor is None:
            # Loading reads and hashes the weights: keep the loop free while it does.
            self.predictor = await asyncio.to_thread(Predictor.load, s.weights, s.device, s.threads, s.bf16, s.lexicon, s.backend, s.cache_dir)
        p = self.predictor
        # One inference thread: one batch at a time per device, and torch's thread
        # settings (per OS thread under OpenMP) are made once, in it.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safl-infer", initializer=p.init_thread)
        config = BatcherConfig(s.max_batch_size, s.max_wait_ms / 1000.0, s.max_queue)
        self.batcher = DynamicBatcher(p.recognize, config, self._executor, self.metrics)
        self.metrics.model_info.labels(name=p.info.name, sha=p.info.sha256[:12], device=str(p.device)).set(1)
        log.info("loaded %s on %s (%s)", p.info.model_id, p.device, p.precision)
        # Said once at start: an empty or blank SAFL_API_KEY (an empty Secret) means no key.
        if s.api_key is None:
            log.info("no API key: /recognize answers anyone who can reach the port (set SAFL_API_KEY to require one)")
        else:
            log.info("API key required on /recognize%s", " and /metrics" if s.auth_metrics else "")
        self._warmup_task = asyncio.get_running_loop().create_task(self._warm_up_then_serve(), name="safl-warmup")

    async def _warm_up_then_serve(self) -> None:
        assert self.predictor is not None and self.batcher is not None and self._executor is not None
        if self.settings.warmup:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            try:
                sizes = await loop.run_in_executor(self._executor, self.predictor.warmup, self.settings.max_batch_size)
            except Exception as exc:
                # A model that cannot run a warm-up batch cannot serve: fail liveness so it is restarted.
                self.fatal = f"warm-up failed: {type(exc).__name__}: {exc}"
                log.exception("warm-up failed")
                return
            log.info("warm-up ran batch sizes %s in %.2fs", sizes, loop.time() - t0)
        self.warmed = True
        self.batcher.start()

    def begin_drain(self) -> None:
        """Turn readiness to 503 and refuse new recognition requests (safe to call from a signal handler)."""
        self.draining = True

    def abort(self) -> None:
        """Stop at once (a second SIGTERM): no more drain wait, and every request in progress
        (``cancellable_request``) is cancelled, to be answered 503 ``shutting_down``
        (``service.middleware.CutOffMiddleware``). Call on the event loop's thread."""
        self.aborted = True
        self.begin_drain()
        for task in list(self._requests):
            task.cancel(msg="the server is stopping at once")

    async def drain(self, timeout: float) -> bool:
        """``begin_drain``, then wait until admitted requests finished; False on timeout or
        ``abort``."""
        self.begin_drain()
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.in_flight or (self.batcher is not None and (self.batcher.depth or self.batcher.busy)):
            if self.aborted:
                return False
            if loop.time() >= end:
                log.warning("drain timed out with %d request(s) in flight", self.in_flight)
                return False
            await asyncio.sleep(0.01)
        return True

    async def shutdown(self) -> None:
        """Drain, stop the worker, release the inference thread."""
        if self.stopped:
            return
        await self.drain(0.0 if self.aborted else self.settings.drain_timeout_s)
        self.stopped = True
        if self._warmup_task is not None and not self._warmup_task.done():
            self._warmup_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._warmup_task
        if self.batcher is not None:
            await self.batcher.stop()
        if self._executor is not None:
            # Not waiting: a batch still running finishes on its own; nothing awaits it.
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self.predictor is not None and self.predictor.device.type == "cuda":
            torch.cuda.empty_cache()

    # --- request accounting

    @contextlib.contextmanager
    def track_request(self) -> Iterator[None]:
        """Count a recognition request as in flight (drain waits for these)."""
        self.in_flight += 1
        self.metrics.in_flight_requests.inc()
        try:
            yield
        finally:
            self.in_flight -= 1
            self.metrics.in_flight_requests.dec()

    @contextlib.contextmanager
    def cancellable_request(self) -> Iterator[asyncio.Task[Any]]:
        """Register the current task (an HTTP request's) for ``abort`` to cancel; yields it."""
        task = asyncio.current_task()
        assert task is not None, "not in a task"
        self._requests.add(task)
        try:
            yield task
        finally:
            self._requests.discard(task)

    # --- probes

    def readiness(self) -> tuple[bool, str]:
        """(ready, why not)."""
        if self.fatal:
            return False, self.fatal
        if self.draining or self.stopped:
            return False, "draining: the server is shutting down"
        if self.predictor is None or self.batcher is None:
            return False, "loading the model"
        if not self.warmed:
            return False, "warming up"
        if not self.batcher.healthy:
            return False, "the inference worker is (re)starting"
        return True, "ready"

    def liveness(self) -> tuple[bool, str]:
        """(alive, why not): false only when a restart of the process is the fix."""
        if self.fatal:
            return False, self.fatal
        if self.warmed and not self.stopped and self.batcher is not None and not self.batcher.alive:
            return False, "the inference worker's supervisor has stopped"
        return True, "ok"
