"""Dynamic batching in the manner of Triton's dynamic batcher.

Every request's crops (already decoded and validated) go into one bounded queue, ordered
by their request's arrival: a request's later crops (the turned views of an unsure tall
crop, read in a second submission) keep its place instead of waiting behind every request
that arrived meanwhile, so a request waits for its own work and what was ahead of it. A
single worker forms a batch when it holds ``max_batch_size`` crops, when the oldest
crop has waited ``max_wait_s`` since it arrived, or at once when the worker frees up
and finds crops that arrived while it was busy (they have waited already). The batch
runs in the inference thread, off the event loop, and each crop's future is resolved,
so a request's crops may span batches and still come back in order. Crops whose
request has given up (deadline passed, client gone) are dropped before the model runs.

The worker runs under a supervisor: if its loop dies, ``healthy`` turns false, the crops
of the batch it held fail with 503, and it is restarted with a backoff; queued crops
stay queued.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from .metrics import Metrics

log = logging.getLogger("service")

R = TypeVar("R")


class QueueFull(Exception):
    """The queue cannot take a request's crops: reply 503 with Retry-After."""


class BatcherClosed(Exception):
    """The batcher is shutting down and takes no new crops."""


class CropFailed(Exception):
    """A crop could not be recognised; ``code`` (a key of ``service.errors.ERRORS``) says
    how to report it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class BatcherConfig:
    """How batches are formed."""

    max_batch_size: int = 32
    max_wait_s: float = 0.005
    max_queue: int = 256
    restart_backoff_s: float = 0.05
    max_restart_backoff_s: float = 2.0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue < 1 or self.max_wait_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_wait_s >= 0")


@dataclass(eq=False)
class _Crop(Generic[R]):
    tensor: Any  # what run_batch takes: a tensor, or the service's ModelInput
    future: asyncio.Future[R]
    arrived: float
    deadline: float


#: A queue entry: (its request's arrival, submission number, crop); a heap of these pops
#: the crops of the earliest request first, each request's in the order submitted.
_Entry = tuple[float, int, _Crop[R]]


class DynamicBatcher(Generic[R]):
    """Queue + supervised worker around a synchronous ``run_batch(list[Tensor]) -> list[R]``."""

    def __init__(
        self,
        run_batch: Callable[[list[Any]], list[R]],
        config: BatcherConfig,
        executor: Executor,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.run_batch = run_batch
        self.config = config
        self._executor = executor
        self._metrics = metrics
        self._clock = clock
        self._queue: list[_Entry[R]] = []  # a heap
        self._seq = itertools.count()
        self._running: list[_Crop[R]] = []
        self._wakeup = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._closed = False
        self._healthy = False
        self._freed_at = float("-inf")
        self._crashes = 0

    # --- state

    @property
    def depth(self) -> int:
        """Crops waiting (not yet in a batch)."""
        return len(self._queue)

    @property
    def busy(self) -> bool:
        """A batch is running."""
        return bool(self._running)

    @property
    def healthy(self) -> bool:
        """The worker loop is running (started, not crashed, not restarting, not stopped)."""
        return self._healthy and self.alive

    @property
    def alive(self) -> bool:
        """The supervisor runs: the worker is running or will be restarted."""
        return self._supervisor is not None and not self._supervisor.done()

    # --- producer side (event loop)

    def has_room(self, n: int = 1) -> bool:
        """Whether ``n`` more crops would fit in the queue now (abandoned crops do not count)."""
        if len(self._queue) + n > self.config.max_queue:
            self._purge()
        return len(self._queue) + n <= self.config.max_queue

    def submit(self, tensors: Sequence[Any], deadline: float, order: float | None = None) -> list[asyncio.Future[R]]:
        """Queue one request's crops, all or none; returns one future per crop, in order.

        ``order`` places them: the arrival time of their request on the batcher's clock
        (seconds), so its later submissions queue ahead of requests that came after it;
        unset, now. ``deadline`` is on the same clock. Raises ``QueueFull`` when they do not
        all fit and ``BatcherClosed`` after ``stop``.
        """
        if self._closed:
            raise BatcherClosed("the batcher is shut down")
        if len(self._queue) + len(tensors) > self.config.max_queue:
            self._purge()  # abandoned crops must not hold places while the worker is busy
        if len(self._queue) + len(tensors) > self.config.max_queue:
            raise QueueFull(f"{len(self._queue)} crops queued; {len(tensors)} more would exceed {self.config.max_queue}")
        loop = asyncio.get_running_loop()
        now = self._clock()
        place = now if order is None else order
        futures: list[asyncio.Future[R]] = []
        for t in tensors:
            fut: asyncio.Future[R] = loop.create_future()
            heapq.heappush(self._queue, (place, next(self._seq), _Crop(t, fut, now, deadline)))
            futures.append(fut)
        self._gauge_depth()
        self._wakeup.set()
        return futures

    # --- lifecycle

    def start(self) -> None:
        """Start the supervised worker on the running loop."""
        if self._supervisor is None:
            self._supervisor = asyncio.get_running_loop().create_task(self._supervise(), name="safl-batcher")

    async def stop(self) -> None:
        """Refuse new crops, stop the worker, fail whatever is still pending with 503."""
        self._closed = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            try:
                await self._supervisor
            except asyncio.CancelledError:
                pass
        leftover = [crop for _, _, crop in self._queue] + self._running
        self._queue.clear()
        self._running = []
        self._fail(leftover, CropFailed("shutting_down", "the server shut down before this image was recognised"))
        self._gauge_depth()
        self._healthy = False

    # --- worker

    async def _supervise(self) -> None:
        while True:
            try:
                await self._work()
            except asyncio.CancelledError:
                raise
            except Exception:
                self._healthy = False
                self._crashes += 1
                log.exception("batching worker crashed (%d in a row); restarting", self._crashes)
                if self._metrics:
                    self._metrics.worker_restarts.inc()
                crashed, self._running = self._running, []
                lost = CropFailed("worker_crashed", "the inference worker restarted while this image was in its batch")
                self._fail(crashed, lost)
                if self._metrics:
                    self._metrics.in_flight_crops.set(0)
                backoff = self.config.restart_backoff_s * 2 ** min(self._crashes - 1, 16)
                await asyncio.sleep(min(backoff, self.config.max_restart_backoff_s))

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._form_batch()
            self._running = batch
            await self._execute(batch, loop)
            self._running = []

    async def _form_batch(self) -> list[_Crop[R]]:
        cfg = self.config
        while True:
            self._purge()
            timeout: float | None = None
            if self._queue:
                if len(self._queue) >= cfg.max_batch_size:
                    break
                oldest = min(crop.arrived for _, _, crop in self._queue)
                if oldest <= self._freed_at:  # it arrived while the worker was busy
                    break
                timeout = oldest + cfg.max_wait_s - self._clock()
                if timeout <= 0:
                    break
            self._healthy = True
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                pass
        batch = [heapq.heappop(self._queue)[2] for _ in range(min(len(self._queue), cfg.max_batch_size))]
        self._gauge_depth()
        return batch

    def _purge(self) -> None:
        """Drop crops whose request gave up, before they cost model time."""
        if not self._queue:
            return
        now = self._clock()
        kept: list[_Entry[R]] = []
        for entry in self._queue:
            crop = entry[2]
            if now >= crop.deadline:
                if not crop.future.done():
                    crop.future.set_exception(CropFailed("deadline_exceeded", "the deadline passed while the image was queued"))
                self._count_drop("expired")
            elif crop.future.done():  # cancelled: the request timed out, or its client went away
                self._count_drop("cancelled")
            else:
                kept.append(entry)
        if len(kept) != len(self._queue):
            heapq.heapify(kept)  # a heap's subsequence is not always a heap
            self._queue = kept
            self._gauge_depth()

    async def _execute(self, batch: list[_Crop[R]], loop: asyncio.AbstractEventLoop) -> None:
        m = self._metrics
        started = self._clock()
        if m:
            for crop in batch:
                m.queue_wait.observe(started - crop.arrived)
            m.batch_size.observe(len(batch))
            m.in_flight_crops.set(len(batch))
        try:
            results = await loop.run_in_executor(self._executor, self.run_batch, [c.tensor for c in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"the model returned {len(results)} results for {len(batch)} crops")
        except Exception as exc:
            # Only this batch's requests fail; the worker carries on with the next batch.
            self._fail(batch, self._classify(exc))
            return
        finally:
            self._freed_at = self._clock()
            if m:
                m.inference_duration.observe(self._freed_at - started)
                m.in_flight_crops.set(0)
        for crop, result in zip(batch, results, strict=True):
            if not crop.future.done():
                crop.future.set_result(result)
        self._crashes = 0
        if m:
            m.crops_recognized.inc(len(batch))

    @staticmethod
    def _classify(exc: Exception) -> CropFailed:
        if isinstance(exc, torch.OutOfMemoryError):
            log.error("out of memory even for a single crop: %s", exc)
            return CropFailed("out_of_memory", "the model ran out of memory on this image's batch; retry later")
        log.error("inference failed on a batch", exc_info=exc)
        return CropFailed("inference_failed", "the model failed on the batch holding this image; other requests are unaffected")

    @staticmethod
    def _fail(crops: Sequence[_Crop[R]], error: CropFailed) -> None:
        for crop in crops:
            if not crop.future.done():
                crop.future.set_exception(error)

    def _count_drop(self, reason: str) -> None:
        if self._metrics:
            self._metrics.crops_dropped.labels(reason=reason).inc()

    def _gauge_depth(self) -> None:
        if self._metrics:
            self._metrics.queue_depth.set(len(self._queue))
