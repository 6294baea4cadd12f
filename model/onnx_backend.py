"""``SAFL.recognize`` on ONNX Runtime: the two graphs of ``model.onnx_export`` and the
greedy loop of ``TransformerDecoder.greedy`` in NumPy.

On these CPUs a decoder step costs PyTorch about 0.4 ms of per-operator overhead at batch
1 and ONNX Runtime a fraction of it (``bench/model_speed.py --backends``), which is most of
a word's reading time. Beam search (``top_k``), lexicons and the rectified image are
rarer requests and stay with the PyTorch model this is built from.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .charset import BOS_ID, EOS_ID, PAD_ID
from .onnx_export import export_graphs
from .preprocess import ViewConfig
from .reading import Recognition, read_images
from .safl import SAFL
from .search import PLAIN, DecodeOptions, token_masks

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

#: Batches up to this size run on one thread (``OnnxRecognizer``).
SMALL_BATCH = 8


class OnnxRecognizer:
    """A loaded SAFL read through ONNX Runtime on the CPU; same readings as ``SAFL.recognize``.

    Raises ``ImportError`` if ``onnxruntime`` or ``onnx`` (which ``torch.onnx`` needs to
    export) is not installed.
    """

    def __init__(self, model: SAFL, model_id: str, threads: int | None = None) -> None:
        import onnx  # noqa: F401 - torch.onnx.export needs it; fail here with an ImportError, not inside the export
        import onnxruntime as ort

        encoder, step, self.layout = export_graphs(model, model_id)

        def sessions(intra_op: int) -> tuple[ort.InferenceSession, ort.InferenceSession]:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = intra_op  # 0: ONNX Runtime's default, one per physical core
            opts.inter_op_num_threads = 1  # the graphs are chains: nothing to run side by side
            # Spinning worker threads took the cores the Python loop and the HTTP server need:
            # with it, 2 threads read 1.6x slower than 1 on 2 cores (bench notes in the README).
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return tuple(ort.InferenceSession(g, opts, providers=["CPUExecutionProvider"]) for g in (encoder, step))  # type: ignore[return-value]

        # Small batches on one thread: a step is too small to split (2.06 ms a crop at batch 1
        # on 1 thread, 2.79 on 2); large batches on all of them.
        self._small = sessions(1)
        self._large = self._small if threads == 1 else sessions(threads or 0)
        self.model = model.eval()
        self.charset = model.charset

    def recognize(
        self, images: torch.Tensor, amp_dtype: torch.dtype | None = None, options: DecodeOptions | Sequence[DecodeOptions] | None = None
    ) -> list[Recognition]:
        """``SAFL.recognize`` (``amp_dtype`` is ignored: float32 on the CPU). Crops with a
        lexicon or ``top_k`` are read by the PyTorch model; the batch's other crops here."""
        b = images.shape[0]
        opts = [options or PLAIN] * b if options is None or isinstance(options, DecodeOptions) else list(options)
        if len(opts) != b:
            raise ValueError(f"{len(opts)} decode options for {b} images")
        greedy = [i for i, o in enumerate(opts) if o.greedy]
        out: list[Recognition | None] = [None] * b
        if len(greedy) < b:  # beam search and lexicons: the PyTorch decoder, for those crops only
            rest = [i for i, o in enumerate(opts) if not o.greedy]
            for i, r in zip(rest, self.model.recognize(images[rest], options=[opts[i] for i in rest]), strict=True):
                out[i] = r
        if greedy:
            masks = token_masks([opts[i] for i in greedy], self.charset.vocab_size)
            allowed = None if masks is None else masks.numpy()
            rows = images if len(greedy) == b else images[greedy]
            ids, probs = self.greedy(rows.detach().cpu().numpy().astype(np.float32, copy=False), allowed)
            for i, r in zip(greedy, self.charset.decode_batch(torch.from_numpy(ids), torch.from_numpy(probs)), strict=True):
                out[i] = r
        return [r for r in out if r is not None]

    def recognize_images(self, images: list[Image.Image], view_cfg: ViewConfig = ViewConfig()) -> list[Recognition]:
        """``SAFL.recognize_images`` on ONNX Runtime."""
        return read_images(self.recognize, images, self.model.config.preprocess, view_cfg, torch.device("cpu"))

    def rectify(self, images: torch.Tensor) -> torch.Tensor:
        """``SAFL.rectify``, by the PyTorch model."""
        return self.model.rectify(images)

    def greedy(self, images: np.ndarray, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Token ids int64 and probabilities float32, both ``[B, L]``, exactly as
        ``TransformerDecoder.greedy`` computes them (``allowed``: bool ``[B, V]``)."""
        lay = self.layout
        b = images.shape[0]
        encoder, step = self._small if b <= SMALL_BATCH else self._large
        memory = encoder.run(lay.memory_names, {"images": images})
        feed = dict(zip(lay.memory_names, memory, strict=True))
        feed |= {name: np.zeros((b, lay.heads, 0, lay.head_dim), np.float32) for name in lay.cache_names}
        token = np.full((b, 1), BOS_ID, dtype=np.int64)
        done = np.zeros(b, dtype=bool)
        ids, probs = [], []
        for t in range(lay.max_len + 1):
            feed["token"], feed["position"] = token, np.array([t], dtype=np.int64)
            logits, *caches = step.run(["logits", *lay.new_cache_names], feed)
            feed.update(zip(lay.cache_names, caches, strict=True))
            if allowed is not None:
                logits = np.where(allowed, logits, -np.inf)
            logits[:, [PAD_ID, BOS_ID]] = -np.inf
            dist = np.exp(logits - logits.max(axis=1, keepdims=True))
            dist /= dist.sum(axis=1, keepdims=True)
            if t == lay.max_len:  # out of room: the end, with the probability the model gives it
                nxt, p = np.full(b, EOS_ID, dtype=np.int64), dist[:, EOS_ID]
            else:
                nxt = dist.argmax(axis=1)
                p = dist[np.arange(b), nxt]
            nxt = np.where(done, PAD_ID, nxt)
            ids.append(nxt)
            probs.append(np.where(done, 1.0, p).astype(np.float32))
            done |= nxt == EOS_ID
            if done.all():
                break
            token = nxt[:, None].astype(np.int64)
        return np.stack(ids, axis=1), np.stack(probs, axis=1)
