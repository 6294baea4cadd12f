"""A memory budget for decoding images, shared by every request in progress.

Each image is decoded at full resolution (JPEG at a reduced scale, ``model.preprocess.draft``)
before it is shrunk to the model's input, so the memory a server needs grew with the number
of clients: 8 concurrent requests of four 16-megapixel PNGs took 2.6 GB. Here an image is
decoded only once its estimated cost fits in the budget beside the decodes under way; the
others wait their turn, first come first served, within their request's deadline. The
budget is a setting (``decode_memory_mb``), so a deployment's memory limit can be derived
from it (README, "Memory").
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from PIL import Image

#: Peak bytes per decoded pixel of decoding and converting one image, measured on
#: 16-megapixel uploads: RGBA PNG 7.8 (Pillow keeps RGB(A) in 4 bytes a pixel, and averaging
#: it makes one premultiplied copy), RGB PNG 4.0, palette PNG 4.9, 16-bit PNG 5.9, grey 1.1.
BYTES_PER_PIXEL = 8


def decode_cost(img: Image.Image) -> int:
    """Bytes decoding ``img`` may take at its peak, from its header (after ``draft``)."""
    width, height = img.size
    return width * height * BYTES_PER_PIXEL


class DecodeBudget:
    """``capacity`` bytes handed out to decodes, in the order they asked; thread-safe (the
    decodes run in worker threads)."""

    def __init__(self, capacity: int, poll_s: float = 0.05) -> None:
        if capacity < 1:
            raise ValueError("the decode budget must be at least 1 byte")
        self.capacity = capacity
        self.in_use = 0
        self._poll_s = poll_s
        self._cond = threading.Condition()
        self._queue: deque[int] = deque()
        self._tickets = itertools.count()

    @contextmanager
    def reserve(self, nbytes: int, check: Callable[[], None] = lambda: None) -> Iterator[None]:
        """Hold ``nbytes`` (at most the whole budget: a larger image is decoded alone) for the
        ``with`` block, after the decodes that asked before. ``check`` runs every
        ``poll_s`` seconds while waiting; what it raises (the request's 504) ends the wait."""
        nbytes = min(nbytes, self.capacity)
        with self._cond:
            ticket = next(self._tickets)
            self._queue.append(ticket)
            try:
                while self._queue[0] != ticket or self.in_use + nbytes > self.capacity:
                    self._cond.wait(self._poll_s)
                    check()
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()  # the next in line may fit now, or be first
            self.in_use += nbytes
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= nbytes
                self._cond.notify_all()
