"""Synthetic crops rendered while training runs, for machines with cores to spare.

On the 2-core CPU machines rendering ahead (``safl synth``) is the right call: a
concurrent renderer would steal the trainer's cores. On a GPU machine with many
cores the GPU waits for data instead, and a pre-rendered set would be seen many
times over; there, worker processes render an endless, never-repeating stream.

The stream is deterministic: position ``p`` is crop ``start + p`` of the renderer's
``(seed, index)`` sequence, so a resumed run continues with the very crops it would
have seen, whatever the number of workers.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from .fonts import discover_fonts
from .synth import SynthConfig, close_pool, render_pool, render_range


class RenderStream:
    """An endless, ordered stream of rendered ``(image, label, points)`` from a worker pool."""

    def __init__(self, cfg: SynthConfig, workers: int, chunk: int = 128, depth: int | None = None) -> None:
        if workers < 1:
            raise ValueError("a render stream needs at least one worker")
        self.cfg = cfg
        self.chunk = chunk
        self.depth = depth or 3 * workers  # chunks in flight: keeps every worker busy without unbounded memory
        faces = discover_fonts(cfg.charset)
        self._pool = render_pool(cfg, faces, workers)
        self._pending: deque = deque()
        self._images: list[np.ndarray] = []
        self._labels: list[str] = []
        self._points: list[np.ndarray] = []
        self._next = 0
        self.position = 0

    def seek(self, index: int) -> None:
        """Continue the stream at crop ``index`` (drops what was rendered ahead)."""
        self._pending.clear()
        self._images, self._labels, self._points = [], [], []
        self._next = self.position = index

    def _fill(self) -> None:
        while len(self._pending) < self.depth:
            self._pending.append(self._pool.apply_async(render_range, ((self._next, self._next + self.chunk),)))
            self._next += self.chunk

    def take(self, n: int) -> tuple[np.ndarray, list[str], np.ndarray]:
        """The next ``n`` crops (uint8 ``[n, H, W]``), labels and fiducial points (float16
        ``[n, F, 2]``, ``render_range``), in stream order."""
        have = sum(len(a) for a in self._images)
        while have < n:
            self._fill()
            arr, labels, points = self._pending.popleft().get()
            self._images.append(arr)
            self._labels += labels
            self._points.append(points)
            have += len(arr)
        self._fill()
        images, points = np.concatenate(self._images), np.concatenate(self._points)
        labels, self._labels = self._labels[:n], self._labels[n:]
        self._images = [images[n:]] if len(images) > n else []
        self._points = [points[n:]] if len(points) > n else []
        self.position += n
        return images[:n], labels, points[:n]

    def close(self) -> None:
        """Stop the workers (``close_pool``: bounded, even when one was killed from outside)."""
        close_pool(self._pool)

    def __enter__(self) -> RenderStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
