"""Checkpoint I/O: ``<stem>.safetensors`` weights + ``<stem>.json`` sidecar.

The sidecar holds the format version, the model config (charset included), the
pre-processing geometry, training metadata and the weights' sha256, which is checked
on load so a truncated or swapped file is caught before it serves anything. Loading
never unpickles anything. PyTorch and safetensors are imported by the functions that need
them: ``shipped_weights`` and ``file_sha256`` serve tools that never load the network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .safl import SAFL, SAFLConfig

FORMAT = "safl-checkpoint"
FORMAT_VERSION = 3  # 2: TPS points are bounded offsets (tps_max_offset); 3: monotone TPS points (tps_monotone)


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the model it describes."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a loaded checkpoint says about itself."""

    weights_path: Path
    sha256: str
    name: str
    config: SAFLConfig
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def model_id(self) -> str:
        """``name@<first 12 hex digits of the weights' sha256>``."""
        return f"{self.name}@{self.sha256[:12]}"


#: The package a wheel installs the shipped weights as (``weights/`` of the repository,
#: mapped in ``pyproject.toml``); a checkout reads them in place.
WEIGHTS_PACKAGE = "safl_weights"
SHIPPED_FILE = "safl.safetensors"


def shipped_weights() -> Path:
    """The shipped checkpoint: ``weights/safl.safetensors`` of this checkout (an editable
    install), else the copy a wheel installs as the ``safl_weights`` package. The path is
    returned even when the file is missing; loading it then names the path."""
    checkout = Path(__file__).resolve().parents[1] / "weights" / SHIPPED_FILE
    if checkout.is_file():
        return checkout
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))) / SHIPPED_FILE
    return checkout


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("*.safetensors"))
        if len(found) != 1:
            raise CheckpointError(f"{p} holds {len(found)} .safetensors files; name the one to load")
        p = found[0]
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    elif p.suffix != ".safetensors":
        p = p.with_name(p.name + ".safetensors")
    return p, p.with_suffix(".json")


def _atomic_write(path: Path, write: Any) -> None:
    # Write next to the target and rename, so a crash never leaves a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files: a container's non-root user could not read them
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(model: SAFL, path: str | os.PathLike[str], name: str = "safl", training: dict[str, Any] | None = None) -> CheckpointInfo:
    """Write weights and sidecar atomically; returns the info a load would give."""
    from safetensors.torch import save_file

    weights, sidecar = _paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # The config (charset included) also goes into the weights file's own header, which the
    # sha256 covers: a sidecar edited after the fact is caught on load. One key only: safetensors
    # writes its metadata map in hash order, so two keys made the same model's sha256 (its id)
    # differ from one save to the next.
    header = {"config": json.dumps(model.config.to_dict(), sort_keys=True)}
    _atomic_write(weights, lambda tmp: save_file(state, tmp, metadata=header))
    sha = file_sha256(weights)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "sha256": sha,
        "config": model.config.to_dict(),
        "charset": model.config.charset,
        "preprocess": model.config.preprocess.to_dict(),
        "training": training or {},
    }

    def write_json(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(meta, indent=2) + "\n")

    _atomic_write(sidecar, write_json)
    return CheckpointInfo(weights, sha, name, model.config, training or {})


def read_info(path: str | os.PathLike[str], verify: bool = True) -> CheckpointInfo:
    """Read and check the sidecar (and, with ``verify``, the weights' sha256)."""
    from .safl import SAFLConfig

    weights, sidecar = _paths(path)
    if not weights.is_file():
        raise CheckpointError(f"checkpoint weights not found: {weights}")
    if not sidecar.is_file():
        raise CheckpointError(f"checkpoint sidecar not found: {sidecar} (it must sit next to {weights.name})")
    try:
        meta = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint sidecar {sidecar} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{sidecar} is not a safl checkpoint sidecar (format={meta.get('format') if isinstance(meta, dict) else None!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{sidecar} has format_version {version!r}; this safl reads up to {FORMAT_VERSION}")
    raw_config = meta.get("config")
    if version == 1 and isinstance(raw_config, dict):
        raw_config = {"tps_max_offset": 0.0, **raw_config}  # format 1 predicted absolute TPS points
    if isinstance(version, int) and version <= 2 and isinstance(raw_config, dict):
        raw_config = {"tps_monotone": False, **raw_config}  # before format 3 the points could fold
    try:
        config = SAFLConfig.from_dict(raw_config)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{sidecar} has an invalid model config: {exc}") from None
    if meta.get("charset", config.charset) != config.charset:
        raise CheckpointError(f"{sidecar}: the charset field does not match the model config's charset")
    sha = file_sha256(weights) if verify else str(meta.get("sha256", ""))
    if verify and meta.get("sha256") not in (None, sha):
        raise CheckpointError(
            f"weights file {weights} is corrupt, truncated or not the one its sidecar describes: sha256 {sha[:12]}… != {str(meta['sha256'])[:12]}…"
        )
    return CheckpointInfo(weights, sha, str(meta.get("name", "safl")), config, dict(meta.get("training") or {}))


def _check_embedded_config(info: CheckpointInfo) -> None:
    """Compare the sidecar's config with the one in the weights' header (when it has one;
    checkpoints written before it was added have none)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(info.weights_path), framework="pt") as fh:
            embedded = (fh.metadata() or {}).get("config")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"could not read weights {info.weights_path}: {exc}") from None
    if embedded is None:
        return
    stored = json.loads(embedded)
    if "tps_max_offset" not in stored:
        stored["tps_max_offset"] = 0.0  # written before the field existed (format 1)
    stored.setdefault("tps_monotone", False)  # written before the field existed (format 2)
    for key in ("pos_step_h", "pos_step_w"):
        stored.setdefault(key, 1.0)  # written before position interpolation: whole steps
    for key in ("tps_loc_h", "tps_loc_w"):
        stored.setdefault(key, 1)  # written before the localisation grid: one cell
    if stored != info.config.to_dict():
        raise CheckpointError(
            f"the sidecar of {info.weights_path.name} does not match the config stored in the weights (was the charset or another field edited?)"
        )


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[SAFL, CheckpointInfo]:
    """Load a checkpoint into a fresh ``SAFL`` in eval mode on ``device``.

    Raises ``CheckpointError`` naming the problem for a missing, truncated, corrupt or
    mismatched checkpoint.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .safl import SAFL

    info = read_info(path)
    try:
        state = load_file(str(info.weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"could not read weights {info.weights_path}: {exc}") from None
    try:
        model = SAFL(info.config)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"the config in the sidecar of {info.weights_path.name} does not describe a buildable model: {exc}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"weights {info.weights_path.name} do not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise CheckpointError(
                f"weights {info.weights_path.name}: tensor {key!r} has shape {tuple(state[key].shape)}, "
                f"the config (charset of {len(info.config.charset)} chars, d_model {info.config.d_model}) expects {tuple(tensor.shape)}"
            )
    _check_embedded_config(info)  # last: the shape checks above name a mismatch more precisely
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), info
