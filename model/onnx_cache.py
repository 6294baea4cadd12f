"""ONNX graphs exported once per checkpoint and kept on disk, so a start reads them instead
of exporting again (about a second and a half, and PyTorch itself, on these CPUs).

An entry is a ``model.onnx_layout`` folder under ``<cache dir>/onnx/<key>``. The key covers
everything the graphs are made from: the weights' sha256, the sidecar's bytes, the model
code (``model/*.py``) and the exporter (torch and onnx versions), so a changed checkpoint,
model code or exporter exports afresh. Entries are written to a temporary folder and
renamed into place, so a crash or a second process never leaves a half-written one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .onnx_layout import OnnxLayout, read_graphs, write_graphs

log = logging.getLogger(__name__)

Graphs = tuple[bytes, bytes, OnnxLayout]

_MODEL_CODE = Path(__file__).resolve().parent


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/safl``, else ``~/.cache/safl`` (``SAFL_CACHE_DIR`` unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "safl"


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "none"


def cache_key(weights_sha256: str, sidecar: bytes) -> str:
    """The entry name for a checkpoint (its weights' hex sha256 and its sidecar's bytes):
    ``<first 12 hex of the weights' sha256>-<16 hex of everything else>``."""
    h = hashlib.sha256()
    for part in (weights_sha256.encode(), sidecar, _version("torch").encode(), _version("onnx").encode()):
        h.update(len(part).to_bytes(8, "little") + part)
    for source in sorted(_MODEL_CODE.glob("*.py")):
        h.update(source.name.encode() + source.read_bytes())
    return f"{weights_sha256[:12]}-{h.hexdigest()[:16]}"


def cache_entry(cache_dir: str | os.PathLike[str] | None, weights_sha256: str, sidecar: bytes) -> Path:
    """The folder of a checkpoint's graphs (``cache_dir`` ``None``: ``default_cache_dir()``)."""
    return Path(cache_dir or default_cache_dir()) / "onnx" / cache_key(weights_sha256, sidecar)


def load(folder: Path) -> Graphs | None:
    """The graphs in ``folder``, or ``None`` when it holds none that can be read."""
    try:
        return read_graphs(folder)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store(folder: Path, graphs: Graphs) -> bool:
    """Write ``graphs`` as ``folder``, atomically; ``False`` (logged) when the cache cannot
    be written (a read-only home in a container: the graphs are then exported at every start)."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            write_graphs(tmp, *graphs)
            os.replace(tmp, folder)
        except OSError:
            if folder.is_dir():  # another process stored the same entry first
                return True
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        log.warning("cannot keep the ONNX graphs in %s (%s); they are exported at every start (--cache-dir / SAFL_CACHE_DIR)", folder, exc)
        return False
    return True


def cached_graphs(folder: Path, export: Callable[[], Graphs]) -> Graphs:
    """The graphs stored in ``folder``, else ``export()``'s, then stored there."""
    graphs = load(folder)
    if graphs is None:
        graphs = export()
        store(folder, graphs)
    return graphs
