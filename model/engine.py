"""The inference engines: what every reader of crops needs from one (``Engine``), and the one
choice of engine (``choose_engine``, ``open_engine``) that the server, ``safl recognize``,
``safl eval`` and the benchmarks make.

Two engines read the same network: PyTorch (``model.torch_engine``) and ONNX Runtime over
the exported graphs (``model.onnx_engine``), which reads the same and about 2.5x faster at
batch 1 on the CPU (README, "ONNX Runtime and `safl export`"; model card, "Speed").
``choose_engine`` imports neither PyTorch nor ONNX Runtime: ``safl recognize`` asks it
before deciding whether to load PyTorch at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from .onnx_cache import Graphs
    from .reading import Recognition
    from .safl import SAFL
    from .search import DecodeOptions

log = logging.getLogger(__name__)

#: The names an engine is asked for by (``--backend``, ``SAFL_BACKEND``).
ENGINES = ("auto", "onnx", "torch")


class EngineUnavailable(RuntimeError):
    """The engine asked for cannot read here; the message says what to do instead."""


class Engine(Protocol):
    """Reads preprocessed crops with a loaded network."""

    #: ``"torch"`` or ``"onnx"``.
    name: str
    #: The PyTorch network the engine reads with (its config and charset; beam search).
    model: SAFL

    def recognize(
        self, images: torch.Tensor, amp_dtype: torch.dtype | None = None, options: DecodeOptions | Sequence[DecodeOptions] | None = None
    ) -> list[Recognition]:
        """One reading per row of ``images`` float32 ``[B, C, H, W]`` (``model.preprocess.to_tensor``),
        each read as its ``options`` say (``model.search.DecodeOptions``, one for all or one per
        row; ``None``: greedy), under autocast to ``amp_dtype`` where the engine has it. Raises
        ``ValueError`` if a sequence of options is not one per row."""
        ...

    def rectify(self, images: torch.Tensor) -> torch.Tensor:
        """What the encoder reads of ``images`` ``[B, C, H, W]``: the rectifier's output, same shape."""
        ...


def choose_engine(requested: str, device_type: str) -> str:
    """``"onnx"`` or ``"torch"`` for the engine ``requested`` (one of ``ENGINES``) on a device
    of type ``device_type`` (``"cpu"``, ``"cuda"``). ``auto``: ONNX Runtime on the CPU, PyTorch
    elsewhere. Raises ``EngineUnavailable`` for an unknown name, or ``onnx`` off the CPU."""
    if requested not in ENGINES:
        raise EngineUnavailable(f"unknown backend {requested!r}; choose from {', '.join(ENGINES)}")
    if requested == "auto":
        return "onnx" if device_type == "cpu" else "torch"
    if requested == "onnx" and device_type != "cpu":
        raise EngineUnavailable(f"the onnx backend runs on the CPU, not {device_type}; use --backend torch")
    return requested


def open_engine(model: SAFL, model_id: str, requested: str, device_type: str, threads: int | None = None, graphs: Callable[[], Graphs] | None = None) -> Engine:
    """The engine ``choose_engine`` picks, reading ``model`` (already on its device).

    ONNX Runtime reads the graphs ``graphs()`` returns (``None``: exported from ``model`` now)
    on ``threads`` threads (``None``: one per core). When ``auto`` picked it and it cannot run
    (``onnxruntime`` or ``onnx`` missing, a model the exporter or ONNX Runtime refuses), the
    engine is PyTorch and one warning says why. Raises ``EngineUnavailable`` when the engine
    named cannot be used.
    """
    name = choose_engine(requested, device_type)
    if name == "onnx":
        from .onnx_engine import OnnxEngine, export_graphs_checked

        try:
            return OnnxEngine(model, graphs() if graphs is not None else export_graphs_checked(model, model_id), threads)
        except ImportError as exc:
            if requested == "onnx":
                raise EngineUnavailable(f"--backend onnx needs onnxruntime and onnx ({exc}): pip install onnxruntime onnx") from None
            log.warning("onnxruntime or onnx is not installed (%s); reading with PyTorch, which is slower on the CPU", exc)
        except Exception as exc:  # an export or session failure: a model the exporter cannot take
            if requested == "onnx":
                raise EngineUnavailable(f"cannot run {model_id} on ONNX Runtime ({type(exc).__name__}: {exc}); use --backend torch") from None
            log.warning("cannot run the model on ONNX Runtime (%s: %s); reading with PyTorch", type(exc).__name__, exc)
    from .torch_engine import TorchEngine

    return TorchEngine(model)


def as_engine(reader: Engine | SAFL) -> Engine:
    """``reader`` as an engine: a bare ``SAFL`` (training's validation, tools handed a model)
    is read by PyTorch on its own device (``TorchEngine``); an engine is itself."""
    from .safl import SAFL

    if isinstance(reader, SAFL):
        from .torch_engine import TorchEngine

        return TorchEngine(reader)
    return reader
