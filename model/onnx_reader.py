"""The two ONNX graphs of ``model.onnx_export`` read with ONNX Runtime and NumPy alone: the
greedy loop of ``TransformerDecoder.greedy`` (the rule of ``model.greedy``), and the text and confidences of
``Charset.decode_batch``. No PyTorch: ``safl recognize`` reads with the graphs it cached on
an earlier run without importing it (``model.onnx_cache``); ``model.onnx_engine`` wraps
this with the PyTorch model for what the graphs do not do (beam search, lexicons, rectify).
"""

from __future__ import annotations

import os

import numpy as np

from . import greedy as greedy_rule
from .charset import BOS_ID, Charset
from .onnx_layout import OnnxLayout
from .preprocess import PreprocessConfig
from .reading import Recognition

#: The environment that keeps ONNX Runtime's telemetry off. The PyPI wheel has it on: on
#: import it writes a device id under ~/.cache/Microsoft/DeveloperTools/.onnxruntime and
#: sends events to mobile.events.data.microsoft.com. Only this variable, read when the
#: library loads, stops both; ``onnxruntime.disable_telemetry_events()`` comes too late.
TELEMETRY_OFF = {"ORT_DISABLE_TELEMETRY": "1"}


def keep_telemetry_off() -> None:
    """Set ``TELEMETRY_OFF`` unless the environment already says otherwise. Runs when this
    module is imported, which every entry point (``safl serve``, ``safl recognize``, the
    benchmarks) does before anything imports ``onnxruntime``."""
    for name, value in TELEMETRY_OFF.items():
        os.environ.setdefault(name, value)


keep_telemetry_off()

#: Batches up to this size run on one thread (``OnnxReader``).
SMALL_BATCH = 8


class OnnxReader:
    """Greedy reading of ``encoder`` and ``step`` (ONNX bytes, ``model.onnx_layout``) on the CPU.

    Batches of up to ``SMALL_BATCH`` crops run on one thread: a step is too small to split
    (2.06 ms a crop at batch 1 on 1 thread, 2.79 on 2); larger ones on ``threads`` (``None``:
    one per physical core), with sessions made at the first such batch. Raises
    ``ImportError`` without ``onnxruntime``, and ONNX Runtime's errors for bytes that are not
    such graphs.
    """

    def __init__(self, encoder: bytes, step: bytes, layout: OnnxLayout, threads: int | None = None) -> None:
        import onnxruntime  # noqa: F401 - an ImportError here, not at the first batch

        self.layout = layout
        self.charset = Charset(layout.config["charset"])
        self._graphs = (encoder, step)
        self._threads = threads
        self._small = self._sessions(1)
        self._large: tuple | None = self._small if threads == 1 else None

    @property
    def preprocess_config(self) -> PreprocessConfig:
        """Input geometry of the graphs' model."""
        c = self.layout.config
        return PreprocessConfig(c["height"], c["width"], c["channels"])

    def _sessions(self, intra_op: int) -> tuple:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op  # 0: ONNX Runtime's default, one per physical core
        opts.inter_op_num_threads = 1  # the graphs are chains: nothing to run side by side
        # Spinning worker threads took the cores the Python loop and the HTTP server need:
        # with it, 2 threads read 1.6x slower than 1 on 2 cores (bench notes in the README).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return tuple(ort.InferenceSession(g, opts, providers=["CPUExecutionProvider"]) for g in self._graphs)

    def read(self, images: np.ndarray, allowed: np.ndarray | None = None) -> list[Recognition]:
        """One ``Recognition`` per row of ``images`` (float32 ``[B, C, H, W]``,
        ``model.preprocess.to_array``); ``allowed``: bool ``[B, vocab]`` tokens each row may emit."""
        ids, probs = self.greedy(images, allowed)
        return self.charset.decode_batch(ids, probs)

    def greedy(self, images: np.ndarray, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Token ids int64 and probabilities float32, both ``[B, L]``, exactly as
        ``TransformerDecoder.greedy`` computes them (``allowed``: bool ``[B, V]``)."""
        lay = self.layout
        b = images.shape[0]
        if b <= SMALL_BATCH:
            encoder, step = self._small
        else:
            if self._large is None:
                self._large = self._sessions(self._threads or 0)
            encoder, step = self._large
        memory = encoder.run(lay.memory_names, {"images": images})
        feed = dict(zip(lay.memory_names, memory, strict=True))
        feed |= {name: np.zeros((b, lay.heads, 0, lay.head_dim), np.float32) for name in lay.cache_names}
        token = np.full((b, 1), BOS_ID, dtype=np.int64)
        done = np.zeros(b, dtype=bool)
        ids, probs = [], []
        for t in greedy_rule.positions(lay.max_len):
            feed["token"], feed["position"] = token, np.array([t], dtype=np.int64)
            logits, *caches = step.run(["logits", *lay.new_cache_names], feed)
            feed.update(zip(lay.cache_names, caches, strict=True))
            logits = greedy_rule.masked(logits, allowed, np)
            dist = np.exp(logits - logits.max(axis=1, keepdims=True))
            dist /= dist.sum(axis=1, keepdims=True)
            nxt, p, done = greedy_rule.pick(dist, t, lay.max_len, done, np)
            ids.append(nxt)
            probs.append(p.astype(np.float32, copy=False))
            if done.all():
                break
            token = nxt[:, None].astype(np.int64)
        return np.stack(ids, axis=1), np.stack(probs, axis=1)
