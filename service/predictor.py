"""The model on its device: loading, device and thread choice, inference, warm-up.

Everything here runs synchronously; the batcher calls ``recognize`` from its single
inference thread, so one batch runs at a time per device.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from model import CheckpointError, CheckpointInfo, Recognition, load_checkpoint
from model.calibration import Calibration, CalibrationError, read_calibration
from model.charset import Charset
from model.device import DeviceUnavailable, resolve_device
from model.engine import Engine, EngineUnavailable, open_engine
from model.lexicon import MAX_DEFAULT_LEXICON_WORDS, Lexicon, read_lexicon
from model.onnx_cache import Graphs, cache_entry, cached_graphs
from model.onnx_engine import export_graphs_checked
from model.preprocess import PreprocessConfig, collate, preprocess, to_pixels
from model.search import MAX_TOP_K, PLAIN, DecodeOptions

log = logging.getLogger("service")


class StartupError(RuntimeError):
    """The service cannot start (no weights, unusable device); the message says what to do."""


@dataclass(frozen=True)
class ModelInput:
    """One crop view for the batcher: its ``[C, H, W]`` tensor and how it is decoded
    (``model.search.DecodeOptions``: allowlist, lexicon, top_k)."""

    tensor: torch.Tensor
    options: DecodeOptions = PLAIN


def warmup_sizes(max_batch_size: int) -> list[int]:
    """Batch sizes warm-up runs: powers of two up to ``max_batch_size``, and it.

    The worker's batches take any size in ``1..max_batch_size``; these sizes touch the
    allocator's and the kernels' choices across that whole range without running all of them.
    """
    sizes, n = [], 1
    while n < max_batch_size:
        sizes.append(n)
        n *= 2
    sizes.append(max_batch_size)
    return sizes


def _warmup_image(cfg: PreprocessConfig) -> Image.Image:
    # Dark strokes on white, roughly like a word: exercises the same decode path as real crops.
    img = Image.new("L", (cfg.width * 2, cfg.height * 2), 255)
    draw = ImageDraw.Draw(img)
    for x in range(8, cfg.width * 2 - 8, 14):
        draw.rectangle((x, 12, x + 6, cfg.height * 2 - 12), fill=0)
    return img


class Predictor:
    """A loaded model, its device and precision."""

    def __init__(
        self,
        model: Engine,
        info: CheckpointInfo,
        device: torch.device,
        amp_dtype: torch.dtype | None = None,
        threads: int | None = None,
        lexicon: Lexicon | None = None,
    ) -> None:
        self.model = model
        self.info = info
        self.charset = Charset(info.config.charset)  # the characters the model reads (token masks)
        self.device = device
        self.amp_dtype = amp_dtype
        self.threads = threads
        #: Applied to requests that send no lexicon, allowlist or blocklist of their own.
        self.default_lexicon = lexicon
        #: The engine ``model`` is: "onnx" or "torch" (``model.engine.choose_engine``).
        self.backend = model.name
        #: The checkpoint's calibration of ``confidence`` (``model.calibration``); ``None``: none.
        self.calibration: Calibration | None = None

    @classmethod
    def load(
        cls,
        weights: str | os.PathLike[str],
        device: str = "auto",
        threads: int | None = None,
        bf16: bool = False,
        lexicon: str | os.PathLike[str] | None = None,
        backend: str = "auto",
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> Predictor:
        """Load a checkpoint onto the chosen device and ``backend`` (``model.engine.open_engine``), and
        the default ``lexicon`` file (one word per line) if given; raises ``StartupError``
        with a fix in its message. The ONNX graphs are exported once per checkpoint and kept
        under ``cache_dir`` (``model.onnx_cache``; ``None``: its default folder)."""
        path = Path(weights)
        if not path.exists():
            raise StartupError(
                f"model weights not found at {path}. Train a model (safl train) or point the service at a "
                "checkpoint with --weights PATH or the SAFL_WEIGHTS environment variable."
            )
        try:
            target = resolve_device(device)
        except DeviceUnavailable as exc:
            raise StartupError(f"{exc} (--device / SAFL_DEVICE)") from None
        if threads:
            torch.set_num_threads(threads)
        try:
            model, info = load_checkpoint(path, device=target)
        except CheckpointError as exc:
            raise StartupError(f"cannot load model weights {path}: {exc}") from None
        except Exception as exc:  # e.g. a sidecar config the model cannot be built from (d_model 0 or negative)
            raise StartupError(
                f"cannot load model weights {path}: building the model failed ({type(exc).__name__}: {exc}); check the config in its .json sidecar"
            ) from None
        # A diverged training run saves NaN weights that load fine and then answer "" with confidence 1.0.
        broken = [name for name, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if broken:
            raise StartupError(
                f"model weights {path} hold NaN or infinite values (in {len(broken)} tensors, e.g. {broken[0]!r}); "
                "the training run that wrote them diverged. Serve an earlier checkpoint."
            )
        # bf16 autocast only on CUDA: CPU autocast is slower than fp32 for this model.
        amp = torch.bfloat16 if bf16 and target.type == "cuda" else None
        if bf16 and amp is None:
            log.warning("bf16 requested but the device is %s; running in float32", target)
        default_lexicon = None
        if lexicon is not None:
            try:
                default_lexicon = Lexicon.build(read_lexicon(lexicon), model.charset, info.config.max_len, MAX_DEFAULT_LEXICON_WORDS)
            except (OSError, ValueError) as exc:
                raise StartupError(f"cannot use the lexicon {lexicon} (--lexicon / SAFL_LEXICON): {exc}") from None

        def graphs() -> Graphs:
            folder = cache_entry(cache_dir, info.sha256, info.weights_path.with_suffix(".json").read_bytes())
            return cached_graphs(folder, lambda: export_graphs_checked(model, info.model_id))

        try:
            engine = open_engine(model, info.model_id, backend, target.type, threads, graphs)
        except EngineUnavailable as exc:
            raise StartupError(f"{exc} (--backend / SAFL_BACKEND)") from None
        predictor = cls(engine, info, target, amp, threads, default_lexicon)
        try:
            predictor.calibration = read_calibration(info.weights_path)
        except (OSError, CalibrationError) as exc:
            raise StartupError(f"cannot use the calibration in the sidecar of {path}: {exc} (safl calibrate rewrites it)") from None
        return predictor

    def decode_options(
        self, allowlist: str | None = None, blocklist: str | None = None, lexicon: Sequence[str] | None = None, top_k: int | None = None
    ) -> DecodeOptions:
        """How a request's crops are read: its allowlist or blocklist (``Charset.token_mask``),
        its lexicon (else the default lexicon, unless it sent an allowlist or blocklist) and
        ``top_k``. Raises ``ValueError`` naming what is wrong (an unknown character, a word
        too long, too many words, ``top_k`` out of range, a lexicon with an allowlist)."""
        if top_k is not None and not 1 <= top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be 1 to {MAX_TOP_K}, got {top_k}")
        allowed = self.charset.token_mask(allowlist, blocklist)
        if lexicon is not None:
            words: Lexicon | None = Lexicon.build(lexicon, self.charset, self.info.config.max_len)
        else:
            words = self.default_lexicon if allowed is None else None
        if allowed is None and words is None and not top_k:
            return PLAIN  # read as every plain crop is: the batch takes the plain path
        return DecodeOptions(allowed, words, top_k or 0)

    @property
    def preprocess_config(self) -> PreprocessConfig:
        """Input geometry of the loaded model."""
        return self.info.config.preprocess

    @property
    def precision(self) -> str:
        """``float32`` or the autocast dtype."""
        return "bf16-autocast" if self.amp_dtype is torch.bfloat16 else "float32"

    def init_thread(self) -> None:
        """Run in the inference thread before its first batch (thread settings are per thread for OpenMP)."""
        if self.threads:
            torch.set_num_threads(self.threads)

    def recognize(self, crops: Sequence[torch.Tensor | ModelInput]) -> list[Recognition]:
        """Recognise preprocessed ``[C, H, W]`` crops, each a tensor or a ``ModelInput`` with
        its own decode options (crops with different options share one batch); on CUDA
        out-of-memory, split and retry."""
        tensors = [c.tensor if isinstance(c, ModelInput) else c for c in crops]
        options = [c.options if isinstance(c, ModelInput) else PLAIN for c in crops]
        batch = collate(tensors)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        else:
            batch = batch.to(self.device)
        readings = self._recognize(batch, None if all(o is PLAIN for o in options) else options)
        constrained = [o.allowed is not None for o in options]
        if not any(constrained):
            return readings
        # Renormalised over an allowlist or blocklist: what the free model gives each text,
        # which its calibrated confidence is made from (model.calibration.calibrate).
        from model.scoring import with_model_probability

        return with_model_probability(self.model.model, batch, readings, constrained)

    def _recognize(self, batch: torch.Tensor, options: list[DecodeOptions] | None = None) -> list[Recognition]:
        try:
            if options is None:  # the plain call, as every engine takes it
                return self.model.recognize(batch, amp_dtype=self.amp_dtype)
            return self.model.recognize(batch, amp_dtype=self.amp_dtype, options=options)
        except torch.OutOfMemoryError:
            if batch.shape[0] == 1:
                raise
            oom = True
        # Outside the except block, so the exception's frames (and their tensors) are freed first.
        assert oom
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        half = batch.shape[0] // 2
        log.warning("out of memory on a batch of %d; retrying as %d + %d", batch.shape[0], half, batch.shape[0] - half)
        halves = (None, None) if options is None else (options[:half], options[half:])
        return self._recognize(batch[:half], halves[0]) + self._recognize(batch[half:], halves[1])

    def rectified(self, crops: Sequence[torch.Tensor]) -> list[Image.Image]:
        """What the model reads of each preprocessed ``[C, H, W]`` crop: the TPS rectifier's
        output as an image at the model's input size (``SAFL.rectify``). For debugging a
        misreading; runs outside the batcher."""
        batch = collate(list(crops)).to(self.device)
        pixels = to_pixels(self.model.rectify(batch))
        return [Image.fromarray(p) for p in pixels]

    def warmup(self, max_batch_size: int) -> list[int]:
        """Run every batch size of ``warmup_sizes`` once; returns the sizes run."""
        crop = preprocess(_warmup_image(self.preprocess_config), self.preprocess_config)
        sizes = warmup_sizes(max_batch_size)
        for n in sizes:
            self.recognize([crop] * n)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return sizes
